"""Shipped tile sizes for the sparse matmul kernels, per backend.

The kernels read their tiles from here instead of searching at run time: a
search costs compilations on every new shape, and the right answer depends on
little more than the backend and the dtype. The numbers for ``gpu`` were chosen
on an H100 (see ``benchmarks/results/block_sparse_speed.md``); the ``tpu`` and
``interpret`` rows are the smallest tiles the hardware layout accepts.
"""

from __future__ import annotations

import dataclasses
import functools


@dataclasses.dataclass(frozen=True)
class BlockSparseTiles:
    """Tiles of the block-sparse matmul.

    Attributes:
      rows: rows of ``x`` per compute warpgroup (the M tile; twice that per
        program when ``warp_specialized``).
      step_k: contraction length per pipeline step on GPU (a kept block of
        ``bk`` rows is consumed in ``bk // step_k`` steps).
      stages: pipeline depth (copies in flight) on GPU.
      grid_tile_width: width of the space-filling curve over output tiles on GPU
        (how many tiles along M share the same pass over the weight's columns).
      warp_specialized: on GPU, two compute warpgroups (an M tile of
        ``2 * rows``) fed by a copy warpgroup, when M divides.
    """

    rows: int
    step_k: int = 64
    stages: int = 4
    grid_tile_width: int = 8
    warp_specialized: bool = False


_BLOCK_SPARSE = {
    # Two compute warpgroups + a copy warpgroup, 4 stages, curve width 4: fastest of
    # the variants timed on an H100 (forward, 8192^3, density 0.25: 0.451 ms against
    # 0.526 ms for the best single-warpgroup kernel).
    "gpu": BlockSparseTiles(rows=128, step_k=64, stages=4, grid_tile_width=4, warp_specialized=True),
    "tpu": BlockSparseTiles(rows=128),
    "interpret": BlockSparseTiles(rows=8),
    "cpu": BlockSparseTiles(rows=8),
}


@functools.lru_cache(maxsize=None)
def block_sparse_tiles(backend: str, m: int) -> BlockSparseTiles:
    """Tiles for ``backend`` and ``m`` rows of ``x``; small ``m`` shrinks the M tile."""
    tiles = _BLOCK_SPARSE.get(backend, _BLOCK_SPARSE["cpu"])
    if backend == "gpu" and m <= 64:
        # wgmma needs 64 rows per warpgroup; a decode batch wastes the rest anyway.
        tiles = dataclasses.replace(tiles, rows=64)
    elif backend in ("interpret", "cpu"):
        rows = 8
        while rows < min(m, 32):
            rows *= 2
        tiles = dataclasses.replace(tiles, rows=rows)
    return tiles


@dataclasses.dataclass(frozen=True)
class NMTiles:
    """Tiles of the compressed N:M matmul: ``cols`` outputs and ``groups`` N:M groups per step."""

    cols: int
    groups: int


_NM = {
    "gpu": NMTiles(cols=256, groups=64),   # with 8 warps and ~512 programs: best timed on an H100
    "tpu": NMTiles(cols=128, groups=64),
    "interpret": NMTiles(cols=16, groups=8),
    "cpu": NMTiles(cols=16, groups=8),
}


def nm_tiles(backend: str) -> NMTiles:
    """Tiles of the compressed N:M kernel on ``backend``."""
    return _NM.get(backend, _NM["cpu"])
