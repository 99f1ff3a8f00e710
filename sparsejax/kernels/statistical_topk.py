"""Statistical top-k in one pass over memory: a row-wise Pallas kernel.

XLA computes :func:`sparsejax.topk.statistical_topk` as two fusions: a row
reduction for the mean and variance, then the elementwise threshold. That
reads ``x`` from memory twice. Here one program holds whole rows on chip
(registers on GPU), so ``x`` is read once and the output written once: the
least traffic the op allows. The statistics are the exact two-pass ones
(mean, then the mean squared deviation), free once the row is on chip.

The kernel runs the soft and hard forms along the last axis with a static
``k``/``k_frac``; rows are padded to a power of two (Triton's tensors are) and
the padding is masked out of the statistics. The backward pass differentiates
the plain-JAX reference (:func:`sparsejax.topk.statistical_topk`), the twin
every test compares against.

GPU: the Triton backend of ``pl.pallas_call``. A whole row lives in one
program, so rows up to ``MAX_ROW`` entries take the kernel; longer rows, masked
(``where=``) rows and traced ``k`` use XLA.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparsejax import topk
from sparsejax.kernels import backends
from sparsejax.kernels._triton import compiler_params, next_pow2

__all__ = ["MAX_ROW", "IMPLS", "supported", "statistical_topk", "statistical_topk_pallas",
           "statistical_topk_reference"]

IMPLS = ("xla", "pallas", "auto")

# f32 entries one program holds: 32768 is 32 registers per thread at 32 warps, 128 KiB.
MAX_ROW = 32768


def statistical_topk_reference(x, *, k=None, k_frac=None, mode="soft", fill=0.0):
    """The plain-JAX twin: :func:`sparsejax.topk.statistical_topk` along the last axis."""
    return topk.statistical_topk(x, k=k, k_frac=k_frac, axis=-1, mode=mode, fill=fill)


_KERNELS = {"gpu": backends.TRITON}


def supported(x, *, k=None, k_frac=None, mode="soft", where=None, backend: str | None = None,
              interpret: bool = False) -> str | None:
    """Why the kernel cannot compute this call along ``x``'s last axis (``None`` when it can).

    ``backend`` (kernel: ``"triton"``), ``interpret``: see :mod:`sparsejax.kernels.backends`.
    """
    kernel = backends.resolve(backend, interpret, kernels=_KERNELS, interpreted=backends.TRITON,
                              where="supported")
    if mode not in ("soft", "hard"):
        return f"mode {mode!r} (the kernel writes the soft and hard forms)"
    if where is not None:
        return "a where= mask"
    if isinstance(k, jax.Array) or isinstance(k_frac, jax.Array):
        return "a traced k"
    if x.ndim == 0 or next_pow2(x.shape[-1]) > MAX_ROW:
        return f"rows of {x.shape[-1] if x.ndim else 0} entries (the kernel holds up to {MAX_ROW})"
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype {x.dtype}"
    if kernel != backends.TRITON:
        return backends.reference_reason("statistical top-k", backend)
    return None


def _kernel(x_ref, *refs, d, z, mode, fill):
    o_ref = refs[-1]           # refs[0] is the poisoned output buffer when testing
    x = x_ref[...].astype(jnp.float32)
    d_pad = x.shape[-1]
    valid = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) < d if d_pad != d else None

    def masked(v, fill_value):
        return v if valid is None else jnp.where(valid, v, fill_value)

    # Centre on the row's maximum before summing: a constant row then has a mean equal to
    # its entries bit for bit, a zero variance, and keeps nothing (as the reference).
    peak = jnp.max(masked(x, -jnp.inf), axis=1)[:, None]
    mean = peak + jnp.sum(masked(x - peak, 0.0), axis=1)[:, None] / d
    dev = masked(x - mean, 0.0)
    var = jnp.sum(dev * dev, axis=1)[:, None] / d
    theta = mean + jnp.sqrt(var) * z
    keep = x > theta
    if mode == "soft":
        out = jnp.where(keep, x - theta, 0.0)
    else:
        out = jnp.where(keep, x, fill)
    o_ref[...] = out.astype(o_ref.dtype)


def _forward(x, *, frac, mode, fill, stop_gradient, rows_per_block, num_warps, interpret, poison):
    del stop_gradient     # the backward pass's business
    shape, d = x.shape, x.shape[-1]
    rows = x.reshape(-1, d)
    n = rows.shape[0]
    d_pad = next_pow2(d)
    n_pad = -(-n // rows_per_block) * rows_per_block
    if (n_pad, d_pad) != (n, d):
        rows = jnp.pad(rows, ((0, n_pad - n), (0, d_pad - d)))
    with jax.ensure_compile_time_eval():      # the reference's own float32 quantile, as a constant
        z = float(topk._upper_quantile(frac))
    kernel = functools.partial(_kernel, d=d, z=z, mode=mode, fill=float(fill))
    spec = pl.BlockSpec((rows_per_block, d_pad), lambda i: (i, 0))
    out_shape = jax.ShapeDtypeStruct((n_pad, d_pad), x.dtype)
    args, in_specs, aliases = [rows], [spec], {}
    if poison:      # tests: every output entry must be written over the NaNs
        aliases = backends.poison_output(args, out_shape)
        in_specs.append(spec)
    compiler = {} if interpret else dict(compiler_params=compiler_params(num_warps, num_stages=1))
    out = pl.pallas_call(kernel, grid=(n_pad // rows_per_block,), in_specs=in_specs, out_specs=spec,
                         out_shape=out_shape, input_output_aliases=aliases, interpret=interpret,
                         **compiler)(*args)
    return out[:n, :d].reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _topk(x, static):
    return _forward(x, **dict(static))


def _topk_fwd(x, static):
    return _forward(x, **dict(static)), x


def _topk_bwd(static, x, g):
    opts = dict(static)
    ref = functools.partial(topk.statistical_topk, k_frac=opts["frac"], axis=-1, mode=opts["mode"],
                            fill=opts["fill"], stop_gradient_threshold=opts["stop_gradient"])
    return jax.vjp(ref, x)[1](g)


_topk.defvjp(_topk_fwd, _topk_bwd)


def statistical_topk_pallas(x: jax.Array, *, k: Any = None, k_frac: Any = None, mode: str = "soft",
                            fill: float = 0.0, stop_gradient_threshold: bool = False,
                            rows_per_block: int = 1, num_warps: int = 8, interpret: bool = False,
                            poison: bool = False) -> jax.Array:
    """:func:`sparsejax.topk.statistical_topk` along the last axis, in one pass (see the module doc).

    Args:
      x: float array; rows are its last axis.
      k, k_frac, mode, fill, stop_gradient_threshold: as :func:`sparsejax.topk.statistical_topk`
        (``mode`` soft or hard; ``k``/``k_frac`` static).
      rows_per_block: rows one program holds.
      num_warps: Triton warps per program (GPU).
      interpret: run in Pallas interpret mode (CPU tests).
      poison: fill the output buffer with NaN first (tests: proves every entry is written).

    Differentiable: the backward pass is the reference's.
    """
    x = jnp.asarray(x)
    reason = supported(x, k=k, k_frac=k_frac, mode=mode, backend=backends.TRITON, interpret=interpret)
    if reason is not None:
        raise ValueError(f"statistical_topk_pallas: the kernel does not take {reason}; "
                         f"use sparsejax.topk.statistical_topk")
    if isinstance(rows_per_block, bool) or not isinstance(rows_per_block, int) or rows_per_block < 1:
        raise ValueError(f"statistical_topk_pallas: rows_per_block must be a positive int, "
                         f"got {rows_per_block!r}")
    frac = topk.resolve_k_frac(x.shape[-1], k, k_frac, "statistical_topk_pallas")
    static = (("frac", frac), ("mode", mode), ("fill", float(fill)),
              ("stop_gradient", bool(stop_gradient_threshold)),
              ("rows_per_block", rows_per_block), ("num_warps", num_warps),
              ("interpret", interpret), ("poison", poison))
    return _topk(x, static)


def statistical_topk(x: jax.Array, *, k: Any = None, k_frac: Any = None, axis: int = -1,
                     mode: str = "soft", fill: float = 0.0, where: jax.Array | None = None,
                     stop_gradient_threshold: bool = False, impl: str = "auto",
                     backend: str | None = None, interpret: bool = False) -> jax.Array:
    """:func:`sparsejax.topk.statistical_topk` by the kernel or by XLA, as ``impl`` says.

    Args:
      x, k, k_frac, axis, mode, fill, where, stop_gradient_threshold: as
        :func:`sparsejax.topk.statistical_topk`.
      impl: ``"xla"`` (the plain-JAX function, the reference); ``"pallas"``: the
        kernel, in interpret mode where ``backend`` has no kernel (a Spark rule's
        ``impl="pallas"`` runs on CPU too), an error where it does not apply
        (:func:`supported` says why); ``"auto"``: the kernel where ``backend`` has
        it and it applies along the last axis, XLA elsewhere.
      backend, interpret: see :mod:`sparsejax.kernels.backends`.
    """
    if impl not in IMPLS:
        raise ValueError(f"statistical_topk: impl must be one of {IMPLS}, got {impl!r}")
    x = jnp.asarray(x)
    reference = functools.partial(topk.statistical_topk, x, k=k, k_frac=k_frac, axis=axis, mode=mode,
                                  fill=fill, where=where,
                                  stop_gradient_threshold=stop_gradient_threshold)
    if impl == "xla":
        return reference()
    axis = topk._check_axis(x, axis, "statistical_topk")
    rows = jnp.moveaxis(x, axis, -1)
    if impl == "pallas":
        no_kernel = backends.resolve(backend, False, kernels=_KERNELS, interpreted=backends.TRITON,
                                     where="statistical_topk") != backends.TRITON
        interpret = interpret or no_kernel
        reason = supported(rows, k=k, k_frac=k_frac, mode=mode, where=where, backend=backend,
                           interpret=interpret)
        if reason is not None:
            raise ValueError(f"statistical_topk: impl='pallas' does not take {reason}; use impl='xla'")
    elif (axis != x.ndim - 1 or supported(rows, k=k, k_frac=k_frac, mode=mode, where=where,
                                          backend=backend, interpret=interpret) is not None):
        return reference()
    out = statistical_topk_pallas(rows, k=k, k_frac=k_frac, mode=mode, fill=fill,
                                  stop_gradient_threshold=stop_gradient_threshold,
                                  interpret=interpret)
    return jnp.moveaxis(out, -1, axis)
