"""Statistical top-k in one pass over memory: a row-wise Pallas kernel.

XLA computes :func:`sparsejax.topk.statistical_topk` as two fusions: a row
reduction for the mean and variance, then the elementwise threshold. That
reads ``x`` from memory twice. Here one program holds whole rows on chip
(registers on GPU), so ``x`` is read once and the output written once: the
least traffic the op allows. The statistics are the exact two-pass ones
(mean, then the mean squared deviation), free once the row is on chip.

The kernel runs the soft and hard forms along the last axis with a static
``k``/``k_frac``; rows are padded to a power of two (Triton's tensors are) and
the padding is masked out of the statistics. ``valid_above`` counts only the
entries above it (attention scores a model masked with its dtype's minimum):
the statistics are taken over those, ``k`` counts among them (so the quantile is
per row, computed in the kernel), a row with at most ``k`` of them keeps them
all, and the rest are never kept: ``where=x > valid_above`` of the reference, in
one launch where XLA runs a handful. The backward pass differentiates
the plain-JAX reference (:func:`sparsejax.topk.statistical_topk`), the twin
every test compares against.

Rows whose length is not a power of two but has a power-of-two factor of at least
``MIN_CHUNK`` (a gated FFN's ``d_ff``: 9216, 13824) are read in chunks of that size
instead of padded: the padded copy of ``x`` and the slice of the output are two XLA
launches, as long as the kernel itself at decode. Such a row is shared by several
programs (``programs_per_row``): each takes the row's statistics from all of it (from
the L2 after the first) and writes its own chunks.

``activation`` (soft mode) applies a function to the kept entries in the kernel:
Spark's ``gelu(soft_topk(pre))`` at decode is then one launch, not four.

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

__all__ = ["MAX_ROW", "IMPLS", "supported", "row_chunk", "statistical_topk",
           "statistical_topk_pallas", "statistical_topk_reference"]

IMPLS = ("xla", "pallas", "auto")

# f32 entries one program holds: 32768 is 32 registers per thread at 32 warps, 128 KiB.
MAX_ROW = 32768
# The chunk sizes a row that is not a power of two is read in (its largest power-of-two
# factor, capped): below MIN_CHUNK a chunk is too short a load to pay for its own reduction.
MIN_CHUNK = 64
MAX_CHUNK = 1024


def statistical_topk_reference(x, *, k=None, k_frac=None, mode="soft", fill=0.0, activation=None):
    """The plain-JAX twin: :func:`sparsejax.topk.statistical_topk` along the last axis, then
    ``activation`` on the kept entries (soft mode)."""
    out = topk.statistical_topk(x, k=k, k_frac=k_frac, axis=-1, mode=mode, fill=fill)
    return out if activation is None else _activate(out, activation)


def _activate(soft, activation):
    # A kept entry's soft value x - theta is positive; the rest stay exactly zero.
    return jnp.where(soft > 0, activation(soft), 0.0).astype(soft.dtype)


def row_chunk(d: int) -> int | None:
    """The chunk a row of ``d`` entries that is not a power of two is read in, or ``None``
    (then the row is padded to one)."""
    chunk = min(d & -d, MAX_CHUNK)
    return chunk if chunk >= MIN_CHUNK and d != next_pow2(d) else None


_KERNELS = {"gpu": backends.TRITON}


def supported(x, *, k=None, k_frac=None, mode="soft", where=None, valid_above=None,
              activation=None, backend: str | None = None, interpret: bool = False) -> str | None:
    """Why the kernel cannot compute this call along ``x``'s last axis (``None`` when it can).

    ``backend`` (kernel: ``"triton"``), ``interpret``: see :mod:`sparsejax.kernels.backends`.
    """
    kernel = backends.resolve(backend, interpret, kernels=_KERNELS, interpreted=backends.TRITON,
                              where="supported")
    if mode not in ("soft", "hard"):
        return f"mode {mode!r} (the kernel writes the soft and hard forms)"
    if activation is not None and (mode != "soft" or valid_above is not None):
        return "an activation outside plain soft mode"
    if where is not None:
        return "a where= mask (valid_above= is the kernel's form of one)"
    if isinstance(k, jax.Array) or isinstance(k_frac, jax.Array):
        return "a traced k"
    if x.ndim == 0 or next_pow2(x.shape[-1]) > MAX_ROW:
        return f"rows of {x.shape[-1] if x.ndim else 0} entries (the kernel holds up to {MAX_ROW})"
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return f"dtype {x.dtype}"
    if kernel != backends.TRITON:
        return backends.reference_reason("statistical top-k", backend)
    return None


def _topk_kernel(x_ref, *refs, d, z, mode, fill, k=None, valid_above=None, activation=None):
    o_ref = refs[-1]           # refs[0] is the poisoned output buffer when testing
    x = x_ref[...].astype(jnp.float32)
    d_pad = x.shape[-1]
    valid = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) < d if d_pad != d else None
    if valid_above is not None:
        o_ref[...] = _valid_only(x, valid, z, mode, fill, k, valid_above).astype(o_ref.dtype)
        return

    def masked(v, fill_value):
        return v if valid is None else jnp.where(valid, v, fill_value)

    # Centre on the row's maximum before summing: a constant row then has a mean equal to
    # its entries bit for bit, a zero variance, and keeps nothing (as the reference).
    peak = jnp.max(masked(x, -jnp.inf), axis=1)[:, None]
    mean = peak + jnp.sum(masked(x - peak, 0.0), axis=1)[:, None] / d
    dev = masked(x - mean, 0.0)
    var = jnp.sum(dev * dev, axis=1)[:, None] / d
    theta = mean + jnp.sqrt(var) * z
    o_ref[...] = _kept(x, theta, mode, fill, activation).astype(o_ref.dtype)


def _kept(x, theta, mode, fill, activation):
    keep = x > theta
    if mode == "hard":
        return jnp.where(keep, x, fill)
    return jnp.where(keep, x - theta if activation is None else activation(x - theta), 0.0)


def _chunked_kernel(x_ref, *refs, d, chunk, chunks_per_program, z, mode, fill, activation):
    """One row in chunks of ``chunk``: the statistics from every chunk, the output of this
    program's ``chunks_per_program`` chunks."""
    o_ref = refs[-1]           # refs[0] is the poisoned output buffer when testing
    row, part = pl.program_id(0), pl.program_id(1)

    def load(c):
        return x_ref[pl.ds(row, 1), pl.ds(c * chunk, chunk)].astype(jnp.float32)

    # The reference's one-pass statistics, shifted by the row's first entry (so a constant
    # row's mean is its value bit for bit and it keeps nothing). The chunks are summed
    # elementwise first: two cross-warp reductions per row, not two per chunk.
    shift = x_ref[row, 0].astype(jnp.float32)
    total = squares = None
    for c in range(d // chunk):
        t = load(c) - shift
        total = t if total is None else total + t
        squares = t * t if squares is None else squares + t * t
    mean_c = jnp.sum(total) / d
    var = jnp.sum(squares) / d - mean_c * mean_c
    theta = mean_c + shift + jnp.sqrt(jnp.maximum(var, 0.0)) * z
    for i in range(chunks_per_program):
        c = part * chunks_per_program + i
        o_ref[pl.ds(row, 1), pl.ds(c * chunk, chunk)] = _kept(load(c), theta, mode, fill,
                                                              activation).astype(o_ref.dtype)


# The normal quantile from operations a kernel can lower (jax.scipy.special.ndtri's
# polynomials are array constants, which a kernel may not capture): erf_inv in the centre, and
# in the tails, where 2 p - 1 rounds away p's digits, Acklam's rational approximation in
# q = sqrt(-2 log p) (relative error 1.2e-9 in exact arithmetic; its central branch is
# ill-conditioned in float32 and not used).
_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
      -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00)
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
      3.754408661907416e+00, 1.0)
_TAIL = 0.02425


def _horner(coefs, t):
    out = coefs[0]
    for c in coefs[1:]:
        out = out * t + c
    return out


def upper_quantile(frac: jax.Array) -> jax.Array:
    """``Phi^-1(1 - frac)`` from operations a kernel lowers; the reference's
    :func:`sparsejax.topk._upper_quantile` to float32 rounding."""
    frac = jnp.clip(frac, topk._MIN_FRAC, topk._MAX_FRAC)
    low = jnp.minimum(frac, 1.0 - frac)                      # the nearer tail's mass
    q = jnp.sqrt(-2.0 * jnp.log(low))
    tail = _horner(_C, q) / _horner(_D, q)                    # Phi^-1(low), negative
    tail = jnp.where(frac < 0.5, -tail, tail)
    central = -(2.0 ** 0.5) * jax.lax.erf_inv(2.0 * frac - 1.0)
    return jnp.where(low < _TAIL, tail, central)


def _valid_only(x, in_row, z, mode, fill, k, valid_above):
    """The top-k of each row among its entries above ``valid_above`` (see the module doc)."""
    valid = x > valid_above
    if in_row is not None:
        valid = valid & in_row
    count = jnp.sum(valid.astype(jnp.float32), axis=1)[:, None]
    n = jnp.maximum(count, 1.0)
    # Centred on the largest valid entry (as the unmasked rows are on their maximum).
    peak = jnp.max(jnp.where(valid, x, -jnp.inf), axis=1)[:, None]
    peak = jnp.where(count > 0, peak, 0.0)
    mean = peak + jnp.sum(jnp.where(valid, x - peak, 0.0), axis=1)[:, None] / n
    dev = jnp.where(valid, x - mean, 0.0)
    var = jnp.sum(dev * dev, axis=1)[:, None] / n
    if k is not None:       # k of the valid entries: the quantile differs per row
        z = upper_quantile(k / n)
    theta = mean + jnp.sqrt(jnp.maximum(var, 0.0)) * z
    if k is not None:       # at most k valid entries: keep them all
        theta = jnp.where(count <= k, -jnp.inf, theta)
    keep = valid & (x > theta)
    if mode == "soft":
        return jnp.where(keep, x - theta, 0.0)
    return jnp.where(keep, x, fill)


def _forward(x, *, frac, mode, fill, stop_gradient, rows_per_block, num_warps, interpret, poison,
             k=None, valid_above=None, activation=None, programs_per_row=None):
    del stop_gradient     # the backward pass's business
    shape, d = x.shape, x.shape[-1]
    rows = x.reshape(-1, d)
    n = rows.shape[0]
    z = 0.0                                   # k of the valid entries: the kernel's own, per row
    if frac is not None:
        with jax.ensure_compile_time_eval():  # the reference's own float32 quantile, as a constant
            z = float(topk._upper_quantile(frac))
    compiler = {} if interpret else dict(compiler_params=compiler_params(num_warps, num_stages=1))
    chunk = row_chunk(d) if valid_above is None and rows_per_block == 1 else None
    if chunk is not None:     # read as it is, in chunks: no padded copy, no sliced output
        parts = _parts(n, d // chunk, programs_per_row)
        kernel = functools.partial(_chunked_kernel, d=d, chunk=chunk, chunks_per_program=d // chunk // parts,
                                   z=z, mode=mode, fill=float(fill), activation=activation)
        out_shape = jax.ShapeDtypeStruct(rows.shape, x.dtype)
        args, aliases = [rows], {}
        if poison:
            aliases = backends.poison_output(args, out_shape)
        out = pl.pallas_call(kernel, grid=(n, parts), out_shape=out_shape, input_output_aliases=aliases,
                             interpret=interpret, **compiler)(*args)
        return out.reshape(shape)
    d_pad = next_pow2(d)
    n_pad = -(-n // rows_per_block) * rows_per_block
    if (n_pad, d_pad) != (n, d):
        rows = jnp.pad(rows, ((0, n_pad - n), (0, d_pad - d)))
    kernel = functools.partial(_topk_kernel, d=d, z=z, mode=mode, fill=float(fill), k=k,
                               valid_above=valid_above, activation=activation)
    spec = pl.BlockSpec((rows_per_block, d_pad), lambda i: (i, 0))
    out_shape = jax.ShapeDtypeStruct((n_pad, d_pad), x.dtype)
    args, in_specs, aliases = [rows], [spec], {}
    if poison:      # tests: every output entry must be written over the NaNs
        aliases = backends.poison_output(args, out_shape)
        in_specs.append(spec)
    out = pl.pallas_call(kernel, grid=(n_pad // rows_per_block,), in_specs=in_specs, out_specs=spec,
                         out_shape=out_shape, input_output_aliases=aliases, interpret=interpret,
                         **compiler)(*args)
    return out[:n, :d].reshape(shape)


# Programs a launch of chunked rows aims at, by default: a decode batch's few rows are shared
# by several programs each (spreading the output's writes and the activation over SMs); each
# of them reads the whole row for the statistics, so many rows get one program each.
_TARGET_PROGRAMS = 256
_MAX_PROGRAMS_PER_ROW = 32


def _parts(rows: int, chunks: int, programs_per_row: int | None) -> int:
    """The largest divisor of ``chunks`` up to ``programs_per_row`` (default: by the rows)."""
    cap = programs_per_row or min(_MAX_PROGRAMS_PER_ROW, _TARGET_PROGRAMS // max(rows, 1))
    cap = max(1, min(chunks, cap))
    return max(p for p in range(1, cap + 1) if chunks % p == 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _topk(x, static):
    return _forward(x, **dict(static))


def _topk_fwd(x, static):
    return _forward(x, **dict(static)), x


def _topk_bwd(static, x, g):
    opts = dict(static)
    count = ({"k_frac": opts["frac"]} if opts.get("k") is None else {"k": opts["k"]})
    where = None if opts.get("valid_above") is None else x > opts["valid_above"]
    ref = functools.partial(topk.statistical_topk, **count, axis=-1, mode=opts["mode"],
                            fill=opts["fill"], where=where,
                            stop_gradient_threshold=opts["stop_gradient"])
    if opts.get("activation") is not None:
        ref = lambda v, soft=ref: _activate(soft(v), opts["activation"])
    return jax.vjp(ref, x)[1](g)


_topk.defvjp(_topk_fwd, _topk_bwd)


def statistical_topk_pallas(x: jax.Array, *, k: Any = None, k_frac: Any = None, mode: str = "soft",
                            fill: float = 0.0, stop_gradient_threshold: bool = False,
                            valid_above: float | None = None, activation=None,
                            rows_per_block: int = 1, num_warps: int = 8,
                            programs_per_row: int | None = None, interpret: bool = False,
                            poison: bool = False) -> jax.Array:
    """:func:`sparsejax.topk.statistical_topk` along the last axis, in one pass (see the module doc).

    Args:
      x: float array; rows are its last axis.
      k, k_frac, mode, fill, stop_gradient_threshold: as :func:`sparsejax.topk.statistical_topk`
        (``mode`` soft or hard; ``k``/``k_frac`` static).
      valid_above: only entries above it count (the reference's ``where=x > valid_above``):
        ``k`` then counts among them, and the others are never kept.
      activation: soft mode: applied to the kept entries' ``x - theta`` in the kernel (the
        others stay 0).
      rows_per_block: rows one program holds.
      num_warps: Triton warps per program (GPU).
      programs_per_row: rows read in chunks (:func:`row_chunk`): at most this many programs
        share one (each writes its own chunks); default: up to 32 for a few rows, one for
        256 rows and more.
      interpret: run in Pallas interpret mode (CPU tests).
      poison: fill the output buffer with NaN first (tests: proves every entry is written).

    Differentiable: the backward pass is the reference's.
    """
    x = jnp.asarray(x)
    reason = supported(x, k=k, k_frac=k_frac, mode=mode, valid_above=valid_above,
                       activation=activation, backend=backends.TRITON, interpret=interpret)
    if reason is not None:
        raise ValueError(f"statistical_topk_pallas: the kernel does not take {reason}; "
                         f"use sparsejax.topk.statistical_topk")
    if isinstance(rows_per_block, bool) or not isinstance(rows_per_block, int) or rows_per_block < 1:
        raise ValueError(f"statistical_topk_pallas: rows_per_block must be a positive int, "
                         f"got {rows_per_block!r}")
    if valid_above is not None and k is not None:
        # k counts valid entries, which may be fewer than the row: checked as the reference does
        topk.resolve_k_frac(x.shape[-1] + 1, k, None, "statistical_topk_pallas")
        frac, k_valid = None, int(k)
    else:
        frac, k_valid = topk.resolve_k_frac(x.shape[-1], k, k_frac, "statistical_topk_pallas"), None
    static = (("frac", frac), ("k", k_valid),
              ("valid_above", None if valid_above is None else float(valid_above)),
              ("mode", mode), ("fill", float(fill)),
              ("stop_gradient", bool(stop_gradient_threshold)), ("activation", activation),
              ("rows_per_block", rows_per_block), ("num_warps", num_warps),
              ("programs_per_row", programs_per_row), ("interpret", interpret), ("poison", poison))
    return _topk(x, static)


def statistical_topk(x: jax.Array, *, k: Any = None, k_frac: Any = None, axis: int = -1,
                     mode: str = "soft", fill: float = 0.0, where: jax.Array | None = None,
                     valid_above: float | None = None,
                     stop_gradient_threshold: bool = False, impl: str = "auto",
                     backend: str | None = None, interpret: bool = False) -> jax.Array:
    """:func:`sparsejax.topk.statistical_topk` by the kernel or by XLA, as ``impl`` says.

    Args:
      x, k, k_frac, axis, mode, fill, where, stop_gradient_threshold: as
        :func:`sparsejax.topk.statistical_topk`.
      valid_above: ``where=x > valid_above`` in the form the kernel takes (masked attention
        scores); not with ``where``.
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
    kernel_where = where
    if valid_above is not None:
        if where is not None:
            raise ValueError("statistical_topk: give where= or valid_above=, not both")
        where = x > jnp.asarray(valid_above, x.dtype)
        kernel_where = None       # the kernel forms it from x itself
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
        reason = supported(rows, k=k, k_frac=k_frac, mode=mode, where=kernel_where,
                           valid_above=valid_above, backend=backend, interpret=interpret)
        if reason is not None:
            raise ValueError(f"statistical_topk: impl='pallas' does not take {reason}; use impl='xla'")
    elif (axis != x.ndim - 1 or supported(rows, k=k, k_frac=k_frac, mode=mode, where=kernel_where,
                                          valid_above=valid_above, backend=backend,
                                          interpret=interpret) is not None):
        return reference()
    out = statistical_topk_pallas(rows, k=k, k_frac=k_frac, mode=mode, fill=fill,
                                  stop_gradient_threshold=stop_gradient_threshold,
                                  valid_above=valid_above, interpret=interpret)
    return jnp.moveaxis(out, -1, axis)
