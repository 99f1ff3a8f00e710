"""Mosaic GPU block-sparse kernels (Hopper: ``plgpu.kernel`` + ``plgpu.wgmma``).

GPU backends have no scalar prefetch, so the index tables are ordinary
operands read from global memory inside the pipelines' index maps; a
pipeline's trip count is the column's kept-block count (a dynamic grid), so
empty and sparse columns cost nothing. This file holds what the kernels share
(the launcher, the order of output tiles, the store of a finished tile), the
single-warpgroup forward kernel (:func:`gather_matmul`, for an M the
warp-specialized tile does not divide) and the dW kernel
(:func:`sampled_matmul`). The warp-specialized forward kernels are in
:mod:`.mosaic_gpu_ws`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sparsejax.kernels import tile_tables
from sparsejax.kernels._mosaic_gpu import interpret_params, swizzled

__all__ = ["kernel", "tile_order", "store_tile", "num_programs", "gather_matmul", "dw_split",
           "sampled_matmul"]


def kernel(body, out_type, grid, grid_names, interpret: bool, **threads):
    """``plgpu.kernel`` with warpgroup semantics; ``threads``: ``num_threads``/``thread_name``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    kwargs = {"interpret": interpret_params()} if interpret else {}
    return plgpu.kernel(
        body, out_type=out_type, grid=grid, grid_names=grid_names, **threads,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **kwargs)


def tile_order(lin, m_tiles: int, ncols: int, width: int, interpret: bool):
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


def store_tile(acc, o_gmem, dtype, transforms):
    """Stores a finished ``acc`` tile through shared memory to ``o_gmem()``, a slice of the output.

    ``o_gmem`` is called inside the staging buffer's scope, where the slice's
    offsets are computed.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM(acc.shape, dtype, transforms=transforms))
    def _store(o_smem):
        o_smem[...] = acc.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem())
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def num_programs(tiles: tile_tables.BlockSparseTiles, interpret: bool) -> int:
    """Programs of a persistent kernel: ``tiles.num_programs``, else one per SM."""
    if tiles.num_programs:
        return tiles.num_programs
    if interpret:   # a few simulated programs, so that each walks several tiles
        return 3
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def gather_matmul(a, blocks, ptr, idx, out_dtype, tiles: tile_tables.BlockSparseTiles,
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
    a_transforms = swizzled(step_k, a.dtype)
    b_transforms = swizzled(bn, a.dtype)
    o_transforms = swizzled(bn, out_dtype)

    def body(ptr_ref, idx_ref, a_ref, b_ref, o_ref):
        mi, j = tile_order(jax.lax.axis_index("tile"), m_tiles, ncols, tiles.grid_tile_width,
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

        store_tile(acc, lambda: o_ref.at[pl.ds(mi * rows, rows), pl.ds(j * bn, bn)], out_dtype,
                   o_transforms)

    call = kernel(body, jax.ShapeDtypeStruct((m, ncols * bn), out_dtype), (m_tiles * ncols,),
                  ("tile",), interpret)
    return call(ptr_a, idx_a, a, b2d)


# Leads for the dW split's cost model (H100/H200): wgmma rate of one SM, device bandwidth.
_SM_FLOPS = 6e12
_DEVICE_BYTES_PER_S = 3.5e12


def dw_split(tiles: tile_tables.BlockSparseTiles, nnzb: int, m: int, step_m: int,
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
    sms = num_programs(dataclasses.replace(tiles, num_programs=0), interpret)
    step_s = 2 * bk * bn * step_m / _SM_FLOPS
    partial_s = nnzb * bk * bn * 4 * 2 / _DEVICE_BYTES_PER_S   # one chunk's f32 sums, out and in

    def cost(d):
        waves = -(-nnzb * d // sms)
        return waves * (steps // d + 4) * step_s + (d * partial_s if d > 1 else 0.0)

    candidates = [d for d in range(1, steps + 1) if steps % d == 0 and steps // d >= 8] or [1]
    return min(candidates, key=lambda d: (cost(d), d))


def sampled_matmul(a, g, rows_of, cols_of, bk: int, bn: int, out_dtype,
                         tiles: tile_tables.BlockSparseTiles, interpret: bool = False):
    """Mosaic GPU: ``out[b] = a[:, rows_of[b]-tile]^T @ g[:, cols_of[b]-tile]`` per kept block.

    Each program owns one kept block and one of ``split`` chunks of M
    (:func:`dw_split`): with few kept blocks (a narrow layer at low density) one
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
    split = dw_split(tiles, nnzb, m, step_m, interpret, bk, bn)
    chunk_steps = m // step_m // split
    transposed = tiles.dw_transpose_in_kernel
    b_transforms = swizzled(bn, a.dtype)
    acc_dtype = out_dtype if split == 1 else jnp.float32
    o_transforms = swizzled(bn, acc_dtype)
    if transposed:
        x_op, a_block, a_transforms = a, (step_m, bk), swizzled(bk, a.dtype)
        a_index = lambda r, s: (s, r)
    else:
        x_op, a_block, a_transforms = a.T, (bk, step_m), swizzled(step_m, a.dtype)   # (K, M)
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

        store_tile(acc, lambda: o_ref.at[pl.ds(lin * bk, bk)], acc_dtype, o_transforms)

    call = kernel(body, jax.ShapeDtypeStruct((split * nnzb * bk, bn), acc_dtype), (split * nnzb,),
                  ("block",), interpret)
    out = call(r_a, c_a, x_op, g)
    if split == 1:
        return out.reshape(nnzb, bk, bn)
    return out.reshape(split, nnzb, bk, bn).sum(0).astype(out_dtype)
