"""Sparse-output GEMV: ``y[:, j] = x @ W[:, j]`` only for the outputs ``j`` that are live.

The other half of a top-k FFN at decode: once the gate's top-k says which
neurons fire, the up projection is needed at those neurons only. With the
weight stored output-major, ``W_t`` of shape ``(N, K)`` (PyTorch's ``Linear``
layout; :class:`~sparsejax.kernels.spark_ffn.DecodeWeights`' ``w_up_t``),
output ``j`` reads row ``j``, contiguous, and a dead output is a row never read.
Dead outputs are written as zeros.

``"masked"`` (Pallas, Triton backend; interpret mode on CPU): one program per
``bj`` outputs loops over ``K`` in ``bk`` steps, loading its rows of ``W_t``
with the live mask (no traffic for dead rows). ``"xla_dense"``: the dense
product, then zeros where dead. ``"reference"``: float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparsejax.kernels import backends
from sparsejax.kernels._triton import compiler_params, loop, next_pow2, pad_to
from sparsejax.kernels.sparse_input_gemv import MAX_BATCH, pltriton, supported

__all__ = ["sparse_output_gemv", "sparse_output_gemv_reference", "supported", "IMPLS"]

IMPLS = ("auto", "masked", "xla_dense", "reference")


def sparse_output_gemv_reference(x: jax.Array, w_t: jax.Array, live: jax.Array, *,
                                 out_dtype=None) -> jax.Array:
    """``where(live, x @ W_t^T, 0)`` in float32, cast to ``out_dtype``."""
    out_dtype = out_dtype or jnp.result_type(x.dtype, w_t.dtype)
    y = jnp.dot(x.astype(jnp.float32), w_t.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
    return jnp.where(live, y, 0.0).astype(out_dtype)


def load_live_rows(w_ref, rows, cols, live, atomic: bool) -> jax.Array:
    """``W[rows, cols]`` as stored, dead rows zeros and never read: ``atomic`` (compiled) masks
    them out of the load, so they cost no memory traffic; interpret mode reads plainly."""
    if atomic:
        return pltriton.load(w_ref.at[rows, cols], mask=live[:, None], other=0.0,
                             eviction_policy="evict_first")
    return jnp.where(live[:, None], w_ref[rows, cols], 0)


def _sparse_output_kernel(x_ref, live_ref, w_ref, *rest, bj, bk, batch, atomic, unroll):
    y_ref = rest[-1]                     # rest[0] is the poisoned output alias in tests
    rows = pl.ds(pl.program_id(0) * bj, bj)
    live = live_ref[rows] != 0

    def step(c, acc):
        cols = pl.ds(c * bk, bk)
        w = load_live_rows(w_ref, rows, cols, live, atomic).astype(jnp.float32)
        return tuple(a + jnp.sum(w * x_ref[b, cols].astype(jnp.float32)[None, :], axis=1)
                     for b, a in enumerate(acc))

    acc = loop(w_ref.shape[1] // bk, step, tuple(jnp.zeros((bj,), jnp.float32) for _ in range(batch)),
               unroll)
    for b in range(batch):
        y_ref[pl.ds(b, 1), rows] = jnp.where(live, acc[b], 0.0)[None, :].astype(y_ref.dtype)


def live_rows_product(x_ref, w_ref, rows, live, *, bk: int, atomic: bool, unroll: bool,
                      x_offset: int = 0) -> jax.Array:
    """``x @ W_t[rows]^T`` on the tensor cores, loading the live rows of ``W_t`` only.

    ``x_ref`` holds the whole batch padded to ``b_pad >= 16`` rows (zeros past it): each K
    step is one ``(b_pad, bk) x (bk, bj)`` product, where the CUDA-core form reduces one
    product row per token. ``x_ref``'s columns from ``x_offset`` on are the input.
    Returns ``(b_pad, bj)`` float32."""
    def step(c, acc):
        cols = pl.ds(c * bk, bk)
        w = load_live_rows(w_ref, rows, cols, live, atomic)
        xs = x_ref[:, pl.ds(x_offset + c * bk, bk)].astype(w.dtype)
        return acc + jax.lax.dot_general(xs, w, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)

    return loop(w_ref.shape[1] // bk, step, jnp.zeros((x_ref.shape[0], live.shape[0]), jnp.float32),
                unroll)


def _sparse_output_mma_kernel(x_ref, live_ref, w_ref, *rest, bj, bk, atomic, unroll):
    y_ref = rest[-1]
    rows = pl.ds(pl.program_id(0) * bj, bj)
    live = live_ref[rows] != 0
    acc = live_rows_product(x_ref, w_ref, rows, live, bk=bk, atomic=atomic, unroll=unroll)
    y_ref[:, rows] = jnp.where(live[None, :], acc, 0.0).astype(y_ref.dtype)


def sparse_output_gemv(x: jax.Array, w_t: jax.Array, live: jax.Array, *, impl: str = "auto",
                       bj: int = 16, bk: int = 256, mma: bool = False, num_warps: int = 4,
                       num_stages: int = 2, unroll: bool | None = None, backend: str | None = None,
                       interpret: bool = False, poison: bool = False, out_dtype=None) -> jax.Array:
    """``where(live, x @ W_t^T, 0)``, reading only the rows of ``W_t`` whose output is live.

    Args:
      x: ``(..., K)``; the kernel takes up to ``MAX_BATCH`` rows.
      w_t: ``(N, K)``: output ``j``'s weights are row ``j``.
      live: ``(N,)`` bool or integer (non-zero: live), the outputs to compute (the union over
        the batch).
      impl: ``"auto"`` (the kernel on GPU within the batch limit, else dense XLA),
        ``"masked"``, ``"xla_dense"`` or ``"reference"``.
      bj, bk: outputs per program and the K step (powers of two; ``bk`` should divide K,
        else ``W_t`` is zero-padded per call).
      mma: multiply on the tensor cores, the batch padded to 16 rows (:func:`live_rows_product`;
        ``bj``, ``bk`` at least 16): for several tokens, where the CUDA-core form's
        per-token reductions cost more than the rows it reads.
      unroll: unroll the K loop (default: when it has at most 16 steps).
      backend, interpret: where the kernel may run (:func:`supported`; see
        :mod:`sparsejax.kernels.backends`); interpret: interpret mode (CPU tests).
      poison: NaN-fill the output first (tests).

    Returns:
      ``(..., N)`` in ``out_dtype`` (default ``result_type(x, w_t)``), zero where dead.
    """
    if impl not in IMPLS:
        raise ValueError(f"sparse_output_gemv: impl must be one of {IMPLS}, got {impl!r}")
    if w_t.ndim != 2 or x.shape[-1] != w_t.shape[1] or live.shape != (w_t.shape[0],):
        raise ValueError(f"sparse_output_gemv: need x (..., K), w_t (N, K) and live (N,); got x "
                         f"{x.shape}, w_t {w_t.shape}, live {live.shape}")
    out_dtype = out_dtype or jnp.result_type(x.dtype, w_t.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    batch = x2.shape[0]
    n, k = w_t.shape
    why = supported(w_t.shape, w_t.dtype, batch, backend=backend, interpret=interpret)
    if impl == "auto":
        impl = "masked" if why is None else "xla_dense"
    if impl == "reference":
        return sparse_output_gemv_reference(x2, w_t, live, out_dtype=out_dtype).reshape(*lead, n)
    if impl == "xla_dense":
        y = jnp.dot(x2, w_t.T, preferred_element_type=jnp.float32)
        return jnp.where(live, y, 0.0).astype(out_dtype).reshape(*lead, n)
    if why is not None:
        raise ValueError(f"sparse_output_gemv: impl='masked' cannot run here ({why}); use impl='auto'")
    for name, v in dict(bj=bj, bk=bk).items():
        if v <= 0 or v & (v - 1):
            raise ValueError(f"sparse_output_gemv: {name} must be a power of two, got {v}")
    if mma and min(bj, bk) < 16:
        raise ValueError(f"sparse_output_gemv: mma=True needs bj, bk >= 16, got bj={bj}, bk={bk}")
    b_pad = max(16, next_pow2(batch)) if mma else next_pow2(batch)
    wp = pad_to(pad_to(w_t, 1, bk), 0, bj)        # decode shapes (multiples of 256) copy nothing
    xp = jnp.pad(x2.astype(w_t.dtype), ((0, b_pad - batch), (0, wp.shape[1] - k)))
    livep = pad_to(live.astype(jnp.int32), 0, bj)
    # Unpadded, the kernel writes the result's dtype itself: no slice and cast after it (a
    # launch of its own wherever XLA cannot fuse it into the consumer).
    exact = b_pad == batch and wp.shape[0] == n
    out = jax.ShapeDtypeStruct((b_pad, wp.shape[0]), out_dtype if exact else jnp.float32)
    args, aliases = [xp, livep, wp], {}
    if poison:
        aliases = backends.poison_output(args, out)
    n_k = wp.shape[1] // bk
    unroll = n_k <= 16 if unroll is None else bool(unroll)
    if mma:
        kernel = functools.partial(_sparse_output_mma_kernel, bj=bj, bk=bk, atomic=not interpret,
                                   unroll=unroll)
    else:
        kernel = functools.partial(_sparse_output_kernel, bj=bj, bk=bk, batch=batch,
                                   atomic=not interpret, unroll=unroll)
    params = {} if interpret else dict(compiler_params=compiler_params(num_warps, num_stages))
    y = pl.pallas_call(kernel, grid=(wp.shape[0] // bj,), out_shape=out, input_output_aliases=aliases,
                       interpret=interpret, **params)(*args)
    return (y if exact else y[:batch, :n].astype(out_dtype)).reshape(*lead, n)
