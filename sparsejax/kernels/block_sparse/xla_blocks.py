"""Block-sparse ``x @ W`` for a few rows, in XLA ops over the kept blocks alone.

At decode (one to a few tokens) the block-sparse kernels tile rows by 64 and give each program
one block column: a 4096 → 1024 weight at 10% density is 8 programs over 3-4 blocks each, and
most of the GPU waits (on an H200, 9.3 µs of device time where XLA's dense GEMV of the whole
weight took 4.9). Here every kept block is its own unit of work: gather each block's slice of
``x``, multiply it by the block (one batched product over the kept blocks), and sum the
products of each block column. The work and the bytes read are the kept blocks', spread over
as many of them as there are; XLA is free to fuse the gather into the product. A candidate at
few-row sites (:data:`MAX_ROWS`), chosen by measurement like every other path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.kernels import backends
from sparsejax.kernels.block_sparse.tables import BlockSparseWeight

__all__ = ["MAX_ROWS", "block_sparse_matmul_blocks"]


# The most rows (tokens) the path is offered at: beyond a few rows each kept block is a GEMM
# that the tiled kernels run on the tensor cores.
MAX_ROWS = 16


def block_sparse_matmul_blocks(x: jax.Array, packed: BlockSparseWeight) -> jax.Array:
    """``x @ W`` from ``packed``'s kept blocks: a gather, one batched product, a per-column sum.

    Takes static tables (:func:`~sparsejax.kernels.block_sparse.pack`) and device tables
    (:func:`~sparsejax.kernels.block_sparse.pack_stacked`, one layer: a scan slices them);
    differentiable in ``x`` and ``packed`` (XLA's own derivatives of the three steps).
    Accumulates in float32 and returns the operands' promoted dtype, as the reference does.
    """
    backends.check_packed_operands(x, packed, BlockSparseWeight, "a BlockSparseWeight (see pack)",
                                   "block_sparse_matmul_blocks")
    if packed.blocks.ndim != 3:
        raise ValueError(f"block_sparse_matmul_blocks: a stacked weight {packed.blocks.shape[:-3]} "
                         "of layers multiplies one layer at a time: slice it (e.g. in a scan)")
    t = packed.tables
    (kb, nb), (bk, bn) = t.grid, t.block
    k, n = t.shape
    dtype = jnp.result_type(x.dtype, packed.dtype)
    lead = x.shape[:-1]
    a = x.reshape(-1, k).astype(dtype)
    m = a.shape[0]
    if t.num_blocks == 0:
        return jnp.zeros((*lead, n), dtype)
    a = jnp.pad(a, ((0, 0), (0, kb * bk - k))).reshape(m, kb, bk)
    if packed.index is None:
        rows = np.asarray(t.row_of, np.int32)
        cols = np.asarray(t.col_of, np.int32)
    else:
        index = packed.index
        rows = jnp.asarray(index.row_of, jnp.int32)
        # Padded slots (past col_ptr[-1], last in packed order) go to segment nb, which the sum
        # drops: the segment ids stay sorted, as the packed order (by column) has them.
        real = jnp.arange(t.capacity) < index.col_ptr[-1]
        cols = jnp.where(real, jnp.asarray(index.col_of, jnp.int32), nb)
    slices = a[:, rows, :]                                                   # (m, blocks, bk)
    products = jnp.einsum("mbi,bij->bmj", slices, packed.blocks.astype(dtype),
                          preferred_element_type=jnp.float32)                 # (blocks, m, bn)
    y = jax.ops.segment_sum(products, cols, num_segments=nb, indices_are_sorted=True)
    y = y.transpose(1, 0, 2).reshape(m, nb * bn)[:, :n]
    return y.astype(dtype).reshape(*lead, n)
