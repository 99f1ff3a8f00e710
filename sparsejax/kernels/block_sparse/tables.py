"""Block-sparse weights and their index tables: packing a mask, gathering its kept blocks.

Convention (as :mod:`sparsejax.layout`): ``W`` is the ``(K, N)`` matrix view.
:func:`pack` stores the kept blocks compactly, ordered by block column, with
index tables built once per mask (host-side, from a concrete mask): for output
column tile ``j`` a kernel iterates only over the kept blocks of that column,
so work is proportional to density.

Stacked layers (``nn.scan``): the layer index is dynamic inside a scan, so the
tables cannot be static there. :func:`pack_stacked` pads each layer's tables to
a common static capacity and keeps them as device arrays (a :class:`BlockIndex`
beside the ``(layers, capacity, bk, bn)`` blocks); a scan slices blocks and
tables together, and the kernels read the sliced tables as operands. Only the
bounds (grid, block, capacity, longest column and row over all layers) are
static. Padded slots hold zero blocks that no column visits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BlockTables", "TableBounds", "BlockIndex", "BlockSparseWeight", "index_of", "check_block",
    "block_mask_of", "tables_of", "gather_blocks", "gather_indexed", "stacked_tables", "pack",
    "pack_stacked",
]



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


def check_block(block, where: str) -> tuple[int, int]:
    """``block`` as ``(bk, bn)``; a ValueError naming ``where`` unless it is two positive ints."""
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


def gather_blocks(w: jax.Array, tables: BlockTables) -> jax.Array:
    """Kept blocks of ``w`` (``(K, N)``) in packed order, ``(num_blocks, bk, bn)``; zero-padded at the edges.

    Differentiable in ``w`` (only the mask behind ``tables`` is static).
    """
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
    block = check_block(block, "pack_stacked")
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
    block = check_block(block, "pack")
    if getattr(w, "ndim", None) != 2:
        raise ValueError(f"pack: w must be a (K, N) matrix, got shape {getattr(w, 'shape', None)}")
    shape = tuple(int(s) for s in w.shape)
    tables = tables_of(block_mask_of(mask, shape, block), shape, block)
    return BlockSparseWeight(gather_blocks(jnp.asarray(w), tables), tables)

