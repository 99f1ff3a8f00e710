"""Block-sparse matmul: packing, reference, kernels in interpret mode (poisoned outputs)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import masks
from sparsejax.kernels import block_sparse as bs
from sparsejax.kernels import tile_tables
from sparsejax.kernels.block_sparse import mosaic_gpu, mosaic_gpu_ws

from kernel_testing import assert_written, rel_error


def _block_mask(kind, grid, rng):
    kb, nb = grid
    if kind == "random":
        m = rng.random(grid) < 0.5
        m[0, 0] = True
        m[:, -1] = False       # an empty block column
        return m
    if kind == "zero":
        return np.zeros(grid, bool)
    if kind == "dense":
        return np.ones(grid, bool)
    if kind == "one_per_row":
        m = np.zeros(grid, bool)
        m[np.arange(kb), rng.integers(0, nb, kb)] = True
        return m
    raise AssertionError(kind)


def _operands(rng, m, k, n, block, kind, dtype=jnp.float32, lead=()):
    w = jnp.asarray(rng.standard_normal((k, n)), dtype)
    grid = (-(-k // block[0]), -(-n // block[1]))
    packed = bs.pack(w, _block_mask(kind, grid, rng), block)
    x = jnp.asarray(rng.standard_normal((*lead, m, k)), dtype)
    return x, packed


# --------------------------------------------------------------------------- packing


def test_pack_keeps_exactly_the_masked_blocks_on_odd_shapes():
    rng = np.random.default_rng(1)
    k, n, block = 37, 29, (8, 16)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    # An element mask from the library's block_mask, on the padded matrix, cut back.
    scores = jnp.asarray(rng.random((40, 32)), jnp.float32)
    elem = np.asarray(masks.block_mask(scores, 0.5, block))[:k, :n]
    packed = bs.pack(w, elem, block)
    np.testing.assert_array_equal(np.asarray(packed.to_dense()), np.where(elem, np.asarray(w), 0))
    assert packed.blocks.shape == (int(packed.block_mask().sum()), 8, 16)
    # Tables: column pointers cover every packed block, rows and columns match the mask.
    t = packed.tables
    assert t.col_ptr[-1] == t.num_blocks == len(t.by_row)
    assert sorted(zip(t.row_of, t.col_of)) == [tuple(v) for v in np.argwhere(packed.block_mask())]


def test_pack_accepts_a_block_mask_and_rebuilds_dense():
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((20, 12)), jnp.float32)
    bmask = rng.random((3, 2)) < 0.6
    packed = bs.pack(w, bmask, (8, 8))
    elem = np.kron(bmask, np.ones((8, 8), bool))[:20, :12]
    np.testing.assert_array_equal(np.asarray(packed.to_dense()), np.where(elem, np.asarray(w), 0))


def test_pack_rejects_bad_input():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((16, 16)), jnp.float32)
    split = np.ones((16, 16), bool)
    split[3, 5] = False
    with pytest.raises(ValueError, match="block-structured"):
        bs.pack(w, split, (8, 8))
    with pytest.raises(ValueError, match="block must be a pair"):
        bs.pack(w, np.ones((2, 2), bool), (8, 0))
    with pytest.raises(ValueError, match="neither the weight shape"):
        bs.pack(w, np.ones((3, 3), bool), (8, 8))
    with pytest.raises(ValueError, match=r"\(K, N\) matrix"):
        bs.pack(w[None], np.ones((2, 2), bool), (8, 8))
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda m: bs.pack(w, m, (8, 8)).blocks)(jnp.ones((2, 2), bool))
    packed = bs.pack(w, np.ones((2, 2), bool), (8, 8))
    with pytest.raises(ValueError, match="last axis"):
        bs.block_sparse_matmul(jnp.ones((3, 15)), packed)
    with pytest.raises(TypeError, match="BlockSparseWeight"):
        bs.block_sparse_matmul(jnp.ones((3, 16)), w)
    with pytest.raises(ValueError, match="interpret must be a bool"):
        bs.block_sparse_matmul(jnp.ones((3, 16)), packed, interpret="mosaic_gpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        bs.block_sparse_matmul(jnp.ones((3, 16)), packed, backend="triton")


def test_pack_works_under_jit_with_traced_weights():
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal((24, 16)), jnp.float32)
    bmask = np.array([[1, 0], [0, 1], [1, 1]], bool)
    eager = bs.pack(w, bmask, (8, 8))
    jitted = jax.jit(lambda w: bs.pack(w, bmask, (8, 8)))(w)
    np.testing.assert_array_equal(np.asarray(jitted.blocks), np.asarray(eager.blocks))
    assert jitted.tables == eager.tables


# --------------------------------------------------------------------------- the kept blocks' product in XLA ops


@pytest.mark.parametrize("kind,m,k,n,block", [
    ("random", 1, 37, 29, (8, 16)), ("one_per_row", 13, 40, 24, (16, 8)), ("zero", 3, 24, 40, (8, 8))])
def test_kept_blocks_product_matches_reference_forward_and_backward(kind, m, k, n, block):
    rng = np.random.default_rng(hash((kind, m, k, n, "blocks")) % 2**32)
    x, packed = _operands(rng, m, k, n, block, kind, lead=(2,))
    # jitted, here and below: one program each, where op by op every operation at every new
    # shape was a program to compile
    out = jax.jit(bs.block_sparse_matmul_blocks)(x, packed)
    assert out.shape == (2, m, n) and out.dtype == x.dtype
    ref = jax.jit(bs.block_sparse_matmul_reference)(x, packed)
    if kind == "zero":
        assert np.abs(np.asarray(out)).max() == 0
    else:
        assert rel_error(out, ref) < 1e-5
    cot = jnp.asarray(rng.standard_normal((2, m, n)), jnp.float32)
    loss = lambda fn: (lambda x, p: jnp.sum(fn(x, p) * cot))
    gx, gp = jax.jit(jax.grad(loss(bs.block_sparse_matmul_blocks), argnums=(0, 1)))(x, packed)
    rx, rp = jax.jit(jax.grad(loss(bs.block_sparse_matmul_reference), argnums=(0, 1)))(x, packed)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(rx), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gp.blocks), np.asarray(rp.blocks), rtol=1e-4, atol=1e-4)


def test_kept_blocks_product_in_bfloat16_accumulates_in_float32():
    rng = np.random.default_rng(21)
    x, packed = _operands(rng, 2, 256, 128, (64, 32), "random", dtype=jnp.bfloat16)
    out = bs.block_sparse_matmul_blocks(x, packed)
    assert out.dtype == jnp.bfloat16
    want = np.asarray(x, np.float64) @ np.asarray(packed.to_dense(), np.float64)
    assert rel_error(out, want) < 1e-2


def test_kept_blocks_product_with_device_tables_ignores_padded_slots():
    rng = np.random.default_rng(22)
    layers, k, n, block = 3, 40, 24, (8, 8)
    grid = (5, 3)
    bmasks = np.stack([rng.random(grid) < d for d in (0.2, 0.5, 0.9)])
    bmasks[0, 0, 0] = True
    w = jnp.asarray(rng.standard_normal((layers, k, n)), jnp.float32)
    stacked = bs.pack_stacked(w, bmasks, block)
    x = jnp.asarray(rng.standard_normal((2, k)), jnp.float32)

    def per_layer(blocks, index):
        # Padded slots (past col_ptr[-1]) poisoned: they must not reach the output.
        real = jnp.arange(stacked.tables.capacity) < index.col_ptr[-1]
        blocks = jnp.where(real[:, None, None], blocks, jnp.nan)
        return bs.block_sparse_matmul_blocks(x, bs.BlockSparseWeight(blocks, stacked.tables, index))

    ys = jax.lax.map(lambda a: per_layer(*a), (stacked.blocks, stacked.index))
    for layer in range(layers):
        dense = np.asarray(w[layer]) * np.kron(bmasks[layer], np.ones(block, bool))[:k, :n]
        np.testing.assert_allclose(np.asarray(ys[layer]), np.asarray(x) @ dense, rtol=1e-5, atol=1e-5)


def test_kept_blocks_product_rejects_a_stack_it_is_not_sliced_from():
    rng = np.random.default_rng(23)
    stacked = bs.pack_stacked(jnp.ones((2, 16, 16)), rng.random((2, 2, 2)) < 0.5, (8, 8))
    with pytest.raises(ValueError, match="block_sparse_matmul_blocks: a stacked weight"):
        bs.block_sparse_matmul_blocks(jnp.ones((1, 16)), stacked)


# --------------------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("kind", ["random", "zero", "dense", "one_per_row"])
@pytest.mark.parametrize("m,k,n,block", [(13, 37, 29, (8, 16)), (5, 24, 40, (8, 8))])
def test_pallas_kernel_forward_matches_reference(kind, m, k, n, block):
    rng = np.random.default_rng(hash((kind, m, k, n)) % 2**32)
    x, packed = _operands(rng, m, k, n, block, kind, lead=(2,))
    ref = bs.block_sparse_matmul_reference(x, packed)
    out = bs.block_sparse_matmul(x, packed, interpret=True, poison=True)
    assert out.shape == (2, m, n)
    assert_written(out)
    if kind == "zero":
        assert np.abs(np.asarray(out)).max() == 0
    else:
        assert rel_error(out, ref) < 1e-5
    # The reference itself is the masked dense product.
    np.testing.assert_allclose(np.asarray(ref), np.asarray(x @ packed.to_dense()), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["random", "zero", "one_per_row"])
def test_pallas_kernel_gradients_match_reference(kind):
    rng = np.random.default_rng({"random": 11, "zero": 12, "one_per_row": 13}[kind])
    x, packed = _operands(rng, 11, 37, 29, (8, 16), kind)
    cot = jnp.asarray(rng.standard_normal((11, 29)), jnp.float32)

    def loss(fn, x, p):
        return jnp.sum(fn(x, p) * cot)

    kern = lambda x, p: bs.block_sparse_matmul(x, p, interpret=True, poison=True)
    gx_r, gp_r = jax.jit(jax.grad(functools.partial(loss, bs.block_sparse_matmul_reference), (0, 1)))(
        x, packed)
    gx_k, gp_k = jax.jit(jax.grad(functools.partial(loss, kern), (0, 1)))(x, packed)
    assert isinstance(gp_k, bs.BlockSparseWeight) and gp_k.tables == packed.tables
    assert_written(gx_k, gp_k.blocks)
    if kind == "zero":
        assert np.abs(np.asarray(gx_k)).max() == 0 and gp_k.blocks.shape[0] == 0
        return
    assert rel_error(gx_k, gx_r) < 1e-5
    assert rel_error(gp_k.blocks, gp_r.blocks) < 1e-5
    # dW is exactly x^T @ dy at the kept blocks.
    dense_dw = np.asarray(x).T @ np.asarray(cot)
    np.testing.assert_allclose(np.asarray(gp_k.to_dense()),
                               np.where(np.asarray(packed.to_dense()) != 0, dense_dw, 0),
                               rtol=1e-4, atol=1e-4)


def test_mosaic_gpu_kernel_in_interpret_mode_forward_and_backward():
    rng = np.random.default_rng(21)
    # Odd M, K and N; two block columns, one of them empty.
    w = jnp.asarray(rng.standard_normal((100, 120)), jnp.bfloat16)
    packed = bs.pack(w, np.array([[False, True]]), (128, 64))
    x = jnp.asarray(rng.standard_normal((50, 100)), jnp.bfloat16)
    cot = jnp.asarray(rng.standard_normal((50, 120)), jnp.float32)

    def loss(fn, x, p):
        return jnp.sum(fn(x, p).astype(jnp.float32) * cot)

    kern = lambda x, p: bs.block_sparse_matmul(x, p, backend="mosaic_gpu", interpret=True)
    y_k = jax.jit(kern)(x, packed)
    y_r = jax.jit(bs.block_sparse_matmul_reference)(x, packed)
    assert_written(y_k)
    assert rel_error(y_k, y_r) < 1e-2
    gx_r, gp_r = jax.jit(jax.grad(functools.partial(loss, bs.block_sparse_matmul_reference), (0, 1)))(
        x, packed)
    gx_k, gp_k = jax.jit(jax.grad(functools.partial(loss, kern), (0, 1)))(x, packed)
    assert_written(gx_k)
    assert rel_error(gx_k, gx_r) < 1e-2
    assert rel_error(gp_k.blocks, gp_r.blocks) < 1e-2


def test_kernel_composes_with_jit_and_packed_weights_as_arguments():
    rng = np.random.default_rng(31)
    x, packed = _operands(rng, 9, 24, 40, (8, 8), "random")
    f = jax.jit(lambda x, p: bs.block_sparse_matmul(x, p, interpret=True))
    assert rel_error(f(x, packed), bs.block_sparse_matmul_reference(x, packed)) < 1e-5


def test_cpu_without_interpret_uses_the_reference():
    rng = np.random.default_rng(41)
    x, packed = _operands(rng, 7, 24, 16, (8, 8), "random")
    reason = bs.supported(packed.shape, x.dtype, packed.block, backend="cpu")
    assert "reference" in reason
    assert "reference" in bs.supported(packed.shape, x.dtype, packed.block, backend="reference")
    np.testing.assert_array_equal(np.asarray(bs.block_sparse_matmul(x, packed, backend="cpu")),
                                  np.asarray(bs.block_sparse_matmul_reference(x, packed)))


def test_supported_names_the_reason():
    assert bs.supported((8192, 8192), jnp.bfloat16, (128, 128), backend="gpu") is None
    assert bs.supported((8192, 8192), jnp.bfloat16, (128, 128), backend="mosaic_gpu") is None
    assert bs.describe("gpu") == "Mosaic GPU block-sparse kernel"
    assert "float32" in bs.supported((8192, 8192), jnp.float32, (128, 128), backend="gpu")
    assert "(64, 128)" in bs.supported((8192, 8192), jnp.bfloat16, (32, 128), backend="gpu")
    assert "multiples of 128" in bs.supported((512, 512), jnp.bfloat16, (64, 128), backend="tpu")
    assert bs.supported((512, 512), jnp.float32, (128, 128), backend="tpu") is None
    # Interpret mode runs the pallas_call kernel at any block.
    assert bs.supported((512, 512), jnp.float32, (8, 16), interpret=True) is None


def test_warp_specialized_mosaic_gpu_kernel_in_interpret_mode():
    # The shipped GPU path: two compute warpgroups, an empty block column zeroed by the kernel.
    rng = np.random.default_rng(51)
    w = jnp.asarray(rng.standard_normal((128, 128)), jnp.bfloat16)
    packed = bs.pack(w, np.array([[True, False]]), (128, 64))
    x = jnp.asarray(rng.standard_normal((128, 128)), jnp.bfloat16)
    tiles = tile_tables.BlockSparseTiles(rows=64, step_k=64, stages=2, grid_tile_width=1,
                                            warp_specialized=True)
    t = packed.tables
    out = mosaic_gpu_ws.gather_matmul_ws(x, packed.blocks, t.col_ptr, t.row_of, jnp.bfloat16, tiles,
                                    interpret=True)
    ref = bs.block_sparse_matmul_reference(x, packed)
    assert_written(out)
    assert np.abs(np.asarray(out[:, 64:], np.float32)).max() == 0
    assert rel_error(out, ref) < 1e-2


@pytest.mark.parametrize("m_tiles,ncols,width", [(1, 1, 4), (5, 3, 4), (7, 2, 8), (8, 5, 4)])
def test_tile_order_visits_every_output_tile_once(m_tiles, ncols, width):
    mi, j = mosaic_gpu.tile_order(jnp.arange(m_tiles * ncols), m_tiles, ncols, width, interpret=True)
    pairs = sorted(zip(np.asarray(mi).tolist(), np.asarray(j).tolist()))
    assert pairs == [(a, b) for a in range(m_tiles) for b in range(ncols)]
