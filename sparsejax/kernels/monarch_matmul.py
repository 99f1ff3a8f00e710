"""Monarch multiply ``y = x @ W``: a fused Mosaic GPU kernel, a tuned einsum path, the reference.

``W`` is given as fly-layout factors (see :mod:`sparsejax.monarch`):
``y = P2 · blockdiag(w2) · P1 · blockdiag(w1) · x``. Three ways to compute it, one
contract (``f(x, factors, out_features)``, differentiable in ``x`` and the factors):

* :func:`monarch_matmul_reference` -- the plain-JAX twin (two einsums and a transpose;
  autodiff for the backward).
* :func:`monarch_matmul_einsum` -- the same two batched matmuls under a ``custom_vjp``
  whose backward keeps every matmul operand in the compute dtype (bf16) with float32
  accumulation. Autodiff of the reference does not: the transpose of its
  ``astype(bf16)`` hands the backward matmuls a float32 cotangent, so they run as
  float32 GEMMs.
* :func:`monarch_matmul` -- one entry for all three (``impl=``): the fused kernel
  (Mosaic GPU: ``plgpu.kernel``, ``emit_pipeline``, ``wgmma``) where :func:`supported`
  says it runs; by default the einsum path on GPU and the reference elsewhere.

The fused kernel. One program per (token tile, output block ``j``, or a group of
blocks: ``MonarchTiles.group``; stage one then serves the whole group). Output block
``j`` reads, from every input block ``i``, only the intermediate columns
``c`` with ``(i * q + c) % nblocks == j`` (``q / nblocks`` of them when
``nblocks | q``): its slice ``h_j`` is ``T x q`` and costs ``1 / nblocks`` of the
first factor, so the programs of one token tile together compute the first factor
exactly once. Stage one writes ``h_j`` (rounded to the compute dtype, as the
reference rounds) into shared memory; stage two streams ``w2[j]`` over it, one
output tile at a time. The intermediate permutation ``P1`` is folded into the
operands (which rows of ``w1`` feed which ``h_j`` column: a reshape of the small
factors, no activation moves); the output leaves the kernel block-major
(``(T, nblocks, s)``) and the interleave ``P2`` (output index ``s * nblocks + j``)
is one XLA transpose of the output, which XLA fuses into the consumer inside a model
(a program's outputs for one ``j`` are 2-byte elements ``nblocks`` apart, which the
bulk copy engine cannot store: its inner box is at least 16 bytes).
What fits: ``h_j`` needs ``T * q * 2`` bytes of the 227 KB of shared memory (64 x
1024 at 4096 <-> 16384, nblocks 4), plus the pipeline buffers; :func:`supported`
names the reason when a shape does not fit (then the einsums are the answer).

The core every kernel call computes is ``out[t, j, e] = sum_i sum_c (sum_d u[t, i, d]
a[j, i, d, c]) b[j, i, c, e]``; the input gradient of the Monarch product is the
same core on the transposed operands, so ``backward="fused"`` runs ``dx`` through
the kernel too (the factor gradients are einsums in every mode). Which backward
pays is measured (``benchmarks/monarch_speed.py``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from sparsejax import monarch as monarch_math
from sparsejax.kernels import backends
from sparsejax.kernels._mosaic_gpu import interpret_params, swizzled as _swizzled

__all__ = ["MonarchTiles", "monarch_matmul", "monarch_matmul_einsum", "monarch_matmul_reference",
           "supported", "choose_tiles", "tiles_problem", "core_operands", "core_reference"]


def monarch_matmul_reference(x: jax.Array, factors, out_features: int | None = None) -> jax.Array:
    """Plain-JAX twin of :func:`monarch_matmul` (two einsums and a transpose)."""
    return monarch_math.matmul_reference(x, factors, out_features)


# --------------------------------------------------------------------------- shapes


def _dims(x_features: int, factors, out_features: int | None, where: str):
    w1, w2 = monarch_math._check_factors(factors, where)
    nb, q, p = w1.shape
    s = w2.shape[1]
    k_ext, n_ext = nb * p, nb * s
    out_features = n_ext if out_features is None else int(out_features)
    if x_features > k_ext:
        raise ValueError(f"{where}: x has {x_features} features, the factors take at most {k_ext} "
                         f"(nblocks={nb} x p={p})")
    if not 1 <= out_features <= n_ext:
        raise ValueError(f"{where}: out_features must be in [1, {n_ext}], got {out_features}")
    return nb, q, p, s, out_features


def _blocks_in(x: jax.Array, nb: int, p: int, dtype) -> jax.Array:
    """``(..., K)`` -> ``(T, nb, p)`` in ``dtype``, zero-padded to ``nb * p`` features."""
    u = x.reshape(-1, x.shape[-1]).astype(dtype)
    if u.shape[1] != nb * p:
        u = jnp.pad(u, ((0, 0), (0, nb * p - u.shape[1])))
    return u.reshape(-1, nb, p)


def _interleave_out(z: jax.Array, batch, out_features: int) -> jax.Array:
    """Block-major ``(T, nb, s)`` -> ``(..., N)`` with output index ``s * nb + j`` (``P2``)."""
    t, nb, s = z.shape
    return z.transpose(0, 2, 1).reshape(*batch, nb * s)[..., :out_features]


# --------------------------------------------------------------------------- einsum path


def _rounded(product, a, b, dtype, native: bool):
    """``product(a, b, preferred_element_type)`` with float32 accumulation, rounded to ``dtype``.

    ``native``: when both operands are already ``dtype``, ask for a ``dtype`` result
    directly, so the GEMM (cuBLAS accumulates bf16 products in float32) rounds in its
    epilogue and no float32 product is written to memory; otherwise a float32 product
    and a separate rounding (XLA may or may not fold it into the GEMM).
    """
    if jax.default_backend() == "cpu" and a.dtype != jnp.float32:
        # XLA:CPU has no bf16 x bf16 -> f32 dot for some batch layouts; the upcast is
        # exact (every bf16 product is exact in f32), so the result is the same.
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    elif native and a.dtype == b.dtype == jnp.dtype(dtype):
        return product(a, b, dtype)
    return product(a, b, jnp.float32).astype(dtype)


def _mm(spec, a, b, dtype, native: bool = False):
    """Einsum ``spec`` with float32 accumulation, rounded to ``dtype`` (see :func:`_rounded`)."""
    return _rounded(lambda a, b, acc: jnp.einsum(spec, a, b, preferred_element_type=acc),
                    a, b, dtype, native)


def _permute_h(h: jax.Array) -> jax.Array:
    """``h[t, i, c]`` -> ``h2[t, j, r]``: flat ``i * q + c`` read as ``(r, j)`` (``P1``)."""
    t, nb, q = h.shape
    return h.reshape(t, q, nb).transpose(0, 2, 1)


def _unpermute_h(h2: jax.Array) -> jax.Array:
    """Inverse of :func:`_permute_h` (the transpose of ``P1``)."""
    t, nb, q = h2.shape
    return h2.transpose(0, 2, 1).reshape(t, nb, q)


def _w1_rows_block_major(w1: jax.Array) -> jax.Array:
    """Rows ``c = c1 * nb + j`` of each ``w1[i]`` reordered to ``j * (q / nb) + c1`` (``nb | q``).

    Stage one then writes its intermediate as ``(t, i, j, c1)``, and ``P1`` (to
    ``(t, j, i, c1)``) swaps two major axes and moves runs of ``q / nb`` contiguous
    elements (96 bytes at 768 -> 3072, nblocks 4), where on the fly order it is a
    minor-axis transpose of 2-byte elements ``nb`` apart. Only the small factor moves;
    its gradient comes back through the same (differentiable) reshape.
    """
    nb, q, p = w1.shape
    return w1.reshape(nb, q // nb, nb, p).transpose(0, 2, 1, 3).reshape(nb, q, p)


def _swap_blocks_h(h: jax.Array) -> jax.Array:
    """``(t, a, b * c1)`` -> ``(t, b, a * c1)``: ``P1`` (and its inverse) after
    :func:`_w1_rows_block_major`; the two block axes have ``nb`` entries each."""
    t, nb, q = h.shape
    return h.reshape(t, nb, nb, q // nb).transpose(0, 2, 1, 3).reshape(t, nb, q)


def _einsum_factor_grads(g, u, w1, w2, h2, native=True, runs=False):
    """``(dh, dw1, dw2)`` of the token-major product the fused kernel computes (``g``
    ``(T, nb, s)``, ``h2`` ``(T, nb, q)``); ``g`` and all operands in ``u.dtype``."""
    dtype = u.dtype
    unpermute = _swap_blocks_h if runs else _unpermute_h
    dw2 = _mm("tjs,tjq->jsq", g, h2, w2.dtype, native)
    dh = unpermute(_mm("tjs,jsq->tjq", g, w2, dtype, native))
    dw1 = _mm("tiq,tip->iqp", dh, u, w1.dtype, native)
    return dh, dw1, dw2


def _dot(a, b, contract, batch, dtype, native: bool = False):
    """``lax.dot_general`` with float32 accumulation, rounded to ``dtype`` (see :func:`_rounded`).

    The product comes out in dot_general's own order (batch axes, then ``a``'s free axes,
    then ``b``'s), which is the layout a GEMM writes: an einsum that names another output
    order adds a transpose of the whole product after it.
    """
    return _rounded(lambda a, b, acc: jax.lax.dot_general(a, b, (contract, batch),
                                                          preferred_element_type=acc),
                    a, b, dtype, native)


def _p1_batch_major(h: jax.Array, runs: bool) -> jax.Array:
    """``P1`` between batch-major stages: ``h[i, t, c]`` -> ``h2[j, t, r]``, the flat
    ``i * q + c`` read as ``(r, j)``. One transpose of the intermediate: with block-major
    ``w1`` rows (``runs``) it moves contiguous runs ``(i, t, j, c1) -> (j, t, i, c1)``; on
    the fly order ``(i, t, c1, j) -> (j, t, i, c1)``, the minor axis moving. When ``nb``
    does not divide ``q`` the flat index is regrouped through token-major order."""
    nb, t, q = h.shape
    if runs:
        return h.reshape(nb, t, nb, q // nb).transpose(2, 1, 0, 3).reshape(nb, t, q)
    if q % nb == 0:
        return h.reshape(nb, t, q // nb, nb).transpose(3, 1, 0, 2).reshape(nb, t, q)
    return h.transpose(1, 0, 2).reshape(t, q, nb).transpose(2, 0, 1)


def _p1t_batch_major(h2: jax.Array, runs: bool) -> jax.Array:
    """The transpose (inverse) of :func:`_p1_batch_major`: ``(j, t, r)`` -> ``(i, t, c)``."""
    nb, t, q = h2.shape
    if runs:
        return h2.reshape(nb, t, nb, q // nb).transpose(2, 1, 0, 3).reshape(nb, t, q)
    if q % nb == 0:
        return h2.reshape(nb, t, nb, q // nb).transpose(2, 1, 3, 0).reshape(nb, t, q)
    return h2.transpose(1, 2, 0).reshape(t, nb, q).transpose(1, 0, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _einsum_blocks(u, w1, w2, native, runs=False):
    """``(T, nb, p)`` -> ``z (nb, T, s)``, output block major; every matmul in ``u.dtype``,
    f32 accumulation.

    Every product is used in the order its GEMM writes it (the batch axis, the block,
    major), and ``x`` is read in place (its input blocks are ``(T, p)`` slices with row
    stride ``K``, a layout XLA's GPU GEMMs accept for a batch axis between rows and
    columns). So the program names only the activation moves the permutations need: the
    intermediate (``P1``, one transpose) and the output (``P2``, in
    :func:`_interleave_batch_major`, which a consumer can fuse); the backward moves the
    cotangent, ``dh`` and ``dx`` once each. Spelled as token-major einsums, each of the
    four GEMMs was followed by a transpose of its product as well (4 named moves forward
    and 4 backward, against 2 and 3 here), which XLA removed only where it could give the
    GEMM that output layout.

    ``runs``: ``w1`` has block-major rows (:func:`_w1_rows_block_major`)."""
    return _einsum_blocks_fwd(u, w1, w2, native, runs)[0]


def _einsum_blocks_fwd(u, w1, w2, native, runs=False):
    dtype = u.dtype
    h = _dot(u, w1, ((2,), (2,)), ((1,), (0,)), dtype, native)          # (i, T, q)
    h2 = _p1_batch_major(h, runs)                                      # (j, T, q)
    z = _dot(h2, w2, ((2,), (2,)), ((0,), (0,)), dtype, native)         # (j, T, s)
    return z, (u, w1, w2, h2)


def _einsum_blocks_bwd(native, runs, residuals, g):
    u, w1, w2, h2 = residuals
    dtype = u.dtype
    g = g.astype(dtype)   # the cotangent stays in the compute dtype: bf16 GEMMs, not f32
    dw2 = _dot(g, h2, ((1,), (1,)), ((0,), (0,)), w2.dtype, native)     # (j, s, q)
    dh2 = _dot(g, w2, ((2,), (1,)), ((0,), (0,)), dtype, native)        # (j, T, q)
    dh = _p1t_batch_major(dh2, runs)                                   # (i, T, q)
    dw1 = _dot(dh, u, ((1,), (0,)), ((0,), (1,)), w1.dtype, native)     # (i, q, p)
    du = _dot(dh, w1, ((2,), (1,)), ((0,), (0,)), dtype, native)        # (i, T, p)
    return du.transpose(1, 0, 2), dw1, dw2


_einsum_blocks.defvjp(_einsum_blocks_fwd, _einsum_blocks_bwd)


def _interleave_batch_major(z: jax.Array, batch, out_features: int) -> jax.Array:
    """Output-block-major ``(nb, T, s)`` -> ``(..., N)`` with output index ``s * nb + j`` (``P2``)."""
    nb, t, s = z.shape
    return z.transpose(1, 2, 0).reshape(*batch, nb * s)[..., :out_features]


def monarch_matmul_einsum(x: jax.Array, factors, out_features: int | None = None, *,
                          native_rounding: bool = True, block_runs: bool | None = None) -> jax.Array:
    """``x @ W`` through two batched matmuls with a compute-dtype backward (see the module doc).

    Same function as :func:`monarch_matmul_reference` (f32 accumulation, the intermediate
    rounded to the compute dtype); runs on any backend. ``native_rounding``: the GEMMs
    return the compute dtype themselves (default) instead of a float32 product that is
    rounded afterwards (the reference's spelling); which is faster is measured.
    ``block_runs`` (when ``nblocks | q``): ``w1``'s rows reordered so that ``P1`` moves
    contiguous runs instead of transposing the minor axis (:func:`_w1_rows_block_major`).
    Default: when reordering ``w1`` (``nb·q·p`` elements, once per call and again for its
    gradient) moves at most an eighth of what ``P1`` moves (``T·nb·q``), i.e. ``8 p <= T``:
    768 -> 3072 at 16384 tokens, not 16384 -> 4096 at nblocks 4 (``p = 4096``).
    """
    nb, q, p, s, n = _dims(x.shape[-1], factors, out_features, "monarch_matmul_einsum")
    w1, w2 = factors["w1"], factors["w2"]
    dtype = jnp.result_type(x.dtype, w1.dtype, w2.dtype)
    u = _blocks_in(x, nb, p, dtype)
    if block_runs is None:
        block_runs = 8 * p <= u.shape[0]
    runs = bool(block_runs) and q % nb == 0
    w1 = _w1_rows_block_major(w1) if runs else w1
    z = _einsum_blocks(u, w1.astype(dtype), w2.astype(dtype), bool(native_rounding), runs)
    return _interleave_batch_major(z, x.shape[:-1], n)


# --------------------------------------------------------------------------- core operands


@functools.lru_cache(maxsize=None)
def _slot_plan(nb: int, q: int):
    """Which intermediate entries each (output block ``j``, input block ``i``) pair carries.

    Entry ``f`` of the flattened intermediate is row ``c = f % q`` of ``w1[i]``,
    ``i = f // q``, and column ``r = f // nb`` of ``w2[j]``, ``j = f % nb``. Returns
    ``(c_of, r_of, valid, width)``, each ``(nb_j, nb_i, width)``: slot ``k`` of pair
    ``(j, i)`` is entry ``c_of`` / ``r_of``; ``width`` is the most entries any pair
    has (``q / nb`` when ``nb | q``; unused slots are padding).
    """
    f = np.arange(nb * q)
    i, c, j, r = f // q, f % q, f % nb, f // nb
    counts = np.zeros((nb, nb), np.int64)
    slot = np.zeros_like(f)
    for idx in range(f.size):
        slot[idx] = counts[j[idx], i[idx]]
        counts[j[idx], i[idx]] += 1
    width = int(counts.max())
    c_of = np.zeros((nb, nb, width), np.int32)
    r_of = np.zeros((nb, nb, width), np.int32)
    valid = np.zeros((nb, nb, width), bool)
    c_of[j, i, slot], r_of[j, i, slot], valid[j, i, slot] = c, r, True
    return c_of, r_of, valid, width


def core_operands(w1: jax.Array, w2: jax.Array, width: int | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """fly factors -> the core's ``a (nb_j, nb_i, p, c)`` and ``b (nb_j, nb_i, c, s)``.

    ``c`` is the slot count of :func:`_slot_plan`, zero-padded to ``width``. When
    ``nblocks | q`` this is a reshape and transpose of the factors; otherwise a gather
    with zeros in the unused slots. Only the (small) factors move.
    """
    nb, q, p = w1.shape
    c_of, r_of, valid, c = _slot_plan(nb, q)
    width = c if width is None else width
    if q % nb == 0:
        a = w1.reshape(nb, c, nb, p).transpose(2, 0, 3, 1)       # a[j, i, d, c'] = w1[i, c'nb + j, d]
        b = w2.reshape(nb, -1, nb, c).transpose(0, 2, 3, 1)      # b[j, i, c', e] = w2[j, e, i c + c']
    else:
        i_of = np.broadcast_to(np.arange(nb)[None, :, None], c_of.shape)
        a = jnp.where(valid[..., None], w1[i_of, c_of], 0).transpose(0, 1, 3, 2)
        j_of = np.broadcast_to(np.arange(nb)[:, None, None], r_of.shape)
        b = jnp.where(valid[..., None], jnp.moveaxis(w2, 1, 2)[j_of, r_of], 0)
    if width > c:
        a = jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, width - c)))
        b = jnp.pad(b, ((0, 0), (0, 0), (0, width - c), (0, 0)))
    return a, b


def core_reference(u: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
    """Plain-JAX twin of the kernel core: ``(T, n1, d1) -> (T, n2, d2)``, h rounded to u's dtype."""
    h = _mm("tid,jidc->tjic", u, a, u.dtype)
    return _mm("tjic,jice->tje", h, b, u.dtype)


def _transposed_core_operands(a, b):
    """Operands of the core that computes the input gradient of ``core(., a, b)``."""
    return b.transpose(1, 0, 3, 2), a.transpose(1, 0, 3, 2)


# --------------------------------------------------------------------------- tiles


@dataclasses.dataclass(frozen=True)
class MonarchTiles:
    """Tiles of the fused kernel.

    Attributes:
      rows: tokens per program (the wgmma M; 64 per warpgroup instruction).
      step_in: contraction step of stage one (columns of ``u`` per pipeline step).
      chunk: intermediate columns per stage-one accumulator and per stage-two
        contraction step (the width of one ``h_j`` chunk in shared memory).
      out_cols: output columns per stage-two accumulator.
      stages: pipeline depth (copies in flight).
      group: output blocks ``j`` per program. Stage one then computes the slices of
        ``group`` blocks together (a ``group * chunk``-wide accumulator), so each token
        tile of ``u`` is read ``nblocks / group`` times instead of ``nblocks`` times.
    """

    rows: int = 64
    step_in: int = 64
    chunk: int = 64
    out_cols: int = 128
    stages: int = 2
    group: int = 1

    def smem_bytes(self, width: int, itemsize: int = 2) -> int:
        """Shared memory of one program: ``h`` of its blocks, the output tile, the larger pipeline.

        ``width``: padded intermediate columns of one output block (``nblocks * c``).
        """
        h = self.rows * width * self.group * itemsize
        out = self.rows * self.out_cols * itemsize
        stage_one = self.stages * (self.rows * self.step_in
                                   + self.step_in * self.chunk * self.group) * itemsize
        stage_two = self.stages * max(self.chunk, _STEP_K) * self.out_cols * itemsize
        return h + out + max(stage_one, stage_two) + _SMEM_SLACK


SMEM_LIMIT = 227 * 1024          # Hopper: the most shared memory one block may opt into
_STEP_K = 64                   # stage two's contraction per pipeline step (whole chunks, see _fold)
_SMEM_SLACK = 1024              # the pipelines' barriers and alignment (Mosaic counts them too)
_MAX_ACC = 64 * 256              # f32 accumulator entries per warpgroup: 128 registers a thread


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def _fold(chunk: int, chunks: int) -> int:
    """Chunks of ``h`` per stage-two pipeline step: the most that divide ``chunks`` and fit
    in ``_STEP_K`` contraction columns. Narrow chunks (16 columns at nblocks 16) would
    otherwise make every step one K=16 wgmma behind its own 4 KB copy and barrier wait."""
    return max(f for f in range(1, chunks + 1) if chunks % f == 0 and f * chunk <= max(chunk, _STEP_K))


def _pow2_at_most(v: int, cap: int, floor: int = 16) -> int:
    b = floor
    while b * 2 <= min(v, cap):
        b *= 2
    return b


def _least_padding_tile(v: int, cap: int, floor: int = 16) -> int:
    """The power of two in ``[floor, cap]`` that pads ``v`` least, the widest among equals
    (``s = 192`` at 3072 -> 768 takes 64-column tiles: 128 would pad a third of wasted work)."""
    tiles = [b for b in (2 ** e for e in range(4, 12)) if floor <= b <= _pow2_at_most(v, cap, floor)]
    return min(tiles, key=lambda b: (_round_up(v, b), -b))


def choose_tiles(nb: int, q: int, p: int, s: int, *, backward: bool = False,
                 interpret: bool = False, prefer_group: bool = False) -> MonarchTiles:
    """Tiles for a core with ``n1 = n2 = nb`` and the forward's (or, ``backward``, dx's) sizes.

    The first that fits in shared memory and the register budget, in order of
    preference: 128 rows before 64 (each weight tile serves more tokens), 3 pipeline
    stages before 2, a wide intermediate chunk before a 64-column one, then the largest
    group of output blocks per program (``prefer_group``: the group first, then rows).
    The chunk is the slot count rounded up to 16 (wgmma's bf16 K step), at most 128.
    """
    d_in, d_out = (s, p) if backward else (p, s)
    c = _slot_plan(nb, q)[3]
    wide = min(_round_up(c, 16), 128)
    step_in = _least_padding_tile(d_in, 64)
    out_cols = _least_padding_tile(d_out, 128)
    if interpret:   # fewer padded rows and stages to simulate
        return MonarchTiles(rows=64, step_in=step_in, chunk=wide, out_cols=out_cols, stages=2)
    groups = [g for g in range(nb, 0, -1) if nb % g == 0]
    candidates = []
    for rows in (128, 64):
        for stages in (3, 2):
            for chunk in dict.fromkeys((wide, min(wide, 64))):
                for group in groups:
                    candidates.append(MonarchTiles(rows=rows, step_in=step_in, chunk=chunk,
                                                   out_cols=out_cols, stages=stages, group=group))
    if prefer_group:
        candidates.sort(key=lambda t: -t.group)     # stable: the rest of the order stays
    for t in candidates:
        if tiles_problem(t, nb, c) is None:
            return t
    return MonarchTiles(rows=64, step_in=step_in, chunk=min(wide, 64), out_cols=out_cols, stages=2)


def tiles_problem(t: MonarchTiles, nb: int, c: int) -> str | None:
    """Why tiles ``t`` cannot run a core with ``nb`` blocks and ``c`` slots, or ``None``."""
    width = _round_up(c, t.chunk) * nb
    if nb % t.group:
        return f"group={t.group} does not divide nblocks={nb}"
    if t.rows % 64:
        return f"rows={t.rows} is not a multiple of 64 (wgmma M)"
    if t.group * t.chunk > 256 or t.rows * max(t.group * t.chunk, t.out_cols) > _MAX_ACC:
        return (f"accumulators of {t.rows} x {max(t.group * t.chunk, t.out_cols)} exceed the "
                f"register budget or wgmma's N <= 256")
    if t.smem_bytes(width) > SMEM_LIMIT:
        return (f"the intermediate ({t.rows} x {width * t.group}) and pipelines need "
                f"{t.smem_bytes(width) // 1024} KB of shared memory, over {SMEM_LIMIT // 1024} KB")
    return None


# --------------------------------------------------------------------------- support


_GPU_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _resolve(backend, interpret, where: str) -> str:
    return backends.resolve(backend, interpret, kernels={"gpu": backends.MOSAIC_GPU},
                            interpreted=backends.MOSAIC_GPU, where=where)


def supported(x_shape, factors, dtype=None, *, backend: str | None = None,
              interpret: bool = False, tiles: MonarchTiles | None = None) -> str | None:
    """Why the fused kernel cannot compute ``x @ W`` here, or ``None`` when it can.

    ``factors`` may hold arrays or ``jax.ShapeDtypeStruct``s. ``backend`` (kernel:
    ``"mosaic_gpu"``), ``interpret``: see :mod:`sparsejax.kernels.backends`; interpret
    mode (CPU tests) checks the same shapes as the GPU.
    """
    w1, w2 = factors["w1"], factors["w2"]
    if len(w1.shape) != 3 or len(w2.shape) != 3:
        return f"factors of shapes {w1.shape} / {w2.shape} are not 3-D (vmap stacked layers)"
    if _resolve(backend, interpret, "supported") != backends.MOSAIC_GPU:
        return (f"the fused Monarch kernel is Mosaic GPU only "
                f"(backend {backend or jax.default_backend()!r})")
    dtype = jnp.dtype(dtype or jnp.result_type(w1.dtype, w2.dtype))
    if dtype not in _GPU_DTYPES:
        return f"the fused kernel takes bfloat16/float16, not {dtype} (wgmma operands)"
    nb, q, p = w1.shape
    s = w2.shape[1]
    c = _slot_plan(nb, q)[3]
    for bwd in (False, True):
        t = tiles or choose_tiles(nb, q, p, s, backward=bwd, interpret=interpret)
        problem = tiles_problem(t, nb, c)
        if problem is not None:
            return f"{'dx' if bwd else 'forward'}: {problem}"
    if _round_up(c, 16) > 4 * c:
        return (f"q / nblocks = {c} intermediate columns per block pair would be padded to "
                f"{_round_up(c, 16)} (wgmma K step 16): over 4x the work; the einsums win")
    return None


# --------------------------------------------------------------------------- Mosaic GPU kernel


def _mgpu_core(u: jax.Array, a: jax.Array, b: jax.Array, tiles: MonarchTiles,
               interpret: bool, save_h: bool = False):
    """Mosaic GPU core: ``u (T, n1, d1)``, ``a (n2, n1, d1, c)``, ``b (n2, n1, c, d2)``.

    Every size must already be a multiple of its tile. Returns ``(T, n2, d2)``, and with
    ``save_h`` also the intermediate ``(T, n2, n1 * c)`` (each block's slice, chunk after
    chunk: the backward's residual, cheaper to write than to recompute).
    One program per (token tile, group of ``tiles.group`` output blocks); the group
    varies fastest, so the programs that share a token tile run together and read
    ``u``'s tile from L2. Shared memory holds ``h`` of the group's blocks in chunks:
    chunk ``(jg * n1 + i) * c_chunks + cc`` is columns ``cc * chunk ...`` of the slice
    block ``j0 + jg`` reads from input block ``i``.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    t_total, n1, d1 = u.shape
    n2, _, _, c = a.shape
    d2 = b.shape[3]
    rows, step_in, chunk, out_cols = tiles.rows, tiles.step_in, tiles.chunk, tiles.out_cols
    group = tiles.group
    dtype = u.dtype
    k_steps = d1 // step_in            # stage-one steps per accumulator
    c_chunks = c // chunk              # chunks per (j, i)
    chunks = n1 * c_chunks             # chunks per output block
    n_groups = n2 // group
    e_tiles = d2 // out_cols
    t_tiles = t_total // rows
    u2 = u.reshape(t_total, n1 * d1)
    # Stage one's weight for (block group, i, column chunk cc) is one (d1, group * chunk) tile.
    a2 = (a.reshape(n_groups, group, n1, d1, c_chunks, chunk).transpose(0, 2, 3, 4, 1, 5)
          .reshape(n_groups * n1 * d1, c_chunks * group * chunk))
    b2 = b.reshape(n2 * n1 * c, d2)
    # wgmma takes both shared-memory operands in one tiling (Mosaic GPU's layout inference
    # equates them: (8, swizzle / itemsize) on each operand's minor dimension), so each
    # product's swizzle must divide both A's K width and B's N width: stage one's
    # (u, a2) and stage two's (h, b2). Chunks under 64 columns (nblocks 16 at 4096 <->
    # 16384: 16 slots; 768 <-> 3072: 48) therefore take 32/64-byte swizzles on both sides.
    u_tf = a_tf = _swizzled(np.gcd(step_in, group * chunk), dtype)
    h_tf = b_tf = _swizzled(np.gcd(chunk, out_cols), dtype)
    o_tf = _swizzled(out_cols, dtype)

    def body(u_ref, a_ref, b_ref, o_ref, *refs):
        prog = jax.lax.axis_index("prog")
        ti = jax.lax.div(prog, jnp.int32(n_groups))
        jgrp = jax.lax.rem(prog, jnp.int32(n_groups))

        @functools.partial(pl.run_scoped,
                           h_smem=plgpu.SMEM((group * chunks, rows, chunk), dtype, transforms=h_tf),
                           o_smem=plgpu.SMEM((rows, out_cols), dtype, transforms=o_tf))
        def _scope(h_smem, o_smem):
            # Stage one: for input block i and column chunk cc, the slices of every block
            # of the group at once: u[tile, block i] @ a2[(jgrp, i)-rows, cc-th column tile].
            def stage_one(g, carry):
                i = jax.lax.div(g, jnp.int32(c_chunks))
                cc = jax.lax.rem(g, jnp.int32(c_chunks))
                a_row0 = (jgrp * n1 + i) * k_steps

                def acc_scope(acc_ref):
                    def step(_, u_smem, a_smem):
                        plgpu.wgmma(acc_ref, u_smem, a_smem)
                        plgpu.wgmma_wait(1)

                    plgpu.emit_pipeline(
                        step, grid=(k_steps,),
                        in_specs=[
                            plgpu.BlockSpec((rows, step_in), lambda k: (ti, i * k_steps + k),
                                            transforms=u_tf, delay_release=1),
                            plgpu.BlockSpec((step_in, group * chunk), lambda k: (a_row0 + k, cc),
                                            transforms=a_tf, delay_release=1),
                        ],
                        max_concurrent_steps=tiles.stages,
                    )(u_ref, a_ref)
                    return acc_ref[...]

                acc = pl.run_scoped(acc_scope, plgpu.ACC((rows, group * chunk), jnp.float32))
                h = acc.astype(dtype)   # rounded as the reference rounds h
                for jg in range(group):
                    part = h if group == 1 else h[:, jg * chunk:(jg + 1) * chunk]
                    h_smem[jg * chunks + g] = part
                return carry

            jax.lax.fori_loop(0, chunks, stage_one, 0)
            plgpu.commit_smem()   # h was written by ordinary stores; wgmma reads it next
            if save_h:
                h_ref = refs[0]
                for jg in range(group):
                    @pl.loop(0, chunks)
                    def _save(g, jg=jg):
                        col = ((jgrp * group + jg) * chunks + g) * chunk
                        plgpu.copy_smem_to_gmem(h_smem.at[jg * chunks + g],
                                                h_ref.at[pl.ds(ti * rows, rows), pl.ds(col, chunk)])

            # Stage two, per block j = jgrp * group + jg and output tile e:
            # out[tile, j, e-tile] = sum over chunks of h_j chunk @ b[j][chunk rows, e-tile].
            fold = _fold(chunk, chunks)

            def stage_two(idx, carry):
                jg = jax.lax.div(idx, jnp.int32(e_tiles))
                e = jax.lax.rem(idx, jnp.int32(e_tiles))
                j = jgrp * group + jg

                def acc_scope(acc_ref):
                    def step(k, b_smem):
                        # fold chunks per step: their rows of b2 are one tile (row slices of
                        # whole 8-row swizzle tiles), each chunk one wgmma.
                        for kk in range(fold):
                            b_part = b_smem if fold == 1 else b_smem.at[pl.ds(kk * chunk, chunk)]
                            plgpu.wgmma(acc_ref, h_smem.at[jg * chunks + k[0] * fold + kk], b_part)
                        plgpu.wgmma_wait(1)

                    plgpu.emit_pipeline(
                        step, grid=(chunks // fold,),
                        in_specs=[plgpu.BlockSpec((fold * chunk, out_cols),
                                                  lambda g: (j * (chunks // fold) + g, e),
                                                  transforms=b_tf, delay_release=1)],
                        max_concurrent_steps=tiles.stages,
                    )(b_ref)
                    return acc_ref[...]

                acc = pl.run_scoped(acc_scope, plgpu.ACC((rows, out_cols), jnp.float32))
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)   # the last tile left o_smem
                o_smem[...] = acc.astype(dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(
                    o_smem, o_ref.at[pl.ds(ti * rows, rows), pl.ds(j * d2 + e * out_cols, out_cols)])
                return carry

            jax.lax.fori_loop(0, group * e_tiles, stage_two, 0)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kwargs = {"interpret": interpret_params()} if interpret else {}
    out_type = [jax.ShapeDtypeStruct((t_total, n2 * d2), dtype)]
    if save_h:
        out_type.append(jax.ShapeDtypeStruct((t_total, n2 * n1 * c), dtype))
    kernel = plgpu.kernel(
        body, out_type=tuple(out_type),
        grid=(t_tiles * n_groups,), grid_names=("prog",),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **kwargs)
    outs = kernel(u2, a2, b2)
    out = outs[0].reshape(t_total, n2, d2)
    return (out, outs[1].reshape(t_total, n2, n1 * c)) if save_h else out


def _core(u, a, b, tiles: MonarchTiles, interpret: bool, save_h: bool = False):
    """The core on the kernel's padded sizes: pads ``u``/``a``/``b`` to the tiles, slices back.

    With ``save_h`` also returns the intermediate ``(T, n2, n1, c_padded)``."""
    t, n1, d1 = u.shape
    n2, _, _, c = a.shape
    d2 = b.shape[3]
    tp = _round_up(t, tiles.rows)
    d1p, cp, d2p = _round_up(d1, tiles.step_in), _round_up(c, tiles.chunk), _round_up(d2, tiles.out_cols)
    if (tp, d1p) != (t, d1):
        u = jnp.pad(u, ((0, tp - t), (0, 0), (0, d1p - d1)))
    if (d1p, cp) != (d1, c):
        a = jnp.pad(a, ((0, 0), (0, 0), (0, d1p - d1), (0, cp - c)))
    if (cp, d2p) != (c, d2):
        b = jnp.pad(b, ((0, 0), (0, 0), (0, cp - c), (0, d2p - d2)))
    if save_h:
        out, h = _mgpu_core(u, a, b, tiles, interpret, save_h=True)
        return out[:t, :, :d2], h[:t].reshape(t, n2, n1, cp)
    return _mgpu_core(u, a, b, tiles, interpret)[:t, :, :d2]


@dataclasses.dataclass(frozen=True)
class _Config:
    tiles: MonarchTiles
    tiles_dx: MonarchTiles
    backward: str            # "einsum" | "fused"
    interpret: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_blocks(u, w1, w2, cfg: _Config):
    """``(T, nb, p)`` -> block-major ``(T, nb, s)`` through the kernel."""
    a, b = core_operands(w1, w2)
    return _core(u, a, b, cfg.tiles, cfg.interpret)


def _fused_blocks_fwd(u, w1, w2, cfg):
    nb, q, _ = w1.shape
    a, b = core_operands(w1, w2)
    if q % nb:   # slots do not tile the intermediate: the backward recomputes it
        return _core(u, a, b, cfg.tiles, cfg.interpret), (u, w1, w2, None)
    # The kernel also writes h (block j's slice is h2[:, j], r = i * c + c'): a pass of
    # T x nb*q bf16, where recomputing it would cost the first factor's FLOPs again.
    z, h = _core(u, a, b, cfg.tiles, cfg.interpret, save_h=True)
    h2 = h[..., :q // nb].reshape(u.shape[0], nb, q)
    return z, (u, w1, w2, h2)


def _fused_blocks_bwd(cfg, residuals, g):
    u, w1, w2, h2 = residuals
    g = g.astype(u.dtype)
    if h2 is None:
        h2 = _permute_h(_mm("tip,iqp->tiq", u, w1, u.dtype, True))
    dh, dw1, dw2 = _einsum_factor_grads(g, u, w1, w2, h2)
    if cfg.backward == "fused":
        a, b = core_operands(w1, w2)
        at, bt = _transposed_core_operands(a, b)
        du = _core(g, at, bt, cfg.tiles_dx, cfg.interpret)
    else:
        du = _mm("tiq,iqp->tip", dh, w1, u.dtype, True)
    return du, dw1, dw2


_fused_blocks.defvjp(_fused_blocks_fwd, _fused_blocks_bwd)


# --------------------------------------------------------------------------- public


def monarch_matmul(x: jax.Array, factors, out_features: int | None = None, *,
                   backend: str | None = None, interpret: bool = False, backward: str = "einsum",
                   tiles: MonarchTiles | None = None, impl: str | None = None) -> jax.Array:
    """``x @ W`` for Monarch factors, differentiable in ``x`` and the factors.

    Args:
      x: ``(..., K)``.
      factors: ``{"w1": (nblocks, q, p), "w2": (nblocks, s, q)}`` (fly layout).
      out_features: ``N`` (default ``nblocks * s``).
      backend: ``"mosaic_gpu"``, ``"reference"`` or a platform (see
        :mod:`sparsejax.kernels.backends`); default: JAX's default platform.
      interpret: run the fused kernel in Mosaic GPU interpret mode (CPU tests; small
        shapes only, it simulates every thread; uninitialised memory reads as NaN).
      backward: ``"einsum"`` (dx, dw1, dw2 as bf16 einsums) or ``"fused"`` (dx through
        the kernel on the transposed operands; the factor gradients stay einsums).
      tiles: the forward's tiles (default :func:`choose_tiles`).
      impl: ``"kernel"``, ``"einsum"`` or ``"reference"``. Default: where ``backend``
        has the kernel (GPU), the einsum path (the kernel is a candidate that
        :mod:`sparsejax.kernels.path_choice` measures per site, not a default: it
        beats the einsums only at some shapes); the reference elsewhere.
    """
    nb, q, p, s, n = _dims(x.shape[-1], factors, out_features, "monarch_matmul")
    if backward not in ("einsum", "fused"):
        raise ValueError(f"monarch_matmul: backward must be 'einsum' or 'fused', got {backward!r}")
    if impl not in (None, "kernel", "einsum", "reference"):
        raise ValueError(f"monarch_matmul: impl must be 'kernel', 'einsum' or 'reference', got {impl!r}")
    w1, w2 = factors["w1"], factors["w2"]
    dtype = jnp.result_type(x.dtype, w1.dtype, w2.dtype)
    on_gpu = _resolve(backend, interpret, "monarch_matmul") == backends.MOSAIC_GPU
    reason = supported(x.shape, factors, dtype, backend=backend, interpret=interpret, tiles=tiles)
    if impl is None:
        impl = "einsum" if on_gpu else "reference"
    if impl == "kernel" and reason is not None:
        raise ValueError(f"monarch_matmul: impl='kernel' cannot run: {reason}")
    if impl == "reference":
        return monarch_matmul_reference(x, factors, out_features)
    if impl == "einsum":
        return monarch_matmul_einsum(x, factors, out_features)
    cfg = _Config(tiles=tiles or choose_tiles(nb, q, p, s, interpret=interpret),
                  tiles_dx=choose_tiles(nb, q, p, s, backward=True, interpret=interpret),
                  backward=backward, interpret=bool(interpret))
    u = _blocks_in(x, nb, p, dtype)
    z = _fused_blocks(u, w1.astype(dtype), w2.astype(dtype), cfg)
    return _interleave_out(z, x.shape[:-1], n)
