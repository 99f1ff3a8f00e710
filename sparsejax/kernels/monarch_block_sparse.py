"""Monarch multiply as two block-sparse products, on the block-sparse kernel.

``y = P2 · blockdiag(w2) · P1 · blockdiag(w1) · x`` in fly's layout (see
:mod:`sparsejax.monarch`). With ``w1``'s rows in block-major order
(``monarch_matmul._w1_rows_block_major``: the intermediate of
input block ``i`` is ``(j, c1)``, ``q / nb`` entries per output block ``j``), both
factors are block-sparse matrices acting on token-major activations:

* ``L`` (``K_ext x nb·q``), block-diagonal: ``L[i·p + a, i·q + m] = w1r[i, m, a]``;
* ``R`` (``nb·q x nb·s``): ``R[i·q + j·(q/nb) + c1, j·s + e] = w2[j, e, i·(q/nb) + c1]``:
  output block ``j`` reads one run of ``q / nb`` intermediate entries from every input
  block, which is the permutation ``P1``.

Each keeps ``1 / nb`` of its blocks, aligned to the block-sparse kernel's ``(bk, bn)``
tiles when ``bk`` divides ``p`` and ``q / nb`` and ``bn`` divides ``q`` and ``s``.
``x @ L`` and ``(x @ L) @ R`` then run with no transpose of an activation (the einsum
path moves the intermediate for ``P1``); the product leaves in output-block-major order
(``j·s + e``) and ``P2`` (output index ``e·nb + j``) is one XLA transpose of it. The
tiles are gathered from the factors on every call (``nb·q·(p + s)`` entries, no dense
matrix); gradients are the block-sparse kernel's ``dx`` and ``dW`` at the kept blocks,
carried back to ``w1`` and ``w2`` by the gathers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.kernels import block_sparse as bs
from sparsejax.kernels.block_sparse.tables import BlockSparseWeight, tables_of
# monarch_matmul's shape helpers: the same padding, dims checks and output interleave
from sparsejax.kernels.monarch_matmul import (_blocks_in, _dims, _interleave_out,
                                              _w1_rows_block_major)

__all__ = ["monarch_matmul_block_sparse", "pack_factors", "blocks_for", "blocks_problem", "supported"]

# Block sides tried, largest first: the Mosaic GPU block-sparse kernel's (a module knob, so
# tests can run a small model through this path in interpret mode).
SIDES = (128, 64)


def _side(v: int, sides) -> int | None:
    return next((b for b in sides if v % b == 0), None)


def blocks_problem(nb: int, q: int, p: int, s: int, blocks, interleaved: int = 0) -> str | None:
    """Why ``blocks`` (``(L's block, R's block)``) do not tile these factors (``None``: they do);
    ``interleaved``: see :func:`pack_factors` (``L``'s row tiles then divide ``p / interleaved``)."""
    (lk, ln), (rk, rn) = blocks
    if q % nb:
        return f"q = {q} is not a multiple of nblocks = {nb}"
    if interleaved and p % interleaved:
        return f"p = {p} is not a multiple of the input's {interleaved} interleaved blocks"
    rows_l = ("p / interleaved", p // interleaved) if interleaved else ("p", p)
    for name, size, side in ((*rows_l, lk), ("q", q, ln), ("q / nblocks", q // nb, rk), ("s", s, rn)):
        if size % side:
            return f"block side {side} does not divide {name} = {size}"
    return None


def blocks_for(nb: int, q: int, p: int, s: int, sides=None, interleaved: int = 0):
    """``(L's block, R's block)`` for these factor sizes, or ``None`` where a side divides
    none of the sizes it must (the runs of ``R`` are ``q / nb`` long; with ``interleaved``,
    ``L``'s rows come in runs of ``p / interleaved``). ``sides``: default :data:`SIDES`."""
    sides = SIDES if sides is None else sides
    if q % nb or (interleaved and p % interleaved):
        return None
    sides_l = (_side(p // interleaved if interleaved else p, sides), _side(q, sides))
    sides_r = (_side(q // nb, sides), _side(s, sides))
    if None in sides_l or None in sides_r:
        return None
    return sides_l, sides_r


@functools.lru_cache(maxsize=None)
def _plan_l(nb: int, q: int, p: int, block: tuple[int, int], interleaved: int = 0):
    """Tables of ``L`` and, per packed block, the indices ``(i, m, a)`` of its entries in
    ``w1r`` (``L[i·p + a, i·q + m] = w1r[i, m, a]``); ``None`` where a row tile would span
    two input blocks.

    ``interleaved``: the input's features come in the order a producing Monarch site of
    that many blocks leaves them when it skips its ``P2`` (stored row ``jp·s' + e`` holds
    feature ``e·interleaved + jp``), so ``L``'s rows are permuted alike."""
    bk, bn = block
    k_ext, ct = nb * p, q // bn
    stored = np.arange(k_ext)
    if interleaved:
        sp = k_ext // interleaved
        natural = (stored % sp) * interleaved + stored // sp
    else:
        natural = stored
    tile_block = (natural // p).reshape(-1, bk)          # each row tile's input block
    if (tile_block != tile_block[:, :1]).any():
        return None
    mask = np.zeros((k_ext // bk, nb * ct), bool)
    for t, i in enumerate(tile_block[:, 0]):
        mask[t, i * ct:(i + 1) * ct] = True
    tables = tables_of(mask, (k_ext, nb * q), block)
    rows, cols = np.asarray(tables.row_of), np.asarray(tables.col_of)
    i = tile_block[rows, 0]
    a = natural[rows[:, None] * bk + np.arange(bk)] - i[:, None] * p
    m = (cols % ct)[:, None] * bn + np.arange(bn)
    return tables, (i[:, None, None], m[:, None, :], a[:, :, None])


@functools.lru_cache(maxsize=None)
def _plan_r(nb: int, q: int, s: int, block: tuple[int, int]):
    """Tables of ``R`` and, per packed block, its tile ``(j, row tile, column tile)`` of
    ``w2[j].T`` (``(q, s)``)."""
    bk, bn = block
    run = q // nb
    ct = s // bn
    n_rows = nb * q // bk
    start = np.arange(n_rows) * bk                      # first intermediate row of each block row
    i, j, c1 = start // q, (start % q) // run, start % run
    mask = np.zeros((n_rows, nb * ct), bool)
    for r in range(n_rows):
        mask[r, j[r] * ct:(j[r] + 1) * ct] = True
    tables = tables_of(mask, (nb * q, nb * s), block)
    rows, cols = np.asarray(tables.row_of), np.asarray(tables.col_of)
    # the block row's entries are w2[j, :, i * run + c1 ...]: row tile (i * run + c1) / bk
    return tables, (j[rows], (i[rows] * run + c1[rows]) // bk, cols % ct)


def _tiles(m: jax.Array, block: tuple[int, int]) -> jax.Array:
    """``(nb, R, C)`` -> ``(nb, R / bk, C / bn, bk, bn)``."""
    nb, r, c = m.shape
    bk, bn = block
    return m.reshape(nb, r // bk, bk, c // bn, bn).transpose(0, 1, 3, 2, 4)


def pack_factors(w1: jax.Array, w2: jax.Array, blocks, interleaved: int = 0
                 ) -> tuple[BlockSparseWeight, BlockSparseWeight]:
    """``(L, R)`` as :class:`BlockSparseWeight` from the factors (differentiable in them);
    ``blocks``: ``(L's block, R's block)``, e.g. from :func:`blocks_for`; ``interleaved``:
    ``L``'s rows for an input left in block-major order (see :func:`_plan_l`)."""
    nb, q, p = w1.shape
    s = w2.shape[1]
    block_l, block_r = (tuple(int(v) for v in b) for b in blocks)
    plan = _plan_l(nb, q, p, block_l, interleaved)
    if plan is None:
        raise ValueError(f"pack_factors: a row tile of {block_l[0]} spans two input blocks of the "
                         f"input interleaved by {interleaved} blocks")
    tables_l, (il, ml, al) = plan
    tables_r, (jr, rr, cr) = _plan_r(nb, q, s, block_r)
    tiles_r = _tiles(w2.transpose(0, 2, 1), block_r)
    return (BlockSparseWeight(_w1_rows_block_major(w1)[il, ml, al], tables_l),
            BlockSparseWeight(tiles_r[jr, rr, cr], tables_r))


def supported(x_shape, factors, dtype=None, *, blocks=None, interleaved_input: int = 0,
              backend: str | None = None, interpret: bool = False) -> str | None:
    """Why this path cannot run the block-sparse kernel here (``None``: it can)."""
    w1, w2 = factors["w1"], factors["w2"]
    nb, q, p = w1.shape[-3:]
    s = w2.shape[-2]
    if w1.ndim != 3:
        return "stacked factors: one layer at a time"
    if blocks is None:
        blocks = blocks_for(nb, q, p, s, interleaved=interleaved_input)
        if blocks is None:
            rows = (f"p / {interleaved_input} = {p / interleaved_input:g}" if interleaved_input
                    else f"p = {p}")
            return (f"no block side in {SIDES} (the block-sparse kernel's) divides each of {rows}, "
                    f"q = {q}, q / nblocks = {q / nb:g} and s = {s}")
    why = blocks_problem(nb, q, p, s, blocks, interleaved_input)
    if why is not None:
        return why
    dtype = dtype or jnp.result_type(w1.dtype, w2.dtype)
    for shape, block in (((nb * p, nb * q), blocks[0]), ((nb * q, nb * s), blocks[1])):
        why = bs.supported(shape, dtype, block, backend=backend, interpret=interpret)
        if why is not None:
            return why
    return None


def monarch_matmul_block_sparse(x: jax.Array, factors, out_features: int | None = None, *,
                                blocks=None, interleaved_input: int = 0,
                                block_major_output: bool = False, backend: str | None = None,
                                interpret: bool = False, poison: bool = False) -> jax.Array:
    """``x @ W`` for Monarch factors through two block-sparse products (module doc).

    Same function as :func:`sparsejax.kernels.monarch_matmul.monarch_matmul_reference`
    (f32 accumulation, the intermediate rounded to the compute dtype); differentiable in
    ``x`` and the factors. ``blocks``: ``(L's block, R's block)`` (default
    :func:`blocks_for`; tests pass small ones).

    Two Monarch products in a row need not move the activation between them:
    ``block_major_output`` leaves this product's output without ``P2`` (feature
    ``j·s + e`` holds output ``e·nb + j``; needs ``out_features = nb·s``), and
    ``interleaved_input=nb'`` takes an input so ordered by a producer of ``nb'`` blocks
    (``L``'s rows are permuted instead). Elementwise ops between the two commute with
    the order.

    ``backend``, ``interpret``, ``poison``: as
    :func:`~sparsejax.kernels.block_sparse.block_sparse_matmul` takes them. Where no kernel applies,
    :func:`sparsejax.kernels.block_sparse.block_sparse_matmul` computes the same product
    with its plain-JAX reference.
    """
    where = "monarch_matmul_block_sparse"
    nb, q, p, s, n = _dims(x.shape[-1], factors, out_features, where)
    if interleaved_input and x.shape[-1] != nb * p:
        raise ValueError(f"{where}: an interleaved input needs all nblocks * p = {nb * p} features, "
                         f"got {x.shape[-1]}")
    if block_major_output and n != nb * s:
        raise ValueError(f"{where}: a block-major output needs out_features = nblocks * s = "
                         f"{nb * s}, got {n}")
    blocks = blocks or blocks_for(nb, q, p, s, interleaved=interleaved_input)
    why = (supported(x.shape, factors, interleaved_input=interleaved_input, backend="reference")
           if blocks is None else blocks_problem(nb, q, p, s, blocks, interleaved_input))
    if why is not None:
        raise ValueError(f"{where}: {why}")
    w1, w2 = factors["w1"], factors["w2"]
    dtype = jnp.result_type(x.dtype, w1.dtype, w2.dtype)
    left, right = pack_factors(w1.astype(dtype), w2.astype(dtype), blocks, interleaved_input)
    u = _blocks_in(x, nb, p, dtype).reshape(-1, nb * p)
    h = bs.block_sparse_matmul(u, left, backend=backend, interpret=interpret, poison=poison)
    z = bs.block_sparse_matmul(h.astype(dtype), right, backend=backend, interpret=interpret,
                               poison=poison)
    if block_major_output:
        return z.reshape(*x.shape[:-1], n)
    return _interleave_out(z.reshape(-1, nb, s), x.shape[:-1], n)
