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


def blocks_problem(nb: int, q: int, p: int, s: int, blocks) -> str | None:
    """Why ``blocks`` (``(L's block, R's block)``) do not tile these factors (``None``: they do)."""
    (lk, ln), (rk, rn) = blocks
    if q % nb:
        return f"q = {q} is not a multiple of nblocks = {nb}"
    for name, size, side in (("p", p, lk), ("q", q, ln), ("q / nblocks", q // nb, rk), ("s", s, rn)):
        if size % side:
            return f"block side {side} does not divide {name} = {size}"
    return None


def blocks_for(nb: int, q: int, p: int, s: int, sides=None):
    """``(L's block, R's block)`` for these factor sizes, or ``None`` where a side divides
    none of the sizes it must (the runs of ``R`` are ``q / nb`` long). ``sides``: default
    :data:`SIDES`."""
    sides = SIDES if sides is None else sides
    if q % nb:
        return None
    sides_l = (_side(p, sides), _side(q, sides))
    sides_r = (_side(q // nb, sides), _side(s, sides))
    if None in sides_l or None in sides_r:
        return None
    return sides_l, sides_r


@functools.lru_cache(maxsize=None)
def _plan_l(nb: int, q: int, p: int, block: tuple[int, int]):
    """Tables of ``L`` and, per packed block, its tile ``(i, row tile, column tile)`` of
    ``w1r[i].T`` (``(p, q)``)."""
    bk, bn = block
    rt, ct = p // bk, q // bn
    mask = np.zeros((nb * rt, nb * ct), bool)
    for i in range(nb):
        mask[i * rt:(i + 1) * rt, i * ct:(i + 1) * ct] = True
    tables = tables_of(mask, (nb * p, nb * q), block)
    rows, cols = np.asarray(tables.row_of), np.asarray(tables.col_of)
    return tables, (rows // rt, rows % rt, cols % ct)


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


def pack_factors(w1: jax.Array, w2: jax.Array, blocks) -> tuple[BlockSparseWeight, BlockSparseWeight]:
    """``(L, R)`` as :class:`BlockSparseWeight` from the factors (differentiable in them);
    ``blocks``: ``(L's block, R's block)``, e.g. from :func:`blocks_for`."""
    nb, q, p = w1.shape
    s = w2.shape[1]
    block_l, block_r = (tuple(int(v) for v in b) for b in blocks)
    tables_l, (il, rl, cl) = _plan_l(nb, q, p, block_l)
    tables_r, (jr, rr, cr) = _plan_r(nb, q, s, block_r)
    tiles_l = _tiles(_w1_rows_block_major(w1).transpose(0, 2, 1), block_l)
    tiles_r = _tiles(w2.transpose(0, 2, 1), block_r)
    return (BlockSparseWeight(tiles_l[il, rl, cl], tables_l),
            BlockSparseWeight(tiles_r[jr, rr, cr], tables_r))


def supported(x_shape, factors, dtype=None, *, blocks=None, backend: str | None = None,
              interpret: bool = False) -> str | None:
    """Why this path cannot run the block-sparse kernel here (``None``: it can)."""
    w1, w2 = factors["w1"], factors["w2"]
    nb, q, p = w1.shape[-3:]
    s = w2.shape[-2]
    if w1.ndim != 3:
        return "stacked factors: one layer at a time"
    if blocks is None:
        blocks = blocks_for(nb, q, p, s)
        if blocks is None:
            return (f"no block side in {SIDES} (the block-sparse kernel's) divides each of p = {p}, "
                    f"q = {q}, q / nblocks = {q / nb:g} and s = {s}")
    why = blocks_problem(nb, q, p, s, blocks)
    if why is not None:
        return why
    dtype = dtype or jnp.result_type(w1.dtype, w2.dtype)
    for shape, block in (((nb * p, nb * q), blocks[0]), ((nb * q, nb * s), blocks[1])):
        why = bs.supported(shape, dtype, block, backend=backend, interpret=interpret)
        if why is not None:
            return why
    return None


def monarch_matmul_block_sparse(x: jax.Array, factors, out_features: int | None = None, *,
                                blocks=None, backend: str | None = None,
                                interpret: bool = False, poison: bool = False) -> jax.Array:
    """``x @ W`` for Monarch factors through two block-sparse products (module doc).

    Same function as :func:`sparsejax.kernels.monarch_matmul.monarch_matmul_reference`
    (f32 accumulation, the intermediate rounded to the compute dtype); differentiable in
    ``x`` and the factors. ``blocks``: ``(L's block, R's block)`` (default
    :func:`blocks_for`; tests pass small ones). ``backend``, ``interpret``, ``poison``: as
    :func:`~sparsejax.kernels.block_sparse.block_sparse_matmul` takes them. Where no kernel applies,
    :func:`sparsejax.kernels.block_sparse.block_sparse_matmul` computes the same product
    with its plain-JAX reference.
    """
    nb, q, p, s, n = _dims(x.shape[-1], factors, out_features, "monarch_matmul_block_sparse")
    blocks = blocks or blocks_for(nb, q, p, s)
    why = (supported(x.shape, factors, blocks=blocks, backend="reference") if blocks is None
           else blocks_problem(nb, q, p, s, blocks))
    if why is not None:
        raise ValueError(f"monarch_matmul_block_sparse: {why}")
    w1, w2 = factors["w1"], factors["w2"]
    dtype = jnp.result_type(x.dtype, w1.dtype, w2.dtype)
    left, right = pack_factors(w1.astype(dtype), w2.astype(dtype), blocks)
    u = _blocks_in(x, nb, p, dtype).reshape(-1, nb * p)
    h = bs.block_sparse_matmul(u, left, backend=backend, interpret=interpret, poison=poison)
    z = bs.block_sparse_matmul(h.astype(dtype), right, backend=backend, interpret=interpret,
                               poison=poison)
    return _interleave_out(z.reshape(-1, nb, s), x.shape[:-1], n)
