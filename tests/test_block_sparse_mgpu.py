"""Mosaic GPU block-sparse kernels on CPU: interpret mode, lowering for CUDA, schedule choice.

Interpret mode simulates every warpgroup (seconds per program), so the shapes
here are the smallest that still hold an empty block column, a single-block
column and a longer one. It does not check GPU limits; the lowering test runs
Mosaic GPU's real lowering for CUDA (no GPU needed) at FFN-like shapes, and
the shared-memory estimate is checked against the H100/H200 limit.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.kernels import block_sparse as bs
from sparsejax.kernels.block_sparse import mosaic_gpu, mosaic_gpu_ws
from sparsejax.kernels import tile_tables as tt

from kernel_testing import assert_matches_reference

SMEM_LIMIT = 227 * 1024   # bytes of shared memory one block may use on sm_90


def test_persistent_kernel_matches_reference_with_traced_tables():
    rng = np.random.default_rng()
    # Block columns: empty, one kept block, two kept blocks; the work list puts the
    # longest first and the empty one last, and two programs share the three tiles.
    bmask = np.array([[False, False, True], [False, True, True]])
    w = jnp.asarray(rng.standard_normal((128, 192)), jnp.bfloat16)
    packed = bs.pack(w, bmask, (64, 64))
    x = jnp.asarray(rng.standard_normal((128, 128)), jnp.bfloat16)
    tiles = tt.BlockSparseTiles(rows=64, step_k=64, stages=2, grid_tile_width=1,
                                warp_specialized=True, schedule="persistent", num_programs=2)
    t = packed.tables

    @jax.jit
    def run(x, blocks, ptr, idx):   # the tables arrive traced, as per-layer device arrays would
        return mosaic_gpu_ws.gather_matmul_ws(x, blocks, ptr, idx, jnp.bfloat16, tiles, interpret=True)

    out = run(x, packed.blocks, jnp.asarray(t.col_ptr, jnp.int32), jnp.asarray(t.row_of, jnp.int32))
    ref = bs.block_sparse_matmul_reference(x, packed)
    assert_matches_reference(out, ref, 1e-2)
    # The empty column is zeroed by the kernel itself (interpret mode starts from NaN).
    assert np.abs(np.asarray(out[:, :64], np.float32)).max() == 0


def test_dw_kernel_split_over_m_matches_sampled_product():
    rng = np.random.default_rng()
    m, bk, bn = 128, 64, 64
    x = jnp.asarray(rng.standard_normal((m, 2 * bk)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((m, 3 * bn)), jnp.bfloat16)
    rows_of, cols_of = jnp.asarray([1], jnp.int32), jnp.asarray([2], jnp.int32)
    tiles = tt.BlockSparseTiles(rows=64, step_k=64, stages=2, dw_split=2)
    assert mosaic_gpu.dw_split(tiles, 1, m, 64, interpret=True) == 2
    out = mosaic_gpu.sampled_matmul(x, g, rows_of, cols_of, bk, bn, jnp.bfloat16, tiles,
                                  interpret=True)
    dense = np.asarray(x, np.float32).T @ np.asarray(g, np.float32)
    assert out.shape == (1, bk, bn)
    assert_matches_reference(out[0], dense[bk:, 2 * bn:], 1e-2)


def test_dw_split_divides_the_steps_and_balances_waves():
    base = tt.BlockSparseTiles(rows=128)
    for nnzb in (26, 41, 410, 1024, 5000):   # M = 8192 in 128 steps of 64, 132 SMs
        split = mosaic_gpu.dw_split(base, nnzb, 8192, 64, interpret=False)
        assert 128 % split == 0 and 128 // split >= 8
    # 26 blocks would keep 26 of 132 SMs busy: split. From a few hundred blocks on,
    # the float32 partial sums cost more than the last wave's idle SMs.
    assert mosaic_gpu.dw_split(base, 26, 8192, 64, interpret=False) > 1
    assert mosaic_gpu.dw_split(base, 410, 8192, 64, interpret=False) == 1
    assert mosaic_gpu.dw_split(base, 5000, 8192, 64, interpret=False) == 1
    assert mosaic_gpu.dw_split(base, 5, 64, 64, interpret=False) == 1             # one step of M
    assert mosaic_gpu.dw_split(dataclasses.replace(base, dw_split=3), 26, 8192, 64, False) == 2


def _cuda_lowering(fn, *args):
    try:
        return jax.export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()
    except Exception as e:  # noqa: BLE001 - only a missing CUDA lowering is a skip
        if "cuda" in str(e).lower() and "platform" in str(e).lower():
            pytest.skip(f"no CUDA lowering in this jaxlib: {e}")
        raise


@pytest.mark.parametrize("name,fields", [
    ("tile", dict(schedule="tile")),
    ("persistent", dict(schedule="persistent")),
    ("persistent rows 64, dW transposed in kernel",
     dict(schedule="persistent", rows=64, dw_transpose_in_kernel=True)),
])
def test_forward_and_backward_lower_for_cuda(name, fields):
    # Up projection at density 0.1: most block columns hold zero or one block.
    rng = np.random.default_rng(7)
    k, n, m = 1024, 4096, 512
    bmask = rng.random((k // 128, n // 128)) < 0.1
    bmask[:, 0] = False
    bmask[:, 1] = False
    bmask[0, 1] = True
    packed = bs.pack(jnp.zeros((k, n), jnp.bfloat16), bmask, (128, 128))
    x = jnp.zeros((m, k), jnp.bfloat16)
    g = jnp.zeros((m, n), jnp.bfloat16)
    tiles = dataclasses.replace(tt._BLOCK_SPARSE["gpu"], **fields)
    assert mosaic_gpu_ws.ws_smem_bytes(tiles, 128) <= SMEM_LIMIT

    def fwd_bwd(x, p, g):
        y, pull = jax.vjp(lambda x, p: bs.block_sparse_matmul(x, p, backend="gpu"), x, p)
        return y, pull(g)

    with tt.using_block_sparse_tiles("gpu", tiles):
        module = _cuda_lowering(fwd_bwd, x, packed, g)
    # Forward, dx and dW: three Mosaic GPU kernels, no XLA scatter for empty columns.
    assert module.count("@mosaic_gpu") == 3
    assert "scatter" not in module


def test_auto_schedule_follows_block_column_length_and_measured_entries():
    base = tt.BlockSparseTiles(rows=128, warp_specialized=True, schedule="auto")
    short = tt.select_block_sparse_tiles(base, m=8192, k=1024, n=4096, nnzb=26, block=(128, 128))
    long = tt.select_block_sparse_tiles(base, m=8192, k=8192, n=8192, nnzb=2048, block=(128, 128))
    assert short.schedule == "persistent" and long.schedule == "tile"
    fixed = dataclasses.replace(base, schedule="tile")
    assert tt.select_block_sparse_tiles(fixed, m=8192, k=1024, n=4096, nnzb=26,
                                        block=(128, 128)) is fixed
    measured = {(1024, 4096): {0.1: {"schedule": "tile", "rows": 64}, 0.5: {"schedule": "persistent"}}}
    saved = dict(tt._GPU_BY_SHAPE)
    try:
        tt._GPU_BY_SHAPE.clear()
        tt._GPU_BY_SHAPE.update(measured)
        got = tt.select_block_sparse_tiles(base, m=8192, k=1024, n=4096, nnzb=30, block=(128, 128))
        assert (got.schedule, got.rows) == ("tile", 64)
        got = tt.select_block_sparse_tiles(base, m=8192, k=1024, n=4096, nnzb=120, block=(128, 128))
        assert (got.schedule, got.rows) == ("persistent", 128)
    finally:
        tt._GPU_BY_SHAPE.clear()
        tt._GPU_BY_SHAPE.update(saved)
    with pytest.raises(ValueError, match="schedule must be one of"):
        tt.BlockSparseTiles(rows=128, schedule="split-k")
