"""Fused Monarch multiply: both block-diagonal factors and the permutation in one kernel.

``y = x @ W`` for a Monarch ``W`` given as fly-layout factors (see
:mod:`sparsejax.monarch`). One program handles a tile of tokens, one block ``j``
of the second factor and a tile of that block's outputs; it loops over the
``nblocks`` input blocks ``i``, computes the slice of the intermediate that
block ``j`` reads from block ``i`` (``q / nblocks`` columns) and multiplies it
into the accumulator straight away, so the intermediate never leaves registers.

The permutation is folded into the operands once, outside the kernel (a gather
on the small factors, not on activations): ``A[j, i, c, :] = w1[i, c * nblocks + j, :]``
and ``B = w2``. The core ``out[:, j] = sum_i (u[:, i] @ A[j, i].T) @ B[j][:, i-th slice].T``
has the same form for ``dx`` with the roles of the factors swapped, so the
backward pass of the input reuses the kernel; the factor gradients are two
batched matmuls in XLA.

Applies when ``nblocks`` divides ``q`` (the fused layout needs equal slices);
on GPU also when the tile sizes are powers of two (the Pallas GPU lowering needs
them). Elsewhere :func:`monarch_matmul` falls back to
:func:`monarch_matmul_reference`; :func:`kernel_applies` says which.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparsejax import monarch as monarch_math

__all__ = ["monarch_matmul", "monarch_matmul_reference", "kernel_applies", "fused_operands"]


def monarch_matmul_reference(x: jax.Array, factors, out_features: int | None = None) -> jax.Array:
    """Plain-JAX twin of :func:`monarch_matmul` (two einsums and a transpose)."""
    return monarch_math.matmul_reference(x, factors, out_features)


# --------------------------------------------------------------------------- operands


def fused_operands(w1: jax.Array, w2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """fly factors -> ``(A, B)`` of the fused core; needs ``nblocks | q``."""
    nb, q, p = w1.shape
    c = q // nb
    a = w1.reshape(nb, c, nb, p).transpose(2, 0, 1, 3)          # (j, i, c, p)
    return a, w2


def _transpose_operands(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Operands of the core that computes the input gradient of ``core(., a, b)``."""
    n2, n1, c, d1 = a.shape
    d2 = b.shape[1]
    a_t = b.reshape(n2, d2, n1, c).transpose(2, 0, 3, 1)        # (i, j, c, e)
    b_t = a.transpose(1, 3, 0, 2).reshape(n1, d1, n2 * c)       # (i, d, (j, c))
    return a_t, b_t


# --------------------------------------------------------------------------- kernel


def _core_kernel(u_ref, a_ref, b_ref, *rest, n1: int, c: int, bk: int):
    o_ref = rest[-1]   # an aliased poison buffer, when present, sits before it
    bt, d1 = u_ref.shape[0], u_ref.shape[2]
    acc = jnp.zeros((bt, b_ref.shape[1]), jnp.float32)
    for i in range(n1):   # n1 = nblocks, small and static: unrolled
        # Stage one in chunks of bk inputs, so no tile grows with the block size.
        def stage_one(kk, h, i=i):
            d0 = pl.multiple_of(kk * bk, bk)
            u_i = u_ref[:, i, pl.ds(d0, bk)]                     # (bt, bk)
            a_i = a_ref[0, i, :, pl.ds(d0, bk)]                  # (c, bk)
            return h + jax.lax.dot_general(u_i, a_i, (((1,), (1,)), ((), ())),
                                           preferred_element_type=jnp.float32)
        h = jax.lax.fori_loop(0, d1 // bk, stage_one, jnp.zeros((bt, c), jnp.float32))
        # Round the intermediate to the compute dtype, as the reference does.
        h = h.astype(u_ref.dtype)                                # (bt, c)
        b_i = b_ref[0, :, i * c:(i + 1) * c]                     # (bd2, c)
        acc += jax.lax.dot_general(h, b_i, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)
    o_ref[:, 0, :] = acc.astype(o_ref.dtype)


def _largest_pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def _core_call(u, a, b, *, block_tokens: int, block_out: int, block_in: int, interpret: bool,
               poison: bool):
    t, n1, d1 = u.shape
    n2, _, c, _ = a.shape
    d2 = b.shape[1]
    bt, bd2 = block_tokens, block_out
    grid = (t // bt, n2, d2 // bd2)
    out_shape = jax.ShapeDtypeStruct((t, n2, d2), u.dtype)
    in_specs = [
        pl.BlockSpec((bt, n1, d1), lambda ti, j, e: (ti, 0, 0)),
        pl.BlockSpec((1, n1, c, d1), lambda ti, j, e: (j, 0, 0, 0)),
        pl.BlockSpec((1, bd2, n1 * c), lambda ti, j, e: (j, e, 0)),
    ]
    out_spec = pl.BlockSpec((bt, 1, bd2), lambda ti, j, e: (ti, j, e))
    operands = [u, a, b]
    aliases = {}
    if poison:   # tests: every output element must be written over the NaNs
        in_specs.append(out_spec)
        operands.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        aliases = {3: 0}
    return pl.pallas_call(
        functools.partial(_core_kernel, n1=n1, c=c, bk=_largest_pow2_divisor(d1, block_in)),
        grid=grid, in_specs=in_specs, out_specs=out_spec, out_shape=out_shape,
        input_output_aliases=aliases, interpret=interpret,
    )(*operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _core(u, a, b, config):
    return _core_call(u, a, b, **dict(config))


def _core_fwd(u, a, b, config):
    return _core(u, a, b, config), (u, a, b)


def _core_bwd(config, residuals, g):
    u, a, b = residuals
    n2, n1, c, _ = a.shape
    a_t, b_t = _transpose_operands(a, b)
    cfg = dict(config)
    cfg["block_out"] = _largest_pow2_divisor(u.shape[2], cfg["block_out"])
    du = _core_call(g, a_t, b_t, **cfg)
    # Factor gradients: the intermediate is recomputed (cheaper than storing it).
    h = jnp.einsum("tid,jicd->tjic", u, a, preferred_element_type=jnp.float32).astype(u.dtype)
    h = h.reshape(u.shape[0], n2, n1 * c)
    db = jnp.einsum("tje,tjr->jer", g, h, preferred_element_type=jnp.float32)
    dh = jnp.einsum("tje,jer->tjr", g, b, preferred_element_type=jnp.float32).astype(u.dtype)
    dh = dh.reshape(u.shape[0], n2, n1, c)
    da = jnp.einsum("tjic,tid->jicd", dh, u, preferred_element_type=jnp.float32)
    return du, da.astype(a.dtype), db.astype(b.dtype)


_core.defvjp(_core_fwd, _core_bwd)


# --------------------------------------------------------------------------- public


def kernel_applies(x_shape, factors, *, block_tokens: int = 64, block_out: int = 128,
                   platform: str | None = None) -> tuple[bool, str]:
    """Whether the fused kernel handles these shapes on ``platform``, and why not if not."""
    w1, w2 = factors["w1"], factors["w2"]
    nb, q, p = w1.shape
    s = w2.shape[1]
    if q % nb:
        return False, f"nblocks={nb} does not divide the intermediate block size q={q}"
    platform = platform or jax.default_backend()
    if platform == "gpu":
        c = q // nb
        bd2 = _largest_pow2_divisor(s, block_out)
        for what, v in (("p", p), ("q / nblocks", c), ("q", q), ("nblocks", nb),
                        ("output tile", bd2), ("token tile", block_tokens)):
            if (v < 16 and what != "nblocks") or v & (v - 1):
                return False, f"{what}={v} is not a power of two >= 16 (Pallas GPU tiles)"
        return True, "fused kernel (Pallas, GPU)"
    return True, "fused kernel (Pallas)"


def monarch_matmul(x: jax.Array, factors, out_features: int | None = None, *,
                   block_tokens: int = 64, block_out: int = 128, block_in: int = 64,
                   interpret: bool | None = None, poison: bool = False) -> jax.Array:
    """``x @ W`` for Monarch factors through the fused kernel, differentiable.

    Args:
      x: ``(..., K)``.
      factors: ``{"w1": (nblocks, q, p), "w2": (nblocks, s, q)}`` (fly layout).
      out_features: ``N`` (default ``nblocks * s``).
      block_tokens: rows per program.
      block_out: output columns per program (capped at the largest power of
        two dividing ``s``).
      block_in: inputs per step of the first factor's loop (likewise capped).
      interpret: run the Pallas kernel in interpret mode (CPU tests). ``None``:
        the kernel on GPU, the reference elsewhere.
      poison: fill the output with NaN before the kernel writes it (tests).

    Falls back to :func:`monarch_matmul_reference` where the kernel does not
    apply (see :func:`kernel_applies`).
    """
    w1, w2 = monarch_math._check_factors(factors, "monarch_matmul")
    platform = jax.default_backend()
    if interpret is None:
        if platform != "gpu":
            return monarch_matmul_reference(x, factors, out_features)
        interpret = False
    ok, _ = kernel_applies(x.shape, factors, block_tokens=block_tokens, block_out=block_out,
                           platform="interpret" if interpret else platform)
    if not ok:
        return monarch_matmul_reference(x, factors, out_features)
    nb, q, p = w1.shape
    s = w2.shape[1]
    k_ext, n_ext = nb * p, nb * s
    out_features = n_ext if out_features is None else out_features
    if x.shape[-1] > k_ext or not 1 <= out_features <= n_ext:
        raise ValueError(f"monarch_matmul: input features {x.shape[-1]} (at most {k_ext}) or "
                         f"out_features {out_features} (1..{n_ext}) out of range")
    dtype = jnp.result_type(x.dtype, w1.dtype, w2.dtype)
    batch = x.shape[:-1]
    u = x.reshape(-1, x.shape[-1]).astype(dtype)
    t = u.shape[0]
    bt = block_tokens
    t_pad = -(-t // bt) * bt
    u = jnp.pad(u, ((0, t_pad - t), (0, k_ext - u.shape[1]))).reshape(t_pad, nb, p)
    a, b = fused_operands(w1.astype(dtype), w2.astype(dtype))
    config = (("block_tokens", bt), ("block_out", _largest_pow2_divisor(s, block_out)),
              ("block_in", block_in),
              ("interpret", bool(interpret)), ("poison", bool(poison)))
    z = _core(u, a, b, config)                                   # (t_pad, nb, s)
    y = z[:t].transpose(0, 2, 1).reshape(*batch, n_ext)          # output index s * nb + j
    return y[..., :out_features]
