"""Sparse-input GEMV: ``y = x @ W`` reading only the rows of ``W`` whose input is live.

At decode (1 to 8 tokens) a matmul is memory-bound: its cost is the bytes of
``W`` it reads. When most entries of ``x`` are zero (a ReLU or top-k FFN's
hidden activation, a TEAL/CATS-thresholded input), row ``k`` of ``W`` is needed
only if some token's ``x[:, k]`` is live, i.e. ``|x[b, k]| > threshold``. ``W``
is ``(K, N)`` row-major, so each needed row is contiguous and a skipped row is
bytes never read. Entries at or below ``threshold`` count as zero (TEAL's
semantics; ``threshold=0`` is the exact product).

Paths (``impl``), each computing :func:`sparse_input_gemv_reference`:

* ``"masked"`` (TEAL's design, Pallas on the Triton backend): a dense grid of
  ``(N / bn, K / bk)`` programs; each reads its ``bk`` entries of ``x``, and
  loads its ``(bk, bn)`` tile of ``W`` with a row mask, so dead rows issue no
  memory traffic; partial sums are added into ``y`` with atomics (``y`` starts as
  zeros). No index list, no extra launch; cost follows the live rows, at the
  granularity of ``bn``-wide row segments. ``mma=True`` multiplies on the tensor
  cores (the batch padded to 16 rows), else on the CUDA cores, row by row.
  ``steps > 1``: each program loops over ``steps`` tiles down its column strip
  before one add (fewer programs and atomics: the first H200 sweep found the
  one-tile grid's cost nearly flat in sparsity, ~20 us of latency-bound waves);
  ``partials=True``: each split writes its own partial-sum row, XLA sums them
  (no zeroed output, no atomics).
* ``"gather"`` (Pallas, Triton backend): XLA first compacts the live rows into an
  index list (:func:`live_row_list`); programs then loop over the listed rows
  only, gathering them by index. Cost follows the live count, plus the
  compaction.
* ``"rows"`` (Pallas, Triton backend): cost follows the live rows, each program
  streaming whole gathered rows. A small grid of ``programs`` row groups x
  ``col_splits`` column strips; each program compacts the live rows of its own
  contiguous ``span``-row ranges of ``x`` in registers (a cumsum of the live flags;
  slot ``t`` of the compacted list is row ``#{i: cumsum_i <= t}``), then loops over
  ``ceil(live / bc)`` chunks only, loading ``bc`` live rows of its strip per chunk
  (each a contiguous ``2 * N / col_splits``-byte segment, every loaded byte used)
  and multiplying on the CUDA cores. Dead chunks cost no iteration, no extra
  launch compacts anything, and each program writes its own partial-sum row
  (``partials``, summed by XLA with the cast fused; ``sum_in_kernel``: summed by
  the last program of each column strip) or adds into a zeroed output with
  atomics. ``compact="xla"`` instead takes XLA's global list (:func:`live_row_list`,
  an extra cumsum + scatter) and deals its chunks out round-robin (perfect
  balance, one more launch).
* ``"xla_compact"``: the same index list with a fixed ``capacity``, then
  gather + dot in XLA (``lax.cond`` to the dense product when the list
  overflows). Cost follows ``capacity``.
* ``"xla_dense"``: the dense product (the baseline every sparse path must beat).
* ``"reference"``: float32 dense, the twin of every path.

On CPU the Pallas paths run in interpret mode (tests); :func:`sparse_input_gemv`
with ``impl="auto"`` takes ``"masked"`` on GPU and the dense XLA product elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from sparsejax.kernels import backends
from sparsejax.kernels._triton import compiler_params, next_pow2, pad_to

try:   # the Triton backend's masked loads and atomics
    from jax.experimental.pallas import triton as pltriton
except ImportError:     # pragma: no cover - every supported JAX has it
    pltriton = None

__all__ = ["sparse_input_gemv", "sparse_input_gemv_reference", "live_rows", "live_row_list",
           "rows_layout", "supported", "MAX_BATCH", "IMPLS", "COMPACT"]

MAX_BATCH = 8
# The tensor-core form pads the batch to 16 rows anyway: it takes up to 16 (a caller whose
# rows are already padded to 16, as masked_ffn's, passes them whole: no slice, no pad).
MAX_MMA_BATCH = 16
IMPLS = ("auto", "masked", "gather", "rows", "xla_compact", "xla_dense", "reference")
COMPACT = ("kernel", "xla")


# --------------------------------------------------------------------------- reference


def _zero_dead(x, threshold):
    return jnp.where(jnp.abs(x) > threshold, x, jnp.zeros((), x.dtype))


def sparse_input_gemv_reference(x: jax.Array, w: jax.Array, *, threshold: float = 0.0,
                                out_dtype=None) -> jax.Array:
    """``where(|x| > threshold, x, 0) @ W`` in float32, cast to ``out_dtype``
    (default ``result_type(x, w)``)."""
    out_dtype = out_dtype or jnp.result_type(x.dtype, w.dtype)
    xz = _zero_dead(x, threshold).astype(jnp.float32)
    return jnp.dot(xz, w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST).astype(out_dtype)


def live_rows(x: jax.Array, threshold: float = 0.0) -> jax.Array:
    """``(K,)`` bool: the rows of ``W`` some token needs (the union over the batch)."""
    return jnp.any(jnp.abs(x) > threshold, axis=0)


def live_row_list(live: jax.Array, capacity: int):
    """The live rows compacted: ``idx`` ``(capacity,)`` int32 ascending (0 past the
    end) and ``count`` (the number of live rows; ``> capacity`` means overflow)."""
    k = live.shape[0]
    pos = jnp.cumsum(live.astype(jnp.int32)) - 1
    count = pos[-1] + 1
    slot = jnp.where(live & (pos < capacity), pos, capacity)            # capacity: dropped
    idx = jnp.zeros((capacity,), jnp.int32).at[slot].set(jnp.arange(k, dtype=jnp.int32), mode="drop")
    return idx, count


# --------------------------------------------------------------------------- support


_KERNELS = {"gpu": backends.TRITON}


def supported(shape, dtype, batch: int, *, backend: str | None = None,
              interpret: bool = False, mma: bool = False) -> str | None:
    """Why the Pallas paths cannot take a ``(K, N)`` weight at this batch (``None``: they can).

    ``backend`` (kernel: ``"triton"``), ``interpret``: see :mod:`sparsejax.kernels.backends`;
    ``mma``: the tensor-core form (up to ``MAX_MMA_BATCH`` rows).
    """
    kernel = backends.resolve(backend, interpret, kernels=_KERNELS, interpreted=backends.TRITON,
                              where="supported")
    if len(tuple(shape)) != 2:
        return f"weight shape {tuple(shape)} is not a (K, N) matrix"
    limit = MAX_MMA_BATCH if mma else MAX_BATCH
    if not 1 <= batch <= limit:
        return f"batch {batch} outside 1..{limit} (decode): dense XLA"
    if kernel != backends.TRITON or (pltriton is None and not interpret):
        return backends.reference_reason("sparse-input GEMV", backend, fallback="dense XLA")
    if interpret:
        return None
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32)):
        return f"no sparse-input GEMV kernel for dtype {jnp.dtype(dtype)}"
    return None


# --------------------------------------------------------------------------- kernels


def _load_x(x_ref, rows, batch, mma, threshold):
    """The live inputs at ``rows`` and the union of live rows.

    Returns ``(xz, live)``: ``xz`` is ``(B_pad, rows)`` (``mma``) or a list of ``batch``
    ``(rows,)`` vectors, zero where dead; ``live`` is ``(rows,)`` bool. Rows of ``x``
    are read one by one (no slicing of values: the Triton backend lowers few
    shape ops).
    """
    if mma:
        x = x_ref[:, rows].astype(jnp.float32)                          # (B_pad, rows)
        alive = jnp.abs(x) > threshold
        return jnp.where(alive, x, 0.0), jnp.max(alive.astype(jnp.int32), axis=0) > 0
    xs, live = [], None
    for b in range(batch):
        xb = x_ref[b, rows].astype(jnp.float32)
        alive = jnp.abs(xb) > threshold
        xs.append(jnp.where(alive, xb, 0.0))
        live = alive if live is None else live | alive
    return xs, live


def _tile_product(xz, w, batch, mma):
    """Live inputs times a ``(rows, bn)`` weight tile: ``(B_pad, bn)`` or ``batch`` ``(bn,)``."""
    if mma:     # tensor cores: (B_pad >= 16, rows) @ (rows, bn)
        return jnp.dot(xz.astype(w.dtype), w, preferred_element_type=jnp.float32)
    wf = w.astype(jnp.float32)
    return [jnp.sum(xz[b][:, None] * wf, axis=0) for b in range(batch)]


def _zero_acc(rows, bn, batch, mma):
    """A float32 accumulator for :func:`_tile_product`'s partial sums."""
    if mma:
        return jnp.zeros((rows, bn), jnp.float32)
    return tuple(jnp.zeros((bn,), jnp.float32) for _ in range(batch))


def _accumulate(acc, part, mma):
    return acc + part if mma else tuple(a + p for a, p in zip(acc, part))


def _add_out(y_ref, cols, acc, batch, mma, atomic):
    if mma:
        if atomic:
            pltriton.atomic_add(y_ref, (slice(None), cols), acc)
        else:
            y_ref[:, cols] = y_ref[:, cols] + acc
        return
    for b in range(batch):
        if atomic:
            pltriton.atomic_add(y_ref, (pl.ds(b, 1), cols), acc[b][None, :])
        else:
            y_ref[b, cols] = y_ref[b, cols] + acc[b]


def _masked_kernel(x_ref, w_ref, *rest, bk, bn, steps, threshold, batch, mma, interpret,
                   partials, unroll):
    """``steps`` ``(bk, bn)`` tiles down one column strip: load the live rows of ``W`` only,
    sum ``x_tile @ W_tile`` on chip, then add it into ``y`` once (or write it to this
    split's row of the partial sums).

    ``steps > 1`` is the fixed-cost cure: a one-tile program is a dependent chain (read
    ``x``, then the live rows of ``W``, then an acquire-release atomic), so a grid of
    thousands of them runs in latency-bound waves whatever the sparsity. Looping over
    ``steps`` tiles keeps several row loads in flight per program (pipelined by
    ``num_stages``, or all issued at once when unrolled) and divides the programs and
    the atomics by ``steps``.
    """
    y_ref = rest[-1]
    j, i = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(j * bn, bn)

    def step(c, acc):
        rows = pl.ds((i * steps + c) * bk, bk)
        xz, live = _load_x(x_ref, rows, batch, mma, threshold)
        if not interpret:
            # Dead rows are masked out of the load: no memory transaction for them.
            w = pltriton.load(w_ref.at[rows, cols], mask=live[:, None], other=0.0,
                              eviction_policy="evict_first")
        else:     # interpret mode: the same values, read plainly
            w = jnp.where(live[:, None], w_ref[rows, cols], 0)
        return _accumulate(acc, _tile_product(xz, w, batch, mma), mma)

    init = _zero_acc(x_ref.shape[0], bn, batch, mma)
    if steps == 1:
        acc = step(0, init)
    elif unroll:          # independent steps: every row load can be in flight at once
        acc = init
        for c in range(steps):
            acc = step(c, acc)
    else:
        acc = jax.lax.fori_loop(0, steps, step, init)
    if partials:
        if mma:
            y_ref[i, :, cols] = acc
        else:
            for b in range(batch):
                y_ref[i, pl.ds(b, 1), cols] = acc[b][None, :]
        return
    _add_out(y_ref, cols, acc, batch, mma, atomic=not interpret)


def _gather_kernel(meta_ref, idx_ref, x_ref, w_ref, _y_in, y_ref, *, bc, bn, splits, batch, mma,
                   atomic):
    """One column tile of one split: loop over its chunks of the live-row list."""
    j, s = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(j * bn, bn)
    count = meta_ref[0]
    chunks = (count + bc - 1) // bc
    trips = (jnp.maximum(chunks - s, 0) + splits - 1) // splits

    def chunk(t, acc):
        p0 = (s + t * splits) * bc
        live = p0 + jnp.arange(bc, dtype=jnp.int32) < count
        row = jnp.where(live, idx_ref[pl.ds(p0, bc)], 0)               # dead positions read row 0
        if mma:
            # x arrives transposed, (K, B_pad): a row gather, as for W (the Triton backend
            # cannot gather columns of a 2-D ref), then (B_pad, bc) for the tensor cores.
            xz = jnp.where(live[:, None], x_ref[row, :].astype(jnp.float32), 0.0).T
        else:
            xz = [jnp.where(live, x_ref[b, row].astype(jnp.float32), 0.0) for b in range(batch)]
        part = _tile_product(xz, w_ref[row, cols], batch, mma)           # gathered (bc, bn) rows
        return _accumulate(acc, part, mma)

    b_pad = x_ref.shape[1] if mma else x_ref.shape[0]
    acc = jax.lax.fori_loop(0, trips, chunk, _zero_acc(b_pad, bn, batch, mma))
    _add_out(y_ref, cols, acc, batch, mma, atomic)


def _rows_chunk(x_ref, w_ref, rows, valid, cols, acc, *, batch, threshold, interpret):
    """``bc`` gathered rows of ``W`` (``rows``, in bounds; slots where ``valid`` is False
    load nothing) times their inputs, added into the ``batch`` ``(bn,)`` accumulators."""
    if not interpret:
        # Each live row's strip is one contiguous segment; empty slots issue no traffic.
        w = pltriton.load(w_ref.at[rows, cols], mask=valid[:, None], other=0.0,
                          eviction_policy="evict_first")
    else:     # interpret mode: the same values, read plainly
        w = jnp.where(valid[:, None], w_ref[rows, cols], 0)
    wf = w.astype(jnp.float32)
    out = []
    for b in range(batch):
        # Gathered from global memory: the program read this range a moment ago (cached),
        # and the load issues beside the W load instead of after a register selection.
        xb = x_ref[b, rows].astype(jnp.float32)
        xb = jnp.where(valid & (jnp.abs(xb) > threshold), xb, 0.0)     # a row live for another token
        out.append(acc[b] + jnp.sum(xb[:, None] * wf, axis=0))
    return tuple(out)


def _finish_rows(rest, p, c, cols, acc, *, batch, out, n_prog, interpret):
    """Hands a program's ``batch`` ``(bn,)`` sums on, the way ``out`` says.

    * ``"partials"``: its own row of the ``(programs, B, N)`` partial sums (XLA sums them).
    * ``"atomic"``: added into the zeroed ``(B, N)`` output.
    * ``"last"``: its partial row, then a counter per column strip; the program that
      finds the count at ``programs - 1`` (the last of its strip) sums the strip's
      partials itself and writes ``y`` in the output dtype: no second launch.
    """
    if out == "atomic":
        _add_out(rest[-1], cols, acc, batch, False, atomic=not interpret)
        return
    part_ref = rest[-1] if out == "partials" else rest[-3]
    for b in range(batch):
        part_ref[p, pl.ds(b, 1), cols] = acc[b][None, :]
    if out == "partials":
        return
    y_ref, count_ref = rest[-2], rest[-1]
    if interpret:     # programs run one after another: a plain increment
        done = count_ref[c]
        count_ref[c] = done + 1
    else:
        # Every thread's partial-sum stores precede the (acquire-release, GPU-scope)
        # increment. A scalar atomic: one thread issues it and Triton hands its result
        # to every thread, so the whole program takes the same branch below.
        pltriton.debug_barrier()
        done = pltriton.atomic_add(count_ref, (c,), jnp.int32(1))
    rows = next_pow2(n_prog)
    have = jnp.arange(rows, dtype=jnp.int32) < n_prog

    @pl.when(done == n_prog - 1)
    def _sum_the_strip():
        for b in range(batch):
            if interpret:
                part = part_ref[pl.ds(0, n_prog), b, cols]
            else:
                # One load of the whole strip. No L1 line of it can be stale: only this
                # program reads the strip's partials, after the acquire above.
                part = pltriton.load(part_ref.at[pl.ds(0, rows), b, cols], mask=have[:, None],
                                     other=0.0)
            y_ref[pl.ds(b, 1), cols] = jnp.sum(part, axis=0)[None, :].astype(y_ref.dtype)


def _rows_kernel(x_ref, w_ref, *rest, k, span, bc, bn, ranges_per_program, n_ranges, threshold,
                 batch, out, n_prog, interpret):
    """One row group x one column strip: for each of its ``span``-row ranges, compact the
    live rows in registers, then stream them ``bc`` at a time.

    The compaction needs no index list in memory: with ``cs`` the inclusive cumsum of the
    range's live flags, the ``t``-th live row sits at offset ``#{i : cs_i <= t}`` (every
    row before it has ``cs <= t``, it and every later row ``cs > t``), a ``(bc, span)``
    compare and row sum per chunk. The chunk loop runs ``ceil(live / bc)`` times, so the
    program's time follows its live rows, and every loaded byte of ``W`` is used.
    """
    c, p = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(c * bn, bn)
    offsets = jnp.arange(span, dtype=jnp.int32)
    slots = jnp.arange(bc, dtype=jnp.int32)

    def one_range(g, acc):
        q = p * ranges_per_program + g
        r0 = jnp.minimum(q, n_ranges - 1) * span          # the last group's spare ranges: none live
        live = (r0 + offsets < k) & (q < n_ranges)         # rows past K never live (any threshold)
        alive = None
        for b in range(batch):
            hit = jnp.abs(x_ref[b, pl.ds(r0, span)].astype(jnp.float32)) > threshold
            alive = hit if alive is None else alive | hit
        live = live & alive
        live_i = live.astype(jnp.int32)
        cs = jnp.cumsum(live_i)
        count = jnp.sum(live_i)

        def chunk(t, acc):
            slot = t * bc + slots
            offset = jnp.sum((cs[None, :] <= slot[:, None]).astype(jnp.int32), axis=1)
            rows = jnp.minimum(r0 + offset, k - 1)         # empty slots: any in-bounds row, masked
            return _rows_chunk(x_ref, w_ref, rows, slot < count, cols, acc, batch=batch,
                               threshold=threshold, interpret=interpret)

        return jax.lax.fori_loop(0, (count + bc - 1) // bc, chunk, acc)

    acc = _zero_acc(None, bn, batch, False)
    if ranges_per_program == 1:
        acc = one_range(0, acc)
    else:
        acc = jax.lax.fori_loop(0, ranges_per_program, one_range, acc)
    _finish_rows(rest, p, c, cols, acc, batch=batch, out=out, n_prog=n_prog, interpret=interpret)


def _rows_listed_kernel(meta_ref, idx_ref, x_ref, w_ref, *rest, k, bc, bn, threshold, batch, out,
                        n_prog, interpret):
    """``compact="xla"``: chunks ``p, p + P, p + 2P, ...`` of XLA's global live-row list."""
    c, p = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(c * bn, bn)
    count = meta_ref[0]
    chunks = (count + bc - 1) // bc
    trips = (jnp.maximum(chunks - p, 0) + n_prog - 1) // n_prog
    slots = jnp.arange(bc, dtype=jnp.int32)

    def chunk(t, acc):
        p0 = (p + t * n_prog) * bc
        valid = p0 + slots < count
        rows = jnp.clip(jnp.where(valid, idx_ref[pl.ds(p0, bc)], 0), 0, k - 1)
        return _rows_chunk(x_ref, w_ref, rows, valid, cols, acc, batch=batch, threshold=threshold,
                           interpret=interpret)

    acc = jax.lax.fori_loop(0, trips, chunk, _zero_acc(None, bn, batch, False))
    _finish_rows(rest, p, c, cols, acc, batch=batch, out=out, n_prog=n_prog, interpret=interpret)


def _call(kernel, grid, args, y_rows, n_pad, *, interpret, poison, num_warps, num_stages):
    """Runs ``kernel`` over ``grid`` adding into a zeroed ``(y_rows, n_pad)`` float32 output."""
    del poison   # the output is accumulated into: it must start at zero, never at NaN
    y0 = jnp.zeros((y_rows, n_pad), jnp.float32)
    params = {} if interpret else dict(compiler_params=compiler_params(num_warps, num_stages))
    return pl.pallas_call(kernel, grid=grid, out_shape=jax.ShapeDtypeStruct(y0.shape, y0.dtype),
                          input_output_aliases={len(args): 0}, interpret=interpret,
                          **params)(*args, y0)


def _prepare(x, w, bk, bn, mma):
    batch, k = x.shape
    b_pad = max(16, next_pow2(batch)) if mma else next_pow2(batch)
    # Zero padding never changes the answer. Decode shapes (multiples of 128) need none;
    # odd shapes copy W once per call (pre-pad them to avoid it).
    w = pad_to(pad_to(w, 0, bk), 1, bn)
    xp = jnp.pad(x, ((0, b_pad - batch), (0, w.shape[0] - k)))                  # (B_pad, K_pad)
    return xp, w, b_pad


def _fit_steps(k_chunks: int, steps: int) -> int:
    """The largest power of two ``<= steps`` dividing ``k_chunks`` (no padding of ``W``)."""
    steps = max(1, min(int(steps), k_chunks))
    while k_chunks % steps:
        steps //= 2
    return max(1, steps)


def _masked(x, w, *, threshold, bk, bn, steps, partials, unroll, mma, num_warps, num_stages,
            interpret, poison):
    batch, n = x.shape[0], w.shape[1]
    xp, wp, b_pad = _prepare(x, w, bk, bn, mma)
    steps = _fit_steps(wp.shape[0] // bk, steps)
    unroll = steps <= 4 if unroll is None else bool(unroll)
    kernel = functools.partial(_masked_kernel, bk=bk, bn=bn, steps=steps, threshold=float(threshold),
                               batch=batch, mma=mma, interpret=interpret, partials=partials,
                               unroll=unroll)
    splits = wp.shape[0] // (bk * steps)
    grid = (wp.shape[1] // bn, splits)
    if not partials:
        y = _call(kernel, grid, [xp, wp], b_pad, wp.shape[1], interpret=interpret, poison=poison,
                  num_warps=num_warps, num_stages=num_stages)
        return y[:batch, :n]
    # Partial sums: every program writes its own row (no zeroed output, no atomics);
    # XLA sums the ``splits`` rows (and fuses the cast into that sum).
    out = jax.ShapeDtypeStruct((splits, b_pad, wp.shape[1]), jnp.float32)
    args, aliases = [xp, wp], {}
    if poison:      # tests: every entry must be written over the NaNs
        aliases = backends.poison_output(args, out)
    params = {} if interpret else dict(compiler_params=compiler_params(num_warps, num_stages))
    y = pl.pallas_call(kernel, grid=grid, out_shape=out, input_output_aliases=aliases,
                       interpret=interpret, **params)(*args)
    return jnp.sum(y[:, :batch, :n], axis=0)


def _gather(x, w, *, threshold, bc, bn, splits, mma, num_warps, num_stages, interpret, poison):
    batch, k = x.shape
    n = w.shape[1]
    xp, wp, b_pad = _prepare(x, w, 1, bn, mma)
    xp = _zero_dead(xp, threshold)
    idx, count = live_row_list(live_rows(x, threshold), k)
    idx = pad_to(idx, 0, bc)
    meta = jnp.reshape(count.astype(jnp.int32), (1,))
    kernel = functools.partial(_gather_kernel, bc=bc, bn=bn, splits=splits, batch=batch, mma=mma,
                               atomic=not interpret)
    grid = (wp.shape[1] // bn, splits)
    y = _call(kernel, grid, [meta, idx, xp.T if mma else xp, wp], b_pad, wp.shape[1], interpret=interpret,
              poison=poison, num_warps=num_warps, num_stages=num_stages)
    return y[:batch, :n]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rows_layout(k: int, n: int, *, span: int = 256, programs: int | None = None,
                col_splits: int = 16, compact: str = "kernel") -> dict:
    """The ``"rows"`` grid for a ``(K, N)`` weight: ``bn`` (strip width, a power of two),
    ``strips``, ``programs`` (row groups actually launched), ``ranges_per_program``
    (``compact="kernel"``) and the padded ``k_pad`` of ``x``. The launch is
    ``strips x programs`` programs; partial sums are ``(programs, B, strips * bn)`` f32."""
    bn = next_pow2(_cdiv(n, max(1, int(col_splits))))
    # A narrower power of two that divides N (within 4x) beats padding: a padded strip
    # copies W on every call (N = 2304 with 8 splits: 9 strips of 256, not 5 of 512).
    narrower = bn
    while narrower > 16 and n % narrower:
        narrower //= 2
    if n % narrower == 0 and 4 * narrower >= bn:
        bn = narrower
    strips = _cdiv(n, bn)
    if compact == "xla":
        return dict(bn=bn, strips=strips, programs=max(1, int(programs or 32)), ranges_per_program=0,
                    n_ranges=0, k_pad=k)
    n_ranges = _cdiv(k, span)
    want = n_ranges if programs is None else max(1, min(int(programs), n_ranges))
    per = _cdiv(n_ranges, want)
    return dict(bn=bn, strips=strips, programs=_cdiv(n_ranges, per), ranges_per_program=per,
                n_ranges=n_ranges, k_pad=n_ranges * span)


def _rows(x, w, *, threshold, bc, span, programs, col_splits, out, compact, num_warps, num_stages,
          interpret, poison, out_dtype):
    batch, k = x.shape
    n = w.shape[1]
    lay = rows_layout(k, n, span=span, programs=programs, col_splits=col_splits, compact=compact)
    bn, n_prog, strips = lay["bn"], lay["programs"], lay["strips"]
    # Only the column strips are padded (odd N copies W once per call; decode shapes need
    # none): rows are gathered by index and never read past K.
    wp = pad_to(w, 1, bn)
    n_pad = wp.shape[1]
    grid = (strips, n_prog)
    common = dict(k=k, bc=bc, bn=bn, threshold=float(threshold), batch=batch, out=out, n_prog=n_prog,
                  interpret=interpret)
    if compact == "kernel":
        args = [jnp.pad(x, ((0, 0), (0, lay["k_pad"] - k))) if lay["k_pad"] != k else x, wp]
        kernel = functools.partial(_rows_kernel, span=span, ranges_per_program=lay["ranges_per_program"],
                                   n_ranges=lay["n_ranges"], **common)
    else:
        idx, count = live_row_list(live_rows(x, threshold), k)
        args = [jnp.reshape(count.astype(jnp.int32), (1,)), pad_to(idx, 0, bc), x, wp]
        kernel = functools.partial(_rows_listed_kernel, **common)
    if out == "atomic":
        y = _call(kernel, grid, args, batch, n_pad, interpret=interpret, poison=poison,
                  num_warps=num_warps, num_stages=num_stages)
        return y[:, :n]
    params = {} if interpret else dict(compiler_params=compiler_params(num_warps, num_stages))
    partial_sums = jax.ShapeDtypeStruct((n_prog, batch, n_pad), jnp.float32)
    if out == "partials":
        aliases = backends.poison_output(args, partial_sums) if poison else {}
        y = pl.pallas_call(kernel, grid=grid, out_shape=partial_sums, input_output_aliases=aliases,
                           interpret=interpret, **params)(*args)
        return jnp.sum(y[:, :, :n], axis=0)
    # "last": the partial sums are scratch; y comes out summed and cast; the strip
    # counters start at zero (the only zeroed buffer).
    y_out = jax.ShapeDtypeStruct((batch, n_pad), out_dtype)
    args.append(jnp.zeros((strips,), jnp.int32))
    aliases = {len(args) - 1: 2}
    if poison:      # tests: every strip's output must be written by its last program
        args.append(jnp.full(y_out.shape, jnp.nan, out_dtype))
        aliases[len(args) - 1] = 1
    _, y, _ = pl.pallas_call(kernel, grid=grid, interpret=interpret, input_output_aliases=aliases,
                             out_shape=(partial_sums, y_out, jax.ShapeDtypeStruct((strips,), jnp.int32)),
                             **params)(*args)
    return y[:, :n]


def _xla_compact(x, w, *, threshold, capacity):
    xz = _zero_dead(x, threshold)
    idx, count = live_row_list(live_rows(x, threshold), capacity)

    def sparse(_):
        valid = jnp.arange(capacity) < count              # entries past count point at row 0
        xs = jnp.where(valid, jnp.take(xz, idx, axis=1), 0)
        return jnp.dot(xs, jnp.take(w, idx, axis=0), preferred_element_type=jnp.float32)

    def dense(_):
        return jnp.dot(xz, w, preferred_element_type=jnp.float32)

    return jax.lax.cond(count <= capacity, sparse, dense, None)


# --------------------------------------------------------------------------- wrapper


def sparse_input_gemv(x: jax.Array, w: jax.Array, *, threshold: float = 0.0, impl: str = "auto",
                      capacity: int | None = None, mma: bool | None = None, bk: int = 64,
                      bn: int = 256, steps: int = 1, partials: bool | None = None,
                      unroll: bool | None = None, bc: int = 32, splits: int = 32, span: int = 256,
                      programs: int | None = None, col_splits: int = 16, compact: str = "kernel",
                      sum_in_kernel: bool = False,
                      num_warps: int = 4, num_stages: int = 2, backend: str | None = None,
                      interpret: bool = False, poison: bool = False, out_dtype=None) -> jax.Array:
    """``where(|x| > threshold, x, 0) @ W``, reading only the rows of ``W`` some token needs.

    Args:
      x: ``(B, K)`` (leading dims are flattened); the Pallas paths take ``B <= MAX_BATCH``
        (``MAX_MMA_BATCH`` with ``mma``).
      w: ``(K, N)`` row-major: row ``k`` (contiguous) is read only if ``x[:, k]`` is live.
      threshold: inputs with ``|x| <= threshold`` count as zero (static float).
      impl: one of ``IMPLS`` (see the module doc). ``"auto"``: ``"masked"`` on GPU
        within the batch limit, the dense XLA product elsewhere.
      capacity: ``"xla_compact"`` only: length of the live-row list (default ``K``).
      mma: multiply on the tensor cores (batch padded to 16). Default ``False``: an H200
        sweep measured the CUDA-core path faster at every decode batch (the MMA pads
        the batch to 16 rows and waits on its operands).
      bk, bn: ``"masked"`` tile (rows, columns); steps: ``"masked"`` tiles per program,
        looped down the rows (fewer, longer programs; reduced to a power of two that
        divides ``K / bk``); partials: ``"masked"`` / ``"rows"`` write one partial sum
        per split / row group (summed in XLA) instead of atomics into a zeroed output
        (default: ``False`` for ``"masked"``, ``True`` for ``"rows"``); unroll: unroll
        the step loop (default: ``steps <= 4``); bc: ``"gather"`` / ``"rows"`` live rows
        per step; splits: ``"gather"`` programs per column tile.
      span, programs, col_splits, compact: ``"rows"`` only (see :func:`rows_layout`):
        ``span`` rows compacted at once in registers (a power of two; ``compact="kernel"``);
        ``programs`` row groups (default: one per ``span`` range; with ``compact="xla"``,
        default 32, chunks dealt round-robin); ``col_splits`` column strips (each
        program's ``N / col_splits`` f32 accumulators per token live in registers);
        ``compact``: ``"kernel"`` (no index list) or ``"xla"`` (:func:`live_row_list`).
      sum_in_kernel: ``"rows"`` with partial sums: the last program of each column strip
        (a counter per strip, acquire-release atomics) sums the strip's partials and
        writes ``y`` itself, saving XLA's summing launch for a zeroed counter buffer.
      num_warps, num_stages: Triton (powers of two).
      backend, interpret: where the Pallas paths may run (:func:`supported`; see
        :mod:`sparsejax.kernels.backends`); interpret: interpret mode (CPU tests).
      poison: tests: the partial-sum outputs (``partials=True``) start as NaN, so an
        entry never written shows; outputs added into with atomics must start at zero
        and are not poisoned.
      out_dtype: default ``result_type(x, w)``.

    Returns:
      ``(..., N)`` in ``out_dtype``.
    """
    if impl not in IMPLS:
        raise ValueError(f"sparse_input_gemv: impl must be one of {IMPLS}, got {impl!r}")
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"sparse_input_gemv: need x (..., K) and w (K, N) with the same K; got x "
                         f"{x.shape}, w {w.shape}")
    out_dtype = out_dtype or jnp.result_type(x.dtype, w.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    batch = x2.shape[0]
    why = supported(w.shape, w.dtype, batch, backend=backend, interpret=interpret,
                    mma=bool(mma) and impl in ("masked", "gather"))
    if impl == "auto":
        impl = "masked" if why is None else "xla_dense"
    if impl == "reference":
        y = sparse_input_gemv_reference(x2, w, threshold=threshold, out_dtype=jnp.float32)
    elif impl == "xla_dense":
        y = jnp.dot(_zero_dead(x2, threshold), w, preferred_element_type=jnp.float32)
    elif impl == "xla_compact":
        cap = w.shape[0] if capacity is None else capacity
        if not isinstance(cap, int) or not 0 < cap <= w.shape[0]:
            raise ValueError(f"sparse_input_gemv: capacity must be an int in (0, K = {w.shape[0]}], "
                             f"got {capacity!r}")
        y = _xla_compact(x2, w, threshold=threshold, capacity=cap)
    else:
        if why is not None:
            raise ValueError(f"sparse_input_gemv: impl={impl!r} cannot run here ({why}); use "
                             f"impl='auto' or 'xla_dense'")
        for name, v in dict(bk=bk, bn=bn, bc=bc, steps=steps, span=span).items():
            if not isinstance(v, int) or v <= 0 or v & (v - 1):
                raise ValueError(f"sparse_input_gemv: {name} must be a power of two, got {v!r}")
        for name, v in dict(programs=programs, col_splits=col_splits).items():
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"sparse_input_gemv: {name} must be a positive int, got {v!r}")
        if compact not in COMPACT:
            raise ValueError(f"sparse_input_gemv: compact must be one of {COMPACT}, got {compact!r}")
        mma = False if mma is None else bool(mma)
        # The kernels compare |x| > threshold in float32; the reference compares in x's
        # dtype, rounding the threshold to it (bf16(0.3) = 0.30078125). Rounded here too,
        # the two agree on every input at the boundary (the widening to f32 is exact).
        threshold = float(np.asarray(threshold, np.dtype(x2.dtype)))
        x2 = x2.astype(w.dtype)
        if impl == "masked":
            y = _masked(x2, w, threshold=threshold, bk=bk, bn=bn, steps=steps, partials=bool(partials),
                        unroll=unroll, mma=mma, num_warps=num_warps, num_stages=num_stages,
                        interpret=interpret, poison=poison)
        elif impl == "rows":
            partials = True if partials is None else bool(partials)
            if sum_in_kernel and not partials:
                raise ValueError("sparse_input_gemv: sum_in_kernel=True sums the partial sums in the "
                                 "kernel; it needs partials=True (or None), got partials=False")
            y = _rows(x2, w, threshold=threshold, bc=bc, span=span, programs=programs,
                      col_splits=col_splits, compact=compact, num_warps=num_warps,
                      num_stages=num_stages, interpret=interpret, poison=poison, out_dtype=out_dtype,
                      out="last" if sum_in_kernel else "partials" if partials else "atomic")
        else:
            y = _gather(x2, w, threshold=threshold, bc=bc, bn=bn, splits=splits, mma=mma,
                        num_warps=num_warps, num_stages=num_stages, interpret=interpret,
                        poison=poison)
    return y.astype(out_dtype).reshape(*lead, w.shape[1])
