"""Warp-specialized Mosaic GPU block-sparse forward kernels (the default on Hopper).

Two compute warpgroups share each weight tile, fed by a copy warpgroup
(``plgpu.emit_pipeline_warp_specialized``): :func:`gather_matmul_ws` picks one
program per output tile (:func:`gather_matmul_per_tile`) or a persistent work
list (:func:`gather_matmul_persistent`) by ``BlockSparseTiles.schedule``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparsejax.kernels import tile_tables
from sparsejax.kernels._mosaic_gpu import swizzled
from sparsejax.kernels.block_sparse.mosaic_gpu import kernel, num_programs, tile_order

__all__ = ["gather_matmul_ws", "gather_matmul_per_tile", "gather_matmul_persistent",
           "ws_smem_bytes", "column_order"]


def gather_matmul_ws(a, blocks, ptr, idx, out_dtype, tiles: tile_tables.BlockSparseTiles,
                           interpret: bool = False):
    """Warp-specialized variant of :func:`.mosaic_gpu.gather_matmul` with a ``2 * rows`` M tile.

    Two compute warpgroups own ``rows`` rows each and share every weight tile; a
    third warpgroup only issues the copies. The weight is read half as often as
    with one warpgroup per tile, which is what bounds the single-warpgroup kernel.
    ``tiles.schedule`` picks one program per output tile or the persistent work
    list (:func:`gather_matmul_persistent`). Either way, output tiles of a
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
        return gather_matmul_persistent(a, blocks, ptr_a, idx, out_dtype, selected, interpret)
    return gather_matmul_per_tile(a, blocks, ptr_a, idx, out_dtype, selected, interpret)


def ws_smem_bytes(tiles: tile_tables.BlockSparseTiles, bn: int, itemsize: int = 2) -> int:
    """Shared memory of the warp-specialized kernel: pipeline stages plus output staging."""
    cta_rows = 2 * tiles.rows
    stage = (cta_rows * tiles.step_k + tiles.step_k * bn) * itemsize
    epi = 64
    return tiles.stages * stage + 2 * 2 * epi * epi * itemsize


def column_order(ptr_a):
    """Block columns by decreasing kept-block count (stable); empty columns come last.

    Computed on the device from the (possibly traced) column pointers, so the
    persistent schedule needs no host-side table.
    """
    counts = ptr_a[1:] - ptr_a[:-1]
    return jnp.argsort(-counts, stable=True).astype(jnp.int32)


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


def _ws_compute_context(o_smem, o_ref, wg, row0, j, rows: int, bn: int, epi: int, out_dtype):
    """The compute warpgroups' context: run the pipeline into a fresh accumulator, store the tile."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    def compute_context(eval_pipeline):
        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((rows, bn), jnp.float32))
        def _acc_scope(acc_ref):
            eval_pipeline(acc_ref)
            acc = acc_ref[...].astype(out_dtype)
            _ws_store_tile(acc, o_smem, o_ref, wg, row0, j * bn, rows, bn, epi, out_dtype)

    return compute_context


def gather_matmul_per_tile(a, blocks, ptr_a, idx, out_dtype,
                                 tiles: tile_tables.BlockSparseTiles, interpret: bool = False):
    """One program per ``(2 * rows, bn)`` output tile; see :func:`gather_matmul_ws`."""
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
    a_transforms = swizzled(step_k, a.dtype)
    b_transforms = swizzled(bn, a.dtype)
    o_transforms = swizzled(epi, out_dtype)

    def body(ptr_ref, idx_ref, a_ref, b_ref, o_ref):
        mi, j = tile_order(jax.lax.axis_index("tile"), m_tiles, ncols, tiles.grid_tile_width,
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
            compute_context = _ws_compute_context(o_smem, o_ref, wg, row0, j, rows, bn, epi,
                                                  out_dtype)

            @pl.when(count > 0)
            def _():
                pipeline(mma, compute_context)(a_ref, b_ref, allocations=allocs)

            @pl.when(jnp.logical_and(count == 0, wg < 2))
            def _():
                _ws_store_tile(None, o_smem, o_ref, wg, row0, j * bn, rows, bn, epi, out_dtype)

            @pl.when(wg < 2)
            def _():
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    call = kernel(body, jax.ShapeDtypeStruct((m, ncols * bn), out_dtype), (m_tiles * ncols,),
                  ("tile",), interpret, num_threads=3, thread_name="wg")
    return call(ptr_a, idx_a, a, b2d)


def gather_matmul_persistent(a, blocks, ptr_a, idx, out_dtype,
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
    order = column_order(ptr_a)
    m_tiles = m // cta_rows
    num_tiles = m_tiles * ncols
    programs = min(num_programs(tiles, interpret), num_tiles)
    epi = 64
    a_transforms = swizzled(step_k, a.dtype)
    b_transforms = swizzled(bn, a.dtype)
    o_transforms = swizzled(epi, out_dtype)

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
                mi, rank = tile_order(lin, m_tiles, ncols, tiles.grid_tile_width, interpret)
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

                compute_context = _ws_compute_context(o_smem, o_ref, wg, row0, j, rows, bn, epi,
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

    call = kernel(body, jax.ShapeDtypeStruct((m, ncols * bn), out_dtype), (programs,), ("sm",),
                  interpret, num_threads=3, thread_name="wg")
    return call(ptr_a, idx_a, order, a, b2d)
