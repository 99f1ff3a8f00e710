"""Block-sparse matmul ``y = x @ W``: the plain-JAX reference, dispatch to a kernel, the custom VJP.

The backward pass is a ``custom_vjp``: ``dx = dy @ W^T`` runs the forward kernel
on the transposed block structure (row tables); ``dW`` is computed at the kept
blocks only (a sampled dense-dense product, one output block per kept block).
Shapes the blocks do not divide are zero-padded; padding never changes the
answer. For device tables (:func:`.tables.pack_stacked`) the gradient of a
padded slot is zeroed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.kernels import backends, tile_tables
from sparsejax.kernels.block_sparse import mosaic_gpu, mosaic_gpu_ws, tpu
from sparsejax.kernels.block_sparse.tables import BlockIndex, BlockSparseWeight, check_block

__all__ = ["block_sparse_matmul", "block_sparse_matmul_reference", "supported", "describe"]


def block_sparse_matmul_reference(x: jax.Array, packed: BlockSparseWeight) -> jax.Array:
    """Plain-JAX twin of :func:`block_sparse_matmul`: scatter to dense, then one XLA dot."""
    _check_operands(x, packed, "block_sparse_matmul_reference")
    return backends.dense_reference(x, packed)


def _check_operands(x, packed, where: str):
    backends.check_packed_operands(x, packed, BlockSparseWeight, "a BlockSparseWeight (see pack)",
                                   where)


# --------------------------------------------------------------------------- support


_GPU_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


_KERNELS = {"gpu": backends.MOSAIC_GPU, "tpu": backends.TPU}


def _resolve(backend, interpret, where: str) -> str:
    # interpret=True alone runs the pallas_call kernel (cheap to simulate); the
    # Mosaic GPU kernels' simulation is asked for with backend="mosaic_gpu".
    return backends.resolve(backend, interpret, kernels=_KERNELS, interpreted=backends.TPU,
                            where=where)


def supported(shape, dtype, block: tuple[int, int] = (128, 128), *, backend: str | None = None,
              interpret: bool = False) -> str | None:
    """Why no kernel handles a ``(K, N)`` weight of ``dtype`` with ``block`` here (``None``: one does).

    ``backend``, ``interpret``: see :mod:`sparsejax.kernels.backends` (kernels:
    ``"mosaic_gpu"``, ``"tpu"``). Where this returns a reason,
    :func:`block_sparse_matmul` uses the plain-JAX reference (and the lowering
    pass reports why). Any ``(K, N)`` is fine: the blocks are zero-padded.
    """
    kernel = _resolve(backend, interpret, "supported")
    bk, bn = check_block(block, "supported")
    if len(tuple(shape)) != 2:
        return f"weight shape {tuple(shape)} is not a (K, N) matrix"
    dtype = jnp.dtype(dtype)
    if kernel == backends.MOSAIC_GPU:
        if dtype not in _GPU_DTYPES:
            return f"Mosaic GPU kernel takes bfloat16/float16 operands, not {dtype}"
        # One warpgroup holds a (rows, bn) and, for dW, a (bk, bn) f32 accumulator:
        # 128 x 128 is 128 registers a thread; larger tiles would spill.
        if bk not in (64, 128) or bn not in (64, 128):
            return f"block {block}: the Mosaic GPU kernel takes bk, bn in (64, 128)"
        return None
    if kernel == backends.TPU:
        # Interpret mode takes any block (CPU tests use small ones).
        if not interpret and (bk % 128 or bn % 128):
            return f"block {block}: the TPU kernel needs bk, bn multiples of 128"
        return None
    return backends.reference_reason("block-sparse", backend)


def describe(backend: str | None = None, interpret: bool = False) -> str:
    """The kernel :func:`block_sparse_matmul` runs with these arguments, in words (reports)."""
    kernel = _resolve(backend, interpret, "describe")
    if kernel == backends.MOSAIC_GPU:
        return "Mosaic GPU block-sparse kernel"
    if kernel == backends.TPU:
        return ("Pallas kernel in interpret mode" if interpret else
                "Pallas TPU block-sparse kernel (scalar prefetch)")
    return "plain-JAX reference"


# --------------------------------------------------------------------------- dispatch


@dataclasses.dataclass(frozen=True)
class _Config:
    tables: Any                     # BlockTables (static tables) or TableBounds (device tables)
    backend: str                    # "mosaic_gpu" | "tpu" (the pallas_call kernels)
    tiles: tile_tables.BlockSparseTiles
    interpret: bool
    poison: bool


def _gather_matmul(a, blocks, ptr, idx, out_dtype, cfg: _Config, steps: int):
    nb = len(ptr) - 1
    bn = blocks.shape[2]
    if blocks.shape[0] == 0:   # all-zero mask: nothing to multiply
        return jnp.zeros((a.shape[0], nb * bn), out_dtype)
    if cfg.backend == backends.MOSAIC_GPU:
        if cfg.tiles.warp_specialized and a.shape[0] % (2 * cfg.tiles.rows) == 0:
            return mosaic_gpu_ws.gather_matmul_ws(a, blocks, ptr, idx, out_dtype, cfg.tiles, cfg.interpret)
        return mosaic_gpu.gather_matmul(a, blocks, ptr, idx, out_dtype, cfg.tiles, cfg.interpret)
    out = tpu.gather_matmul(a, blocks, ptr, idx, rows=cfg.tiles.rows, steps=steps,
                                interpret=cfg.interpret, poison=cfg.poison)
    return out.astype(out_dtype)


def _sampled_matmul(a, g, rows_of, cols_of, out_dtype, cfg: _Config):
    bk, bn = cfg.tables.block
    if cfg.tables.num_blocks == 0:
        return jnp.zeros((0, bk, bn), out_dtype)
    if cfg.backend == backends.MOSAIC_GPU:
        return mosaic_gpu.sampled_matmul(a, g, rows_of, cols_of, bk, bn, out_dtype, cfg.tiles,
                                    cfg.interpret)
    out = tpu.sampled_matmul(a, g, rows_of, cols_of, bk, bn, rows=cfg.tiles.rows,
                                 interpret=cfg.interpret, poison=cfg.poison)
    return out.astype(out_dtype)


def _index(cfg: _Config, index: BlockIndex | None) -> BlockIndex:
    """The tables the kernels read: static tuples, or the device arrays a scan sliced."""
    if index is not None:
        return index
    t = cfg.tables
    return BlockIndex(t.col_ptr, t.row_of, t.col_of, t.row_ptr, t.by_row)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bsmm(a, blocks, index, cfg: _Config):
    ix = _index(cfg, index)
    return _gather_matmul(a, blocks, ix.col_ptr, ix.row_of, a.dtype, cfg, cfg.tables.max_per_col)


def _bsmm_fwd(a, blocks, index, cfg):
    return _bsmm(a, blocks, index, cfg), (a, blocks, index)


def _bsmm_bwd(cfg, residuals, g):
    a, blocks, index = residuals
    t = cfg.tables
    ix = _index(cfg, index)
    g = g.astype(a.dtype)
    # dx = dy @ W^T: the same kernel over the transposed block structure (row tables).
    if t.num_blocks == 0:
        blocks_t = jnp.zeros((0, t.block[1], t.block[0]), blocks.dtype)
    else:
        by_row = jnp.asarray(ix.by_row, jnp.int32) if index is not None else np.asarray(ix.by_row, np.int32)
        blocks_t = blocks[by_row].transpose(0, 2, 1)
    if index is None:
        tt = t.transposed()
        t_ptr, t_idx = tt.col_ptr, tt.row_of
    else:
        t_ptr, t_idx = index.row_ptr, index.col_of[index.by_row]
    da = _gather_matmul(g, blocks_t, t_ptr, t_idx, a.dtype, cfg, t.max_per_row)
    # dW only at the kept blocks; a padded slot's product is not a gradient of anything.
    dblocks = _sampled_matmul(a, g, ix.row_of, ix.col_of, blocks.dtype, cfg)
    if index is not None and t.num_blocks:
        valid = jnp.arange(t.capacity) < index.col_ptr[-1]
        dblocks = jnp.where(valid[:, None, None], dblocks, jnp.zeros((), dblocks.dtype))
    return da, dblocks, None if index is None else jax.tree.map(_zero_cotangent, index)


def _zero_cotangent(x):
    return np.zeros(jnp.shape(x), jax.dtypes.float0)


_bsmm.defvjp(_bsmm_fwd, _bsmm_bwd)


def block_sparse_matmul(x: jax.Array, packed: BlockSparseWeight, *, backend: str | None = None,
                        interpret: bool = False, poison: bool = False) -> jax.Array:
    """``x @ W`` for a packed block-sparse ``W``, differentiable in ``x`` and ``packed``.

    Args:
      x: ``(..., K)``.
      packed: from :func:`pack`.
      backend: ``"mosaic_gpu"``, ``"tpu"`` (the ``pallas_call`` kernels),
        ``"reference"``, or a platform; default: JAX's default platform's kernel
        (see :mod:`sparsejax.kernels.backends`).
      interpret: run the kernel in interpret mode on CPU (tests): alone, the
        ``pallas_call`` kernel; with ``backend="mosaic_gpu"`` the Mosaic GPU
        kernels (small shapes only: the simulation runs every thread).
      poison: fill the ``pallas_call`` kernel's outputs with NaN before it
        writes them (tests); Mosaic GPU interpret mode always does.

    Where no kernel applies (:func:`supported` says why), this is
    :func:`block_sparse_matmul_reference`.
    """
    _check_operands(x, packed, "block_sparse_matmul")
    kernel = _resolve(backend, interpret, "block_sparse_matmul")
    dtype = jnp.result_type(x.dtype, packed.dtype)
    if supported(packed.shape, dtype, packed.block, backend=kernel, interpret=interpret) is not None:
        return block_sparse_matmul_reference(x, packed)
    t = packed.tables
    (kb, _), (bk, _) = t.grid, t.block
    lead = x.shape[:-1]
    a = x.reshape(-1, x.shape[-1]).astype(dtype)
    m = a.shape[0]
    on_gpu = kernel == backends.MOSAIC_GPU
    tiles = tile_tables.block_sparse_tiles(
        "gpu" if on_gpu else ("interpret" if interpret else "tpu"), m)
    if on_gpu and interpret:   # the simulation runs every thread: keep the pipeline short
        tiles = dataclasses.replace(tiles, stages=2)
    rows = tiles.rows
    if on_gpu:
        # The dW kernel pipelines over M in steps of step_k: pad M to both.
        rows = math.lcm(rows, tiles.step_k)
    m_pad = -(-max(m, 1) // rows) * rows
    a = jnp.pad(a, ((0, m_pad - m), (0, kb * bk - a.shape[1])))
    cfg = _Config(tables=t, backend=kernel, tiles=tiles, interpret=interpret, poison=bool(poison))
    index = None
    if packed.index is not None:
        if packed.blocks.ndim != 3:
            raise ValueError(f"block_sparse_matmul: a stacked weight {packed.blocks.shape[:-3]} of "
                             "layers multiplies one layer at a time: slice it (e.g. in a scan)")
        index = BlockIndex(*(jnp.asarray(v, jnp.int32) for v in packed.index))
    y = _bsmm(a, packed.blocks.astype(dtype), index, cfg)
    return y[:m, :t.shape[1]].reshape(*lead, t.shape[1])
