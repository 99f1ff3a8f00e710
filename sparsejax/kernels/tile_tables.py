"""Shipped tile sizes for the sparse matmul kernels, per backend.

The kernels read their tiles from here instead of searching at run time: a
search costs compilations on every new shape, and the right answer depends on
little more than the backend and the dtype. The numbers for ``gpu`` were chosen
on an H100 (see ``benchmarks/results/block_sparse_speed.md``); the ``tpu`` and
``interpret`` rows are the smallest tiles the hardware layout accepts.

The block-sparse GPU kernel's schedule can also depend on the shape: with
``schedule="auto"``, :func:`select_block_sparse_tiles` looks the kernel call's
``(K, N)`` and density up in ``_GPU_BY_SHAPE`` (filled from the JSON that
``benchmarks/block_sparse_shapes.py`` writes) and otherwise decides by the mean
block-column length.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools


@dataclasses.dataclass(frozen=True)
class BlockSparseTiles:
    """Tiles and schedule of the block-sparse matmul.

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
      schedule: how the warp-specialized GPU kernel maps output tiles to
        programs. ``"tile"``: one program per output tile. ``"persistent"``:
        ``num_programs`` programs walk a work list of output tiles ordered by
        block-column length (longest first, empty columns last), so the copy
        warpgroup fetches the next tile while the compute warpgroups store the
        last one; short block columns (FFN shapes at low density) need that.
        ``"auto"``: :func:`select_block_sparse_tiles` picks per shape.
      num_programs: programs of the persistent schedule; 0: one per SM.
      dw_split: the dW kernel splits M into this many chunks per kept block
        (partial sums added in XLA), so a few kept blocks still fill the GPU
        and the last wave of programs is not nearly empty; 0: chosen by a
        cost model of waves (``block_sparse.mosaic_gpu.dw_split``).
      dw_transpose_in_kernel: the dW kernel reads ``x`` tiles as they are and
        transposes them in shared memory (wgmma's transposed A) instead of
        transposing ``x`` in XLA first.
    """

    rows: int
    step_k: int = 64
    stages: int = 4
    grid_tile_width: int = 8
    warp_specialized: bool = False
    schedule: str = "tile"
    num_programs: int = 0
    dw_split: int = 0
    dw_transpose_in_kernel: bool = False

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"BlockSparseTiles.schedule must be one of {SCHEDULES}, got "
                             f"{self.schedule!r}")


SCHEDULES = ("tile", "persistent", "auto")


_BLOCK_SPARSE = {
    # Two compute warpgroups + a copy warpgroup, 4 stages, curve width 4: fastest of
    # the variants timed on an H100 (forward, 8192^3, density 0.25: 0.451 ms against
    # 0.526 ms for the best single-warpgroup kernel). schedule="auto" picks the
    # schedule per shape (select_block_sparse_tiles): measured entries, else column length.
    "gpu": BlockSparseTiles(rows=128, step_k=64, stages=4, grid_tile_width=4, warp_specialized=True,
                            schedule="auto"),
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


@contextlib.contextmanager
def using_block_sparse_tiles(backend: str, tiles: BlockSparseTiles):
    """Within the block, ``block_sparse_tiles(backend, ...)`` starts from ``tiles`` (sweeps)."""
    saved = _BLOCK_SPARSE.get(backend)
    _BLOCK_SPARSE[backend] = tiles
    block_sparse_tiles.cache_clear()
    try:
        yield
    finally:
        if saved is None:
            del _BLOCK_SPARSE[backend]
        else:
            _BLOCK_SPARSE[backend] = saved
        block_sparse_tiles.cache_clear()


# Per-shape choices of the "auto" schedule on GPU, measured by
# benchmarks/block_sparse_shapes.py (its JSON lists the best variant per shape and
# density): {(K, N): {density: {field: value}}}, K and N of the kernel call (the
# backward's dx call sees the transposed shape).
# Measured on an H200 (JAX 0.11.2, 8192 tokens; benchmarks/results/block_sparse_shapes.md):
# the persistent schedule was fastest or within noise of the fastest forward at every
# measured shape and density (e.g. 1024->4096 at density 0.1: 3.02x of dense against
# 2.82x for one program per tile); the in-kernel transpose for dW won by no more than
# the run's noise, so it stays off.
_PERSISTENT = {"schedule": "persistent"}
_GPU_BY_SHAPE: dict[tuple[int, int], dict[float, dict]] = {
    shape: {0.5: _PERSISTENT, 0.25: _PERSISTENT, 0.1: _PERSISTENT}
    for shape in ((1024, 4096), (4096, 1024), (4096, 11008), (11008, 4096))
}

# Without a measured entry: the persistent schedule when block columns are short
# (mean kept blocks per column below this), where one program per output tile
# spends most of its time filling its pipeline and storing its tile.
PERSISTENT_BELOW_BLOCKS_PER_COLUMN = 8.0


def select_block_sparse_tiles(tiles: BlockSparseTiles, *, m: int, k: int, n: int, nnzb: int,
                              block: tuple[int, int]) -> BlockSparseTiles:
    """Resolves ``schedule="auto"`` for one GPU kernel call (static shapes only).

    Args:
      tiles: the tiles the call was given (returned unchanged unless "auto").
      m, k, n: padded rows of ``x``, contraction and output widths of the call.
      nnzb: kept blocks; ``block``: ``(bk, bn)``.

    A measured entry of ``_GPU_BY_SHAPE`` for ``(k, n)`` wins (nearest density);
    otherwise the mean block-column length decides between "tile" and "persistent".
    """
    if tiles.schedule != "auto":
        return tiles
    kb, nb = max(1, k // block[0]), max(1, n // block[1])
    density = nnzb / (kb * nb)
    by_density = _GPU_BY_SHAPE.get((k, n))
    if by_density:
        nearest = min(by_density, key=lambda d: abs(d - density))
        return dataclasses.replace(tiles, **{"schedule": "tile", **by_density[nearest]})
    per_column = nnzb / nb
    schedule = "persistent" if per_column < PERSISTENT_BELOW_BLOCKS_PER_COLUMN else "tile"
    return dataclasses.replace(tiles, schedule=schedule)


X_ACCESSES = ("gather", "gather_grouped", "select")


@dataclasses.dataclass(frozen=True)
class NMTiles:
    """Tiles and launch of the compressed N:M GEMV kernel for one batch size.

    Attributes:
      cols: output columns per program.
      x_access: how the kernel reads ``x`` at the kept positions. ``"gather"``: one
        gathered load per kept value, from ``x`` as it is (no copy beside the kernel).
        ``"gather_grouped"``: the same gather from an ``(m, batch, G)`` copy of ``x``
        (an XLA transpose before the kernel; kept so sweeps can compare).
        ``"select"``: ``m - n`` selects per kept value from that copy.
      num_warps, num_stages: Triton's (GPU only).
      target_programs: K is split until a launch has at least this many programs
        (a GEMV has few output tiles; the partial sums are added in XLA).
    """

    cols: int
    x_access: str = "gather"
    num_warps: int = 4
    num_stages: int = 3
    target_programs: int = 1024

    def __post_init__(self):
        if self.x_access not in X_ACCESSES:
            raise ValueError(f"NMTiles.x_access must be one of {X_ACCESSES}, got {self.x_access!r}")


# {backend: {batch: tiles}}: a batch takes the entry of the largest listed batch <= it.
_NM = {
    "gpu": {
        # The best launch of the H200 sweeps (8192^2, bf16, benchmarks/decode_speed.py): the
        # time follows the warps in flight. Session 10, two calls: 16 warps at 512 programs
        # 30.3 / 31.9 us at 2:4 against 37.2 / 33.1 for session 9's 4 warps at 1024 (and
        # 19.5 against 31.2 us at 1:4, 20.1 against 30.4 at 2:8 in the second call).
        1: NMTiles(cols=64, x_access="gather", num_warps=16, num_stages=3, target_programs=512),
        # The launch the previous shipped defaults gave batch 2, with the gather (it beat
        # the selects at every batch of the first sweep).
        2: NMTiles(cols=256, x_access="gather", num_warps=8, num_stages=3, target_programs=512),
    },
    # Small tiles keep interpret mode fast; the large program target splits K as far as
    # the tiles allow, so tests cover the partial sums.
    "interpret": {1: NMTiles(cols=16, x_access="gather", target_programs=512)},
}


def nm_tiles(backend: str, batch: int = 1) -> NMTiles:
    """Tiles and launch of the compressed N:M kernel on ``backend`` for ``batch`` rows of ``x``."""
    by_batch = _NM.get(backend, _NM["interpret"])
    return by_batch[max(b for b in by_batch if b <= batch)]
