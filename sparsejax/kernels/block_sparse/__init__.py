"""Block-sparse matmul: ``y = x @ W`` where ``W`` keeps a set of ``(bk, bn)`` blocks.

A package split by role, as jax's own Pallas ops are (megablox: gmm / ops /
common; splash attention: mask_info / kernel):

* :mod:`.tables`: :class:`BlockSparseWeight`, its index tables, :func:`pack`,
  :func:`pack_stacked` and :func:`gather_blocks` (the kept blocks of a dense
  weight, for the lowering pass).
* :mod:`.ops`: :func:`block_sparse_matmul` (dispatch to a kernel, the custom
  VJP), :func:`block_sparse_matmul_reference` and :func:`supported`.
* :mod:`.xla_blocks`: :func:`block_sparse_matmul_blocks`, the kept blocks' product in XLA
  ops for a few rows (decode): a candidate the lowering pass measures beside the kernel.
* :mod:`.tpu`: the ``pl.pallas_call`` kernels (TPU; interpret mode on CPU).
* :mod:`.mosaic_gpu`, :mod:`.mosaic_gpu_ws`: the Mosaic GPU kernels (Hopper):
  the single-warpgroup tile kernel and the dW kernel; the warp-specialized
  per-tile and persistent forward kernels.

Paths, chosen by :func:`supported` and :func:`block_sparse_matmul`:

* GPU (Hopper): Mosaic GPU kernels (``plgpu.kernel`` + ``plgpu.wgmma``): by
  default two compute warpgroups sharing each weight tile, fed by a copy
  warpgroup (``plgpu.emit_pipeline_warp_specialized``); a single-warpgroup
  ``plgpu.emit_pipeline`` kernel where M does not divide. The pipeline's trip
  count is the column's kept-block count, so empty and sparse columns cost
  nothing.
* TPU: ``pl.pallas_call`` with the tables as scalar-prefetch operands. The same
  kernel runs in interpret mode on CPU (tests).
* Elsewhere: :func:`block_sparse_matmul_reference` (scatter to dense, XLA dot).
"""

from sparsejax.kernels.block_sparse.ops import (
    block_sparse_matmul,
    block_sparse_matmul_reference,
    describe,
    supported,
)
from sparsejax.kernels.block_sparse.tables import (
    BlockIndex,
    BlockSparseWeight,
    BlockTables,
    TableBounds,
    block_mask_of,
    gather_blocks,
    gather_indexed,
    index_of,
    pack,
    pack_stacked,
    stacked_tables,
    tables_of,
)
from sparsejax.kernels.block_sparse.xla_blocks import MAX_ROWS, block_sparse_matmul_blocks

__all__ = [
    "BlockSparseWeight",
    "BlockIndex",
    "BlockTables",
    "TableBounds",
    "pack",
    "pack_stacked",
    "gather_blocks",
    "gather_indexed",
    "block_mask_of",
    "tables_of",
    "stacked_tables",
    "index_of",
    "block_sparse_matmul",
    "block_sparse_matmul_reference",
    "block_sparse_matmul_blocks",
    "MAX_ROWS",
    "supported",
    "describe",
]
