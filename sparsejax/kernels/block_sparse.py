"""Block-sparse matmul: ``y = x @ W`` where ``W`` keeps a set of ``(bk, bn)`` blocks.

Convention (as :mod:`sparsejax.layout`): ``W`` is the ``(K, N)`` matrix view,
``x`` is ``(..., K)``. :func:`pack` stores the kept blocks compactly, ordered by
block column, with index tables built once per mask (host-side, from a concrete
mask): for output column tile ``j`` the kernel iterates only over the kept
blocks of that column, so work is proportional to density.

Paths, chosen by :func:`supported` and :func:`block_sparse_matmul`:

* GPU (Hopper): Mosaic GPU kernels (``plgpu.kernel`` + ``plgpu.wgmma``): by
  default two compute warpgroups sharing each weight tile, fed by a copy
  warpgroup (``plgpu.emit_pipeline_warp_specialized``); a single-warpgroup
  ``plgpu.emit_pipeline`` kernel where M does not divide. GPU backends have no
  scalar prefetch, so the index tables are ordinary operands read from global
  memory inside the pipeline's index maps; the pipeline's trip count is the
  column's kept-block count (a dynamic grid), so empty and sparse columns cost
  nothing.
* TPU: ``pl.pallas_call`` with the tables as scalar-prefetch operands. The grid
  is padded to the longest column; steps past a column's count skip the dot.
  The same kernel runs in interpret mode on CPU (tests).
* Elsewhere: :func:`block_sparse_matmul_reference` (scatter to dense, XLA dot).

The backward pass is a ``custom_vjp``: ``dx = dy @ W^T`` runs the forward kernel
on the transposed block structure (row tables); ``dW`` is computed at the kept
blocks only (a sampled dense-dense product, one output block per kept block).
Shapes the blocks do not divide are zero-padded; padding never changes the
answer.

Stacked layers (``nn.scan``): the layer index is dynamic inside a scan, so the
tables cannot be static there. :func:`pack_stacked` pads each layer's tables to
a common static capacity and keeps them as device arrays (a :class:`BlockIndex`
beside the ``(layers, capacity, bk, bn)`` blocks); a scan slices blocks and
tables together, and the kernels read the sliced tables as operands. Only the
bounds (grid, block, capacity, longest column and row over all layers) are
static. Padded slots hold zero blocks that no column visits, and their
gradient is zeroed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from sparsejax.kernels import tile_tables

__all__ = [
    "BlockSparseWeight",
    "BlockIndex",
    "TableBounds",
    "pack",
    "pack_stacked",
    "block_sparse_matmul",
    "block_sparse_matmul_reference",
    "supported",
]


# --------------------------------------------------------------------------- packing


@dataclasses.dataclass(frozen=True)
class BlockTables:
    """Static index tables of a block mask (hashable: jit caches on them).

    Blocks are numbered in packed order: by block column ``j``, then block row.

    Attributes:
      shape: ``(K, N)`` of the unpadded matrix.
      block: ``(bk, bn)``.
      grid: ``(K_blocks, N_blocks)`` after padding.
      col_ptr: ``N_blocks + 1`` offsets: column ``j`` owns packed blocks
        ``col_ptr[j]:col_ptr[j + 1]``.
      row_of: block row of each packed block.
      col_of: block column of each packed block.
      row_ptr: ``K_blocks + 1`` offsets into ``by_row``.
      by_row: packed block ids in row-major order (the transposed structure).
    """

    shape: tuple[int, int]
    block: tuple[int, int]
    grid: tuple[int, int]
    col_ptr: tuple[int, ...]
    row_of: tuple[int, ...]
    col_of: tuple[int, ...]
    row_ptr: tuple[int, ...]
    by_row: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.row_of)

    @property
    def capacity(self) -> int:
        return self.num_blocks

    @property
    def max_per_col(self) -> int:
        return int(max(np.diff(self.col_ptr), default=0))

    @property
    def max_per_row(self) -> int:
        return int(max(np.diff(self.row_ptr), default=0))

    def transposed(self) -> "BlockTables":
        """Tables of ``W^T`` (blocks ``(bn, bk)``), packed in ``by_row`` order."""
        by_row = np.asarray(self.by_row, np.int64)
        return BlockTables(
            shape=self.shape[::-1], block=self.block[::-1], grid=self.grid[::-1],
            col_ptr=self.row_ptr,
            row_of=tuple(int(v) for v in np.asarray(self.col_of)[by_row]),
            col_of=tuple(int(v) for v in np.asarray(self.row_of)[by_row]),
            row_ptr=self.col_ptr,
            by_row=tuple(int(v) for v in np.argsort(by_row, kind="stable")),
        )


@dataclasses.dataclass(frozen=True)
class TableBounds:
    """The static facts of index tables that travel as device arrays (:class:`BlockIndex`).

    Attributes:
      shape, block, grid: as :class:`BlockTables`.
      capacity: packed slots per layer (the most kept blocks of any layer).
      max_per_col, max_per_row: the longest block column / row of any layer
        (the ``pallas_call`` kernels' static grid).
    """

    shape: tuple[int, int]
    block: tuple[int, int]
    grid: tuple[int, int]
    capacity: int
    max_per_col: int
    max_per_row: int

    @property
    def num_blocks(self) -> int:
        return self.capacity


class BlockIndex(NamedTuple):
    """Index tables as int32 arrays (the fields of :class:`BlockTables`), padded to a capacity.

    ``col_ptr[-1]`` is the number of real blocks; slots past it are padding:
    ``row_of = col_of = 0`` there, ``by_row`` lists them last, and no column's
    range reaches them. Leading axes (layers) are allowed: a scan slices them.
    """

    col_ptr: Any
    row_of: Any
    col_of: Any
    row_ptr: Any
    by_row: Any


def index_of(tables: BlockTables, capacity: int | None = None) -> BlockIndex:
    """``tables`` as a numpy :class:`BlockIndex`, padded to ``capacity`` slots."""
    n = tables.num_blocks
    capacity = n if capacity is None else capacity
    if capacity < n:
        raise ValueError(f"index_of: capacity {capacity} is below the {n} kept blocks")
    pad = lambda v: np.concatenate([np.asarray(v, np.int32), np.zeros(capacity - n, np.int32)])
    by_row = np.concatenate([np.asarray(tables.by_row, np.int32),
                             np.arange(n, capacity, dtype=np.int32)])
    return BlockIndex(np.asarray(tables.col_ptr, np.int32), pad(tables.row_of), pad(tables.col_of),
                      np.asarray(tables.row_ptr, np.int32), by_row)


@jax.tree_util.register_pytree_node_class
class BlockSparseWeight:
    """A ``(K, N)`` weight that keeps only some ``(bk, bn)`` blocks.

    A pytree whose leaf is ``blocks`` (``(num_blocks, bk, bn)``, packed by
    block column) and, for per-layer tables, ``index``. Two forms:

    * static tables (:func:`pack`): ``tables`` is a :class:`BlockTables`,
      ``index`` is None; jit specializes on the mask.
    * device tables (:func:`pack_stacked`): ``tables`` is a :class:`TableBounds`,
      ``index`` a :class:`BlockIndex` of int32 arrays; ``blocks`` is
      ``(*layers, capacity, bk, bn)`` and a scan slices layers off blocks and
      index together.

    Gradients with respect to it are again a ``BlockSparseWeight``, holding
    ``dW`` at the kept blocks.
    """

    def __init__(self, blocks: jax.Array, tables, index: BlockIndex | None = None):
        self.blocks = blocks
        self.tables = tables
        self.index = index

    def tree_flatten(self):
        return (self.blocks, self.index), self.tables

    @classmethod
    def tree_unflatten(cls, tables, children):
        return cls(children[0], tables, children[1])

    @property
    def shape(self) -> tuple[int, int]:
        return self.tables.shape

    @property
    def block(self) -> tuple[int, int]:
        return self.tables.block

    @property
    def dtype(self):
        return self.blocks.dtype

    @property
    def density(self) -> float:
        """Kept blocks over all blocks of the padded grid (mean over layers; concrete tables)."""
        kb, nb = self.tables.grid
        if self.index is None:
            return self.tables.num_blocks / (kb * nb)
        return float(np.mean(np.asarray(self.index.col_ptr)[..., -1])) / (kb * nb)

    def block_mask(self) -> np.ndarray:
        """``(K_blocks, N_blocks)`` boolean mask of kept blocks (``(*layers, ...)`` for device tables)."""
        if self.index is not None:
            ptr, rows, cols = (np.asarray(a) for a in self.index[:3])
            lead = ptr.shape[:-1]
            out = np.zeros((*lead, *self.tables.grid), bool)
            for layer in np.ndindex(*lead):
                n = int(ptr[layer][-1])
                out[layer][rows[layer][:n], cols[layer][:n]] = True
            return out
        mask = np.zeros(self.tables.grid, bool)
        mask[np.asarray(self.tables.row_of, np.int64), np.asarray(self.tables.col_of, np.int64)] = True
        return mask

    def to_dense(self) -> jax.Array:
        """The ``(K, N)`` matrix (``(*layers, K, N)``), zeros outside the kept blocks."""
        (kb, nb), (bk, bn) = self.tables.grid, self.tables.block
        if self.index is not None:
            lead = self.blocks.shape[:-3]
            one = lambda blocks, index: BlockSparseWeight(blocks, self.tables, index).to_dense()
            for _ in lead:
                one = jax.vmap(one)
            if lead:
                return one(self.blocks, self.index)
            grid = jnp.zeros((kb, nb, bk, bn), self.blocks.dtype)
            # Padded slots hold zero blocks at (0, 0): adding them changes nothing.
            grid = grid.at[self.index.row_of, self.index.col_of].add(self.blocks)
            k, n = self.tables.shape
            return grid.transpose(0, 2, 1, 3).reshape(kb * bk, nb * bn)[:k, :n]
        grid = jnp.zeros((kb, nb, bk, bn), self.blocks.dtype)
        if self.tables.num_blocks:
            rows = np.asarray(self.tables.row_of, np.int32)
            cols = np.asarray(self.tables.col_of, np.int32)
            grid = grid.at[rows, cols].set(self.blocks)
        dense = grid.transpose(0, 2, 1, 3).reshape(kb * bk, nb * bn)
        k, n = self.tables.shape
        return dense[:k, :n]

    def __repr__(self):
        per = "per layer, device tables" if self.index is not None else ""
        return (f"BlockSparseWeight(shape={self.shape}, block={self.block}, "
                f"blocks={self.tables.num_blocks}/{math.prod(self.tables.grid)}{per and ' ' + per}, "
                f"dtype={self.dtype})")


def _check_block(block, where: str) -> tuple[int, int]:
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, (int, np.integer)) and b > 0 for b in block)):
        raise ValueError(f"{where}: block must be a pair of positive ints (bk, bn), got {block!r}")
    return int(block[0]), int(block[1])


def block_mask_of(mask, shape: tuple[int, int], block: tuple[int, int]) -> np.ndarray:
    """A concrete ``(K, N)`` element mask or ``(K_blocks, N_blocks)`` block mask -> block mask.

    An element mask must keep each block whole (the part inside the matrix), or
    packing would change the function: a ValueError says which block is split.
    """
    try:
        mask = np.asarray(mask)
    except jax.errors.TracerArrayConversionError as e:
        raise TypeError("pack: mask must be concrete (index tables are built once, on the host); "
                        "got a traced array") from e
    k, n = shape
    bk, bn = block
    kb, nb = -(-k // bk), -(-n // bn)
    if mask.ndim != 2:
        raise ValueError(f"pack: mask must be 2-D, got shape {mask.shape}")
    mask = mask.astype(bool)
    if mask.shape == (k, n):
        padded = np.zeros((kb * bk, nb * bn), bool)
        padded[:k, :n] = mask
        inside = np.zeros_like(padded)
        inside[:k, :n] = True
        tiles = padded.reshape(kb, bk, nb, bn).transpose(0, 2, 1, 3)
        inside_t = inside.reshape(kb, bk, nb, bn).transpose(0, 2, 1, 3)
        any_kept = tiles.any(axis=(2, 3))
        whole = (tiles == inside_t).all(axis=(2, 3))
        split = any_kept & ~whole
        if split.any():
            r, c = np.argwhere(split)[0]
            raise ValueError(f"pack: mask is not block-structured for block={block}: block "
                             f"({r}, {c}) is partly kept")
        return any_kept
    if mask.shape == (kb, nb):
        return mask
    raise ValueError(f"pack: mask shape {mask.shape} is neither the weight shape {shape} nor "
                     f"its block grid {(kb, nb)} for block={block}")


def tables_of(block_mask: np.ndarray, shape: tuple[int, int], block: tuple[int, int]) -> BlockTables:
    """Index tables of a concrete block mask."""
    kb, nb = block_mask.shape
    cols, rows = np.nonzero(block_mask.T)          # column-major order: by column, then row
    counts = np.bincount(cols, minlength=nb)
    col_ptr = np.concatenate([[0], np.cumsum(counts)])
    by_row = np.lexsort((cols, rows))              # row-major order of the packed ids
    row_counts = np.bincount(rows, minlength=kb)
    row_ptr = np.concatenate([[0], np.cumsum(row_counts)])
    as_tuple = lambda a: tuple(int(v) for v in a)
    return BlockTables(shape=tuple(int(s) for s in shape), block=block, grid=(kb, nb),
                       col_ptr=as_tuple(col_ptr), row_of=as_tuple(rows), col_of=as_tuple(cols),
                       row_ptr=as_tuple(row_ptr), by_row=as_tuple(by_row))


def _gather_blocks(w: jax.Array, tables: BlockTables) -> jax.Array:
    (kb, nb), (bk, bn) = tables.grid, tables.block
    k, n = tables.shape
    wp = jnp.pad(w, ((0, kb * bk - k), (0, nb * bn - n)))
    grid = wp.reshape(kb, bk, nb, bn).transpose(0, 2, 1, 3)
    return grid[np.asarray(tables.row_of, np.int32), np.asarray(tables.col_of, np.int32)]


def gather_indexed(w: jax.Array, bounds: TableBounds, index: BlockIndex) -> jax.Array:
    """Kept blocks of ``w`` (``(*layers, K, N)``) by device tables; padded slots are zero.

    Differentiable in ``w``: the gradient of a padded slot is multiplied by zero,
    so it never reaches block ``(0, 0)``.
    """
    (kb, nb), (bk, bn) = bounds.grid, bounds.block
    k, n = bounds.shape
    lead = w.shape[:-2]
    wp = jnp.pad(w, ((0, 0),) * len(lead) + ((0, kb * bk - k), (0, nb * bn - n)))
    grid = wp.reshape(*lead, kb, bk, nb, bn)
    grid = jnp.moveaxis(grid, -3, -2)                        # (*lead, kb, nb, bk, bn)

    def one(grid, index):
        valid = jnp.arange(bounds.capacity) < index.col_ptr[-1]
        blocks = grid[index.row_of, index.col_of]
        return jnp.where(valid[:, None, None], blocks, jnp.zeros((), blocks.dtype))

    for _ in lead:
        one = jax.vmap(one)
    return one(grid, index)


def pack_stacked(w: jax.Array, mask, block: tuple[int, int], *, capacity: int | None = None
                 ) -> BlockSparseWeight:
    """Packs a stack of layers ``w`` (``(L, K, N)``) with per-layer tables held as device arrays.

    Args:
      w: ``(L, K, N)``; may be traced.
      mask: concrete ``(L, K, N)`` element masks or ``(L, K_blocks, N_blocks)`` block masks.
      block: ``(bk, bn)``.
      capacity: packed slots per layer (default: the most kept blocks of any layer).

    A scan over the result's leading axis gives each layer a ``BlockSparseWeight``
    whose tables are sliced device arrays, which :func:`block_sparse_matmul` takes.
    """
    block = _check_block(block, "pack_stacked")
    if getattr(w, "ndim", None) != 3:
        raise ValueError(f"pack_stacked: w must be (layers, K, N), got shape {getattr(w, 'shape', None)}")
    shape = tuple(int(s) for s in w.shape[1:])
    mask = np.asarray(mask)
    if mask.ndim != 3 or mask.shape[0] != w.shape[0]:
        raise ValueError(f"pack_stacked: mask must be (layers, ...) with {w.shape[0]} layers, got "
                         f"shape {mask.shape}")
    bounds, index = stacked_tables([block_mask_of(m, shape, block) for m in mask], shape, block,
                                   capacity)
    return BlockSparseWeight(gather_indexed(jnp.asarray(w), bounds, index), bounds, index)


def stacked_tables(block_masks, shape: tuple[int, int], block: tuple[int, int],
                   capacity: int | None = None) -> tuple[TableBounds, BlockIndex]:
    """Per-layer tables of concrete block masks, padded to a common capacity, stacked (numpy)."""
    tables = [tables_of(np.asarray(b, bool), shape, block) for b in block_masks]
    need = max((t.num_blocks for t in tables), default=0)
    capacity = need if capacity is None else int(capacity)
    if capacity < need:
        raise ValueError(f"pack_stacked: capacity {capacity} is below the {need} kept blocks of "
                         "the densest layer")
    bounds = TableBounds(shape=tuple(shape), block=tuple(block), grid=tables[0].grid,
                         capacity=capacity,
                         max_per_col=max((t.max_per_col for t in tables), default=0),
                         max_per_row=max((t.max_per_row for t in tables), default=0))
    index = BlockIndex(*(np.stack(f) for f in zip(*(index_of(t, capacity) for t in tables))))
    return bounds, index


def pack(w: jax.Array, mask, block: tuple[int, int]) -> BlockSparseWeight:
    """Packs the kept blocks of ``w`` (``(K, N)``) into a :class:`BlockSparseWeight`.

    Args:
      w: the dense ``(K, N)`` weight; may be traced (only the mask must be concrete).
      mask: concrete, either the ``(K, N)`` element mask (each block kept whole)
        or the ``(ceil(K / bk), ceil(N / bn))`` block mask.
      block: ``(bk, bn)``. Blocks that overhang the matrix are zero-padded.
    """
    block = _check_block(block, "pack")
    if getattr(w, "ndim", None) != 2:
        raise ValueError(f"pack: w must be a (K, N) matrix, got shape {getattr(w, 'shape', None)}")
    shape = tuple(int(s) for s in w.shape)
    tables = tables_of(block_mask_of(mask, shape, block), shape, block)
    return BlockSparseWeight(_gather_blocks(jnp.asarray(w), tables), tables)


# --------------------------------------------------------------------------- reference


def block_sparse_matmul_reference(x: jax.Array, packed: BlockSparseWeight) -> jax.Array:
    """Plain-JAX twin of :func:`block_sparse_matmul`: scatter to dense, then one XLA dot."""
    _check_operands(x, packed, "block_sparse_matmul_reference")
    dtype = jnp.result_type(x.dtype, packed.dtype)
    y = jnp.matmul(x.astype(dtype), packed.to_dense().astype(dtype),
                   preferred_element_type=jnp.float32)
    return y.astype(dtype)


def _check_operands(x, packed, where: str):
    if not isinstance(packed, BlockSparseWeight):
        raise TypeError(f"{where}: packed must be a BlockSparseWeight (see pack), got {type(packed).__name__}")
    if x.ndim < 1 or x.shape[-1] != packed.shape[0]:
        raise ValueError(f"{where}: x's last axis {x.shape[-1:]} must equal the weight's K = "
                         f"{packed.shape[0]} (y = x @ W, W of shape {packed.shape})")


# --------------------------------------------------------------------------- support


_GPU_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def supported(shape, dtype, backend: str | None = None, block: tuple[int, int] = (128, 128)
              ) -> tuple[bool, str]:
    """Whether a kernel handles a ``(K, N)`` weight of ``dtype`` with ``block`` on ``backend``.

    Returns ``(ok, reason)``; when ``ok`` is False, :func:`block_sparse_matmul`
    uses the plain-JAX reference, and ``reason`` says why (for the lowering
    pass's report). Any ``(K, N)`` is fine: the blocks are zero-padded.
    """
    backend = backend or jax.default_backend()
    bk, bn = _check_block(block, "supported")
    if len(tuple(shape)) != 2:
        return False, f"weight shape {tuple(shape)} is not a (K, N) matrix"
    dtype = jnp.dtype(dtype)
    if backend == "gpu":
        if dtype not in _GPU_DTYPES:
            return False, f"Mosaic GPU kernel takes bfloat16/float16 operands, not {dtype}"
        # One warpgroup holds a (rows, bn) and, for dW, a (bk, bn) f32 accumulator:
        # 128 x 128 is 128 registers a thread; larger tiles would spill.
        if bk not in (64, 128) or bn not in (64, 128):
            return False, f"block {block}: the Mosaic GPU kernel takes bk, bn in (64, 128)"
        return True, "Mosaic GPU block-sparse kernel"
    if backend == "tpu":
        if bk % 128 or bn % 128:
            return False, f"block {block}: the TPU kernel needs bk, bn multiples of 128"
        return True, "Pallas TPU block-sparse kernel (scalar prefetch)"
    if backend == "interpret":
        return True, "Pallas kernel in interpret mode"
    return False, f"no block-sparse kernel on backend {backend!r}: plain-JAX reference"


# --------------------------------------------------------------------------- Pallas (TPU / interpret)


def _pallas_gather_matmul(a, blocks, ptr, idx, *, rows: int, steps: int, interpret: bool,
                          poison: bool):
    """``out[:, j-tile] = sum_{t in col j} a[:, idx[t]-tile] @ blocks[t]``, f32 output.

    Tables travel as scalar-prefetch operands; the grid runs to the longest
    column and shorter columns clamp their block index and skip the dot.
    """
    from jax.experimental.pallas import tpu as pltpu

    m, _ = a.shape
    nnzb, bk, bn = blocks.shape
    ncols = len(ptr) - 1
    steps = max(1, steps)      # the longest column (of any layer, for device tables)
    ptr_a = jnp.asarray(ptr, jnp.int32)
    idx_a = jnp.asarray(idx, jnp.int32)

    def block_id(j, t, ptr_ref):
        last = jnp.maximum(ptr_ref[j + 1] - 1, ptr_ref[j])
        return jnp.clip(jnp.minimum(ptr_ref[j] + t, last), 0, nnzb - 1)

    def a_map(i, j, t, ptr_ref, idx_ref):
        return i, idx_ref[block_id(j, t, ptr_ref)]

    def w_map(i, j, t, ptr_ref, idx_ref):
        return block_id(j, t, ptr_ref), 0, 0

    def o_map(i, j, t, ptr_ref, idx_ref):
        return i, j

    def kernel(ptr_ref, idx_ref, a_ref, w_ref, *rest):
        o_ref = rest[-1]
        j, t = pl.program_id(1), pl.program_id(2)

        @pl.when(t == 0)
        def _():
            o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

        @pl.when(t < ptr_ref[j + 1] - ptr_ref[j])
        def _():
            o_ref[...] += jnp.dot(a_ref[...], w_ref[0], preferred_element_type=jnp.float32)

    out_shape = jax.ShapeDtypeStruct((m, ncols * bn), jnp.float32)
    in_specs = [pl.BlockSpec((rows, bk), a_map), pl.BlockSpec((1, bk, bn), w_map)]
    out_spec = pl.BlockSpec((rows, bn), o_map)
    operands = [a, blocks]
    aliases = {}
    if poison:   # tests: every output element must be written over the NaNs
        in_specs.append(out_spec)
        operands.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        aliases = {4: 0}
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(m // rows, ncols, steps),
        in_specs=in_specs, out_specs=out_spec)
    return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape,
                          input_output_aliases=aliases, interpret=interpret)(ptr_a, idx_a, *operands)


def _pallas_sampled_matmul(a, g, rows_of, cols_of, bk: int, bn: int, *, rows: int,
                           interpret: bool, poison: bool):
    """``out[b] = a[:, rows_of[b]-tile]^T @ g[:, cols_of[b]-tile]`` for each kept block, f32."""
    from jax.experimental.pallas import tpu as pltpu

    m = a.shape[0]
    nnzb = len(rows_of)
    r_a = jnp.asarray(rows_of, jnp.int32)
    c_a = jnp.asarray(cols_of, jnp.int32)

    def kernel(r_ref, c_ref, a_ref, g_ref, *rest):
        o_ref = rest[-1]

        @pl.when(pl.program_id(1) == 0)
        def _():
            o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

        o_ref[0] += jax.lax.dot_general(a_ref[...], g_ref[...], (((0,), (0,)), ((), ())),
                                        preferred_element_type=jnp.float32)

    out_shape = jax.ShapeDtypeStruct((nnzb, bk, bn), jnp.float32)
    in_specs = [pl.BlockSpec((rows, bk), lambda b, i, r, c: (i, r[b])),
                pl.BlockSpec((rows, bn), lambda b, i, r, c: (i, c[b]))]
    out_spec = pl.BlockSpec((1, bk, bn), lambda b, i, r, c: (b, 0, 0))
    operands = [a, g]
    aliases = {}
    if poison:
        in_specs.append(out_spec)
        operands.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        aliases = {4: 0}
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(nnzb, m // rows), in_specs=in_specs, out_specs=out_spec)
    return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape,
                          input_output_aliases=aliases, interpret=interpret)(r_a, c_a, *operands)


# --------------------------------------------------------------------------- Mosaic GPU


def _swizzled(cols: int, dtype) -> tuple:
    from jax.experimental.pallas import mosaic_gpu as plgpu

    itemsize = jnp.dtype(dtype).itemsize
    swizzle = plgpu.find_swizzle(cols * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def mosaic_gpu_interpret_params():
    """Mosaic GPU interpret parameters (``plgpu.InterpretGPUParams``; private before JAX 0.11).

    Uninitialised memory reads as NaN, so an output tile the kernel never writes
    shows up in the comparison with the reference (the kernel's outputs are
    poisoned).
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:   # JAX 0.10
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params(uninitialized_memory="nan")


def _mgpu_kernel(body, out_type, grid, grid_names, interpret: bool):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    kwargs = {"interpret": mosaic_gpu_interpret_params()} if interpret else {}
    return plgpu.kernel(
        body, out_type=out_type, grid=grid, grid_names=grid_names,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **kwargs)


def _tile_order(lin, m_tiles: int, ncols: int, width: int, interpret: bool):
    """Program id -> output tile ``(mi, j)``: bands of ``width`` M tiles sweep all columns.

    Programs that run together share a band of ``x`` rows and one weight column,
    so both stay in L2. On GPU this is ``plgpu.planar_snake`` (what was measured);
    in interpret mode the same bands without the snake, because planar_snake
    also evaluates a division by its (possibly zero-width) remainder band, which
    traps on CPU.
    """
    width = min(width, m_tiles)
    if not interpret:
        from jax.experimental.pallas import mosaic_gpu as plgpu

        return plgpu.planar_snake(lin, (m_tiles, ncols), 0, width)
    band_size = width * ncols
    band = jax.lax.div(lin, jnp.int32(band_size))
    within = jax.lax.rem(lin, jnp.int32(band_size))
    rows_in_band = jnp.minimum(jnp.int32(width), jnp.int32(m_tiles) - band * width)   # >= 1
    mi = band * width + jax.lax.rem(within, rows_in_band)
    j = jax.lax.div(within, rows_in_band)
    return mi, j


def _mgpu_gather_matmul(a, blocks, ptr, idx, out_dtype, tiles: tile_tables.BlockSparseTiles,
                        interpret: bool = False):
    """Mosaic GPU: ``out[:, j-tile] = sum_{t in col j} a[:, idx[t]-tile] @ blocks[t]``.

    One program per output tile (a space-filling order over tiles keeps a band of
    ``x`` rows and the weight's columns hot in L2). Its pipeline runs
    ``count_j * bk / step_k`` steps, the count read from ``ptr`` at run time.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, _ = a.shape
    nnzb, bk, bn = blocks.shape
    ncols = len(ptr) - 1
    rows, step_k = tiles.rows, tiles.step_k
    sub = bk // step_k
    b2d = blocks.reshape(nnzb * bk, bn)
    ptr_a = jnp.asarray(ptr, jnp.int32)
    idx_a = jnp.asarray(idx, jnp.int32)
    m_tiles = m // rows
    a_transforms = _swizzled(step_k, a.dtype)
    b_transforms = _swizzled(bn, a.dtype)
    o_transforms = _swizzled(bn, out_dtype)

    def body(ptr_ref, idx_ref, a_ref, b_ref, o_ref):
        mi, j = _tile_order(jax.lax.axis_index("tile"), m_tiles, ncols, tiles.grid_tile_width,
                            interpret)
        start = ptr_ref[j]
        count = ptr_ref[j + 1] - start

        def acc_scope(acc_ref):
            @pl.when(count > 0)
            def _():
                def a_map(s):
                    return mi, idx_ref[start + s // sub] * sub + s % sub

                def b_map(s):
                    return start * sub + s, 0

                def step(_, a_smem, b_smem):
                    plgpu.wgmma(acc_ref, a_smem, b_smem)
                    plgpu.wgmma_wait(1)

                plgpu.emit_pipeline(
                    step, grid=(count * sub,),
                    in_specs=[
                        plgpu.BlockSpec((rows, step_k), a_map, transforms=a_transforms,
                                        delay_release=1),
                        plgpu.BlockSpec((step_k, bn), b_map, transforms=b_transforms,
                                        delay_release=1),
                    ],
                    max_concurrent_steps=tiles.stages,
                )(a_ref, b_ref)
            return acc_ref[...]

        acc = pl.run_scoped(acc_scope, plgpu.ACC((rows, bn), jnp.float32))

        @functools.partial(pl.run_scoped,
                           o_smem=plgpu.SMEM((rows, bn), out_dtype, transforms=o_transforms))
        def _store(o_smem):
            o_smem[...] = acc.astype(out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[pl.ds(mi * rows, rows), pl.ds(j * bn, bn)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = _mgpu_kernel(body, jax.ShapeDtypeStruct((m, ncols * bn), out_dtype),
                          (m_tiles * ncols,), ("tile",), interpret)
    return kernel(ptr_a, idx_a, a, b2d)


def _num_programs(tiles: tile_tables.BlockSparseTiles, interpret: bool) -> int:
    """Programs of a persistent kernel: ``tiles.num_programs``, else one per SM."""
    if tiles.num_programs:
        return tiles.num_programs
    if interpret:   # a few simulated programs, so that each walks several tiles
        return 3
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def _column_order(ptr_a):
    """Block columns by decreasing kept-block count (stable); empty columns come last.

    Computed on the device from the (possibly traced) column pointers, so the
    persistent schedule needs no host-side table.
    """
    counts = ptr_a[1:] - ptr_a[:-1]
    return jnp.argsort(-counts, stable=True).astype(jnp.int32)


def _ws_store_tile(acc, o_smem, o_ref, wg, row0: jax.Array, col0: jax.Array, rows: int, bn: int,
                   epi: int, out_dtype):
    """Compute warpgroup ``wg`` stores its ``(rows, bn)`` tile in ``epi x epi`` TMA pieces.

    ``acc=None`` stores zeros (a block column with no kept block): one staging
    piece of zeros is copied to every piece of the tile. Nothing waits for the
    copies to land; the next store (or the kernel's end) waits until the
    staging buffer has been read.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    # The previous tile's copies must have read the staging slots.
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    pieces = [(pr, pc) for pr in range(rows // epi) for pc in range(bn // epi)]
    if acc is None:
        o_smem[wg, 0] = jnp.zeros((epi, epi), out_dtype)
        plgpu.commit_smem()
    for piece, (pr, pc) in enumerate(pieces):
        slot = 0 if acc is None else piece % 2
        if acc is not None:
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            o_smem[wg, slot] = acc[pr * epi:(pr + 1) * epi, pc * epi:(pc + 1) * epi]
            plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            o_smem.at[wg, slot],
            o_ref.at[pl.ds(row0 + pr * epi, epi), pl.ds(col0 + pc * epi, epi)])


def _mgpu_ws_smem_bytes(tiles: tile_tables.BlockSparseTiles, bn: int, itemsize: int = 2) -> int:
    """Shared memory of the warp-specialized kernel: pipeline stages plus output staging."""
    cta_rows = 2 * tiles.rows
    stage = (cta_rows * tiles.step_k + tiles.step_k * bn) * itemsize
    epi = 64
    return tiles.stages * stage + 2 * 2 * epi * epi * itemsize


def _mgpu_gather_matmul_ws(a, blocks, ptr, idx, out_dtype, tiles: tile_tables.BlockSparseTiles,
                           interpret: bool = False):
    """Warp-specialized variant of :func:`_mgpu_gather_matmul` with a ``2 * rows`` M tile.

    Two compute warpgroups own ``rows`` rows each and share every weight tile; a
    third warpgroup only issues the copies. The weight is read half as often as
    with one warpgroup per tile, which is what bounds the single-warpgroup kernel.
    ``tiles.schedule`` picks one program per output tile or the persistent work
    list (:func:`_mgpu_gather_matmul_persistent`). Either way, output tiles of a
    block column with no kept block are zeroed inside the kernel, and ``ptr`` and
    ``idx`` are read only on the device (they may be traced).
    """
    m = a.shape[0]
    nnzb, bk, bn = blocks.shape
    ptr_a = jnp.asarray(ptr, jnp.int32)
    ncols = ptr_a.shape[0] - 1
    selected = tile_tables.select_block_sparse_tiles(
        tiles, m=m, k=a.shape[1], n=ncols * bn, nnzb=nnzb, block=(bk, bn))
    if m % (2 * selected.rows):   # a measured M tile the padded M does not take
        selected = dataclasses.replace(selected, rows=tiles.rows)
    if bk % selected.step_k:      # a K step longer than these blocks
        selected = dataclasses.replace(selected, step_k=math.gcd(bk, selected.step_k))
    if selected.schedule == "persistent":
        return _mgpu_gather_matmul_persistent(a, blocks, ptr_a, idx, out_dtype, selected, interpret)
    return _mgpu_gather_matmul_per_tile(a, blocks, ptr_a, idx, out_dtype, selected, interpret)


def _ws_pipeline(body, context, *, count, sub: int, cta_rows: int, bn: int, tiles, a_map, b_map,
                 a_transforms, b_transforms, delay_release: int):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(count * sub,), memory_registers=40,
        in_specs=[
            plgpu.BlockSpec((cta_rows, tiles.step_k), a_map, transforms=a_transforms,
                            delay_release=delay_release),
            plgpu.BlockSpec((tiles.step_k, bn), b_map, transforms=b_transforms,
                            delay_release=delay_release),
        ],
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=tiles.stages,
        compute_context=context,
    )


def _mgpu_ws_kernel(body, out_type, grid, grid_names, interpret: bool):
    from jax.experimental.pallas import mosaic_gpu as plgpu

    kwargs = {"interpret": mosaic_gpu_interpret_params()} if interpret else {}
    return plgpu.kernel(
        body, out_type=out_type, grid=grid, grid_names=grid_names, num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **kwargs)


def _mgpu_gather_matmul_per_tile(a, blocks, ptr_a, idx, out_dtype,
                                 tiles: tile_tables.BlockSparseTiles, interpret: bool = False):
    """One program per ``(2 * rows, bn)`` output tile; see :func:`_mgpu_gather_matmul_ws`."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, _ = a.shape
    nnzb, bk, bn = blocks.shape
    ncols = ptr_a.shape[0] - 1
    rows, step_k = tiles.rows, tiles.step_k
    cta_rows = 2 * rows
    sub = bk // step_k
    b2d = blocks.reshape(nnzb * bk, bn)
    idx_a = jnp.asarray(idx, jnp.int32)
    m_tiles = m // cta_rows
    epi = 64
    a_transforms = _swizzled(step_k, a.dtype)
    b_transforms = _swizzled(bn, a.dtype)
    o_transforms = _swizzled(epi, out_dtype)

    def body(ptr_ref, idx_ref, a_ref, b_ref, o_ref):
        mi, j = _tile_order(jax.lax.axis_index("tile"), m_tiles, ncols, tiles.grid_tile_width,
                            interpret)
        start = ptr_ref[j]
        count = ptr_ref[j + 1] - start
        wg = jax.lax.axis_index("wg")
        row0 = mi * cta_rows + wg * rows

        def a_map(s):
            return mi, idx_ref[start + s // sub] * sub + s % sub

        def b_map(s):
            return start * sub + s, 0

        def mma(_, a_smem, b_smem, acc_ref):
            plgpu.wgmma(acc_ref, a_smem.at[pl.ds(wg * rows, rows)], b_smem)
            plgpu.wgmma_wait(1)
            return acc_ref

        pipeline = functools.partial(
            _ws_pipeline, count=count, sub=sub, cta_rows=cta_rows, bn=bn, tiles=tiles,
            a_map=a_map, b_map=b_map, a_transforms=a_transforms, b_transforms=b_transforms,
            delay_release=1)
        ignore = lambda *_, **__: None   # the allocations do not depend on the bodies

        # Scoped allocations are collective over the warpgroups. The output leaves
        # in 64 x 64 pieces through two slots per warpgroup, so the staging buffer
        # is small enough for four pipeline stages.
        @functools.partial(pl.run_scoped,
                           allocs=pipeline(ignore, ignore).get_allocations(a_ref, b_ref),
                           o_smem=plgpu.SMEM((2, 2, epi, epi), out_dtype, transforms=o_transforms),
                           collective_axes="wg")
        def _scope(allocs, o_smem):
            def compute_context(eval_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((rows, bn), jnp.float32))
                def _acc_scope(acc_ref):
                    eval_pipeline(acc_ref)
                    acc = acc_ref[...].astype(out_dtype)
                    _ws_store_tile(acc, o_smem, o_ref, wg, row0, j * bn, rows, bn, epi, out_dtype)

            @pl.when(count > 0)
            def _():
                pipeline(mma, compute_context)(a_ref, b_ref, allocations=allocs)

            @pl.when(jnp.logical_and(count == 0, wg < 2))
            def _():
                _ws_store_tile(None, o_smem, o_ref, wg, row0, j * bn, rows, bn, epi, out_dtype)

            @pl.when(wg < 2)
            def _():
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = _mgpu_ws_kernel(body, jax.ShapeDtypeStruct((m, ncols * bn), out_dtype),
                             (m_tiles * ncols,), ("tile",), interpret)
    return kernel(ptr_a, idx_a, a, b2d)


def _mgpu_gather_matmul_persistent(a, blocks, ptr_a, idx, out_dtype,
                                   tiles: tile_tables.BlockSparseTiles, interpret: bool = False):
    """Persistent warp-specialized kernel over a work list of output tiles.

    ``num_programs`` programs take the output tiles in turn (``plgpu.nd_loop``).
    The work list visits bands of ``grid_tile_width`` M tiles; within a band the
    block columns come longest first and empty ones last, so the last programs
    to finish hold short tiles and the zero tiles fill the tail. The copy
    warpgroup runs ahead into the next tile's pipeline while the compute
    warpgroups drain and store the current one, which hides the pipeline's fill
    and the epilogue that dominate a tile of one or two kept blocks.

    The pipeline releases each stage only after its wgmma completed
    (``delay_release=0``): the next tile's first copies reuse those slots
    without waiting for a release that a delayed scheme would leave pending.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m, _ = a.shape
    nnzb, bk, bn = blocks.shape
    ncols = ptr_a.shape[0] - 1
    rows, step_k = tiles.rows, tiles.step_k
    cta_rows = 2 * rows
    sub = bk // step_k
    b2d = blocks.reshape(nnzb * bk, bn)
    idx_a = jnp.asarray(idx, jnp.int32)
    order = _column_order(ptr_a)
    m_tiles = m // cta_rows
    num_tiles = m_tiles * ncols
    programs = min(_num_programs(tiles, interpret), num_tiles)
    epi = 64
    a_transforms = _swizzled(step_k, a.dtype)
    b_transforms = _swizzled(bn, a.dtype)
    o_transforms = _swizzled(epi, out_dtype)

    def body(ptr_ref, idx_ref, order_ref, a_ref, b_ref, o_ref):
        wg = jax.lax.axis_index("wg")
        ignore = lambda *_, **__: None

        def pipeline_for(count, a_map, b_map, body, context):
            return _ws_pipeline(body, context, count=count, sub=sub, cta_rows=cta_rows, bn=bn,
                                tiles=tiles, a_map=a_map, b_map=b_map, a_transforms=a_transforms,
                                b_transforms=b_transforms, delay_release=0)

        # The allocations depend on neither the trip count nor the index maps, but
        # the count must be dynamic, as in the real pipelines (a static one would
        # shrink the stages to the step count).
        any_count = ptr_ref[ncols] - ptr_ref[0]
        allocs = pipeline_for(any_count, lambda s: (0, s), lambda s: (s, 0), ignore,
                              ignore).get_allocations(
            a_ref, b_ref)

        @functools.partial(pl.run_scoped, allocs=allocs,
                           o_smem=plgpu.SMEM((2, 2, epi, epi), out_dtype, transforms=o_transforms),
                           collective_axes="wg")
        def _scope(allocs, o_smem):
            @plgpu.nd_loop((num_tiles,), collective_axes="sm")
            def _tile(info):
                (lin,) = info.index
                mi, rank = _tile_order(lin, m_tiles, ncols, tiles.grid_tile_width, interpret)
                j = order_ref[rank]
                start = ptr_ref[j]
                count = ptr_ref[j + 1] - start
                row0 = mi * cta_rows + wg * rows

                def a_map(s):
                    return mi, idx_ref[start + s // sub] * sub + s % sub

                def b_map(s):
                    return start * sub + s, 0

                def mma(_, a_smem, b_smem, acc_ref):
                    plgpu.wgmma(acc_ref, a_smem.at[pl.ds(wg * rows, rows)], b_smem)
                    plgpu.wgmma_wait(0)
                    return acc_ref

                def compute_context(eval_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((rows, bn), jnp.float32))
                    def _acc_scope(acc_ref):
                        eval_pipeline(acc_ref)
                        acc = acc_ref[...].astype(out_dtype)
                        _ws_store_tile(acc, o_smem, o_ref, wg, row0, j * bn, rows, bn, epi,
                                       out_dtype)

                @pl.when(count > 0)
                def _():
                    pipeline_for(count, a_map, b_map, mma, compute_context)(
                        a_ref, b_ref, allocations=allocs)

                @pl.when(jnp.logical_and(count == 0, wg < 2))
                def _():
                    _ws_store_tile(None, o_smem, o_ref, wg, row0, j * bn, rows, bn, epi, out_dtype)

            @pl.when(wg < 2)
            def _():
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = _mgpu_ws_kernel(body, jax.ShapeDtypeStruct((m, ncols * bn), out_dtype),
                             (programs,), ("sm",), interpret)
    return kernel(ptr_a, idx_a, order, a, b2d)


# Leads for the dW split's cost model (H100/H200): wgmma rate of one SM, device bandwidth.
_SM_FLOPS = 6e12
_DEVICE_BYTES_PER_S = 3.5e12


def _dw_split(tiles: tile_tables.BlockSparseTiles, nnzb: int, m: int, step_m: int,
              interpret: bool, bk: int = 128, bn: int = 128) -> int:
    """Chunks of M per kept block in the dW kernel: ``tiles.dw_split``, else a small cost model.

    Always a divisor of ``m // step_m`` (each chunk a whole number of steps). The
    automatic choice minimises ``waves * (steps per chunk + 4) * step time`` (one
    program per SM at a time, as the kernel's shared memory admits; about four
    steps of pipeline fill and epilogue) plus, when split, the float32 partial
    sums written and read back. So 26 kept blocks over 128 steps of M take 4
    chunks (one wave of 104 programs instead of 26 programs of 128 steps), while
    410 blocks stay whole (the partial sums would cost more than the last
    wave's idle SMs).
    """
    steps = m // step_m
    if tiles.dw_split:
        want = max(1, min(tiles.dw_split, steps))
        while steps % want:
            want -= 1
        return want
    sms = _num_programs(dataclasses.replace(tiles, num_programs=0), interpret)
    step_s = 2 * bk * bn * step_m / _SM_FLOPS
    partial_s = nnzb * bk * bn * 4 * 2 / _DEVICE_BYTES_PER_S   # one chunk's f32 sums, out and in

    def cost(d):
        waves = -(-nnzb * d // sms)
        return waves * (steps // d + 4) * step_s + (d * partial_s if d > 1 else 0.0)

    candidates = [d for d in range(1, steps + 1) if steps % d == 0 and steps // d >= 8] or [1]
    return min(candidates, key=lambda d: (cost(d), d))


def _mgpu_sampled_matmul(a, g, rows_of, cols_of, bk: int, bn: int, out_dtype,
                         tiles: tile_tables.BlockSparseTiles, interpret: bool = False):
    """Mosaic GPU: ``out[b] = a[:, rows_of[b]-tile]^T @ g[:, cols_of[b]-tile]`` per kept block.

    Each program owns one kept block and one of ``split`` chunks of M
    (:func:`_dw_split`): with few kept blocks (a narrow layer at low density) one
    program per block would leave most SMs idle. With ``split > 1`` the chunks'
    float32 partial sums are added in XLA (``split * nnzb`` blocks, small next to
    ``x``). ``x`` is transposed once in XLA, or, with
    ``tiles.dw_transpose_in_kernel``, its tiles are fed to wgmma transposed in
    shared memory. ``rows_of`` and ``cols_of`` are read only on the device.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    m = a.shape[0]
    r_a = jnp.asarray(rows_of, jnp.int32)
    c_a = jnp.asarray(cols_of, jnp.int32)
    nnzb = r_a.shape[0]
    step_m = tiles.step_k
    split = _dw_split(tiles, nnzb, m, step_m, interpret, bk, bn)
    chunk_steps = m // step_m // split
    transposed = tiles.dw_transpose_in_kernel
    b_transforms = _swizzled(bn, a.dtype)
    acc_dtype = out_dtype if split == 1 else jnp.float32
    o_transforms = _swizzled(bn, acc_dtype)
    if transposed:
        x_op, a_block, a_transforms = a, (step_m, bk), _swizzled(bk, a.dtype)
        a_index = lambda r, s: (s, r)
    else:
        x_op, a_block, a_transforms = a.T, (bk, step_m), _swizzled(step_m, a.dtype)   # (K, M)
        a_index = lambda r, s: (r, s)

    def body(r_ref, c_ref, a_ref, g_ref, o_ref):
        lin = jax.lax.axis_index("block")
        # Chunk-major: programs that run together read the same rows of x and dy.
        chunk = jax.lax.div(lin, jnp.int32(nnzb))
        b = jax.lax.rem(lin, jnp.int32(nnzb))
        r = r_ref[b]
        c = c_ref[b]
        s0 = chunk * chunk_steps

        def acc_scope(acc_ref):
            def step(_, a_smem, g_smem):
                lhs = plgpu.transpose_ref(a_smem, (1, 0)) if transposed else a_smem
                plgpu.wgmma(acc_ref, lhs, g_smem)
                plgpu.wgmma_wait(1)

            plgpu.emit_pipeline(
                step, grid=(chunk_steps,),
                in_specs=[
                    plgpu.BlockSpec(a_block, lambda s: a_index(r, s0 + s), transforms=a_transforms,
                                    delay_release=1),
                    plgpu.BlockSpec((step_m, bn), lambda s: (s0 + s, c), transforms=b_transforms,
                                    delay_release=1),
                ],
                max_concurrent_steps=max(2, min(tiles.stages, chunk_steps)),
            )(a_ref, g_ref)
            return acc_ref[...]

        acc = pl.run_scoped(acc_scope, plgpu.ACC((bk, bn), jnp.float32))

        @functools.partial(pl.run_scoped,
                           o_smem=plgpu.SMEM((bk, bn), acc_dtype, transforms=o_transforms))
        def _store(o_smem):
            o_smem[...] = acc.astype(acc_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[pl.ds(lin * bk, bk)])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = _mgpu_kernel(body, jax.ShapeDtypeStruct((split * nnzb * bk, bn), acc_dtype),
                          (split * nnzb,), ("block",), interpret)
    out = kernel(r_a, c_a, x_op, g)
    if split == 1:
        return out.reshape(nnzb, bk, bn)
    return out.reshape(split, nnzb, bk, bn).sum(0).astype(out_dtype)


# --------------------------------------------------------------------------- dispatch


@dataclasses.dataclass(frozen=True)
class _Config:
    tables: Any                     # BlockTables (static tables) or TableBounds (device tables)
    impl: str                       # "mosaic_gpu" | "pallas" (TPU or interpret)
    tiles: tile_tables.BlockSparseTiles
    interpret: bool
    poison: bool


def _gather_matmul(a, blocks, ptr, idx, out_dtype, cfg: _Config, steps: int):
    nb = len(ptr) - 1
    bn = blocks.shape[2]
    if blocks.shape[0] == 0:   # all-zero mask: nothing to multiply
        return jnp.zeros((a.shape[0], nb * bn), out_dtype)
    if cfg.impl == "mosaic_gpu":
        if cfg.tiles.warp_specialized and a.shape[0] % (2 * cfg.tiles.rows) == 0:
            return _mgpu_gather_matmul_ws(a, blocks, ptr, idx, out_dtype, cfg.tiles, cfg.interpret)
        return _mgpu_gather_matmul(a, blocks, ptr, idx, out_dtype, cfg.tiles, cfg.interpret)
    out = _pallas_gather_matmul(a, blocks, ptr, idx, rows=cfg.tiles.rows, steps=steps,
                                interpret=cfg.interpret, poison=cfg.poison)
    return out.astype(out_dtype)


def _sampled_matmul(a, g, rows_of, cols_of, out_dtype, cfg: _Config):
    bk, bn = cfg.tables.block
    if cfg.tables.num_blocks == 0:
        return jnp.zeros((0, bk, bn), out_dtype)
    if cfg.impl == "mosaic_gpu":
        return _mgpu_sampled_matmul(a, g, rows_of, cols_of, bk, bn, out_dtype, cfg.tiles,
                                    cfg.interpret)
    out = _pallas_sampled_matmul(a, g, rows_of, cols_of, bk, bn, rows=cfg.tiles.rows,
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
                        interpret: bool | str = False, poison: bool = False) -> jax.Array:
    """``x @ W`` for a packed block-sparse ``W``, differentiable in ``x`` and ``packed``.

    Args:
      x: ``(..., K)``.
      packed: from :func:`pack`.
      backend: ``"gpu"``, ``"tpu"``, ``"cpu"``; default: JAX's default backend.
      interpret: run a kernel in interpret mode on CPU (tests): ``True`` or
        ``"pallas"`` for the ``pallas_call`` (TPU-style) kernel, ``"mosaic_gpu"``
        for the Mosaic GPU kernel (small shapes only: it simulates every thread).
      poison: fill the ``pallas_call`` kernel's outputs with NaN before it
        writes them (tests); Mosaic GPU interpret mode always does.

    Where no kernel applies (:func:`supported` says why), this is
    :func:`block_sparse_matmul_reference`.
    """
    _check_operands(x, packed, "block_sparse_matmul")
    if interpret not in (False, True, "pallas", "mosaic_gpu"):
        raise ValueError(f"block_sparse_matmul: interpret must be a bool, 'pallas' or 'mosaic_gpu', "
                         f"got {interpret!r}")
    if interpret == "mosaic_gpu":
        backend = "gpu"
    elif interpret:
        backend = "interpret"
    else:
        backend = backend or jax.default_backend()
    dtype = jnp.result_type(x.dtype, packed.dtype)
    ok, _ = supported(packed.shape, dtype, backend, packed.block)
    if not ok:
        return block_sparse_matmul_reference(x, packed)
    t = packed.tables
    (kb, nb), (bk, bn) = t.grid, t.block
    lead = x.shape[:-1]
    a = x.reshape(-1, x.shape[-1]).astype(dtype)
    m = a.shape[0]
    tiles = tile_tables.block_sparse_tiles(backend, m)
    if interpret == "mosaic_gpu":   # the simulation runs every thread: keep the pipeline short
        tiles = dataclasses.replace(tiles, stages=2)
    rows = tiles.rows
    if backend == "gpu":
        # The dW kernel pipelines over M in steps of step_k: pad M to both.
        rows = math.lcm(rows, tiles.step_k)
    m_pad = -(-max(m, 1) // rows) * rows
    a = jnp.pad(a, ((0, m_pad - m), (0, kb * bk - a.shape[1])))
    cfg = _Config(tables=t, impl="mosaic_gpu" if backend == "gpu" else "pallas",
                  tiles=tiles, interpret=bool(interpret), poison=bool(poison))
    index = None
    if packed.index is not None:
        if packed.blocks.ndim != 3:
            raise ValueError(f"block_sparse_matmul: a stacked weight {packed.blocks.shape[:-3]} of "
                             "layers multiplies one layer at a time: slice it (e.g. in a scan)")
        index = BlockIndex(*(jnp.asarray(v, jnp.int32) for v in packed.index))
    y = _bsmm(a, packed.blocks.astype(dtype), index, cfg)
    return y[:m, :t.shape[1]].reshape(*lead, t.shape[1])
