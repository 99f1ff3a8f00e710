"""Compressed N:M weights: packing round trip, kernel in interpret mode (poisoned) vs reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import masks
from sparsejax.kernels import nm_compressed as nm
from sparsejax.kernels import tile_tables

from kernel_testing import assert_written, jit_call, rel_error


def _nm_weight(rng, k, n_cols, n, m):
    # jitted, as the kernels and references below: one program, where op by op every
    # operation at every new shape was a program to compile
    w = jnp.asarray(rng.standard_normal((k, n_cols)), jnp.float32)
    return jax.jit(lambda w: jnp.where(masks.nm_mask(jnp.abs(w), n, m), w, 0))(w)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_compress_round_trips_and_counts_bytes(n, m):
    rng = np.random.default_rng(10 * n + m)
    k, cols = 12 * m, 23                      # 12 groups: padded up to the group tile of 8
    wm = _nm_weight(rng, k, cols, n, m)
    packed = nm.compress_nm(wm, n, m, group_tile=8)
    np.testing.assert_array_equal(np.asarray(packed.to_dense()), np.asarray(wm))
    bits = 2 if m <= 4 else 4
    assert packed.meta.dtype == jnp.uint8
    assert packed.meta.shape == (n, 16 * bits // 8, cols)
    idx = np.asarray(packed.indices())[:, :12]
    assert idx.min() >= 0 and idx.max() < m
    assert (np.diff(idx, axis=0) > 0).all()   # distinct, increasing positions per group


def test_compress_with_explicit_mask_and_underfull_groups():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((16, 9)), jnp.float32)
    mask = np.array(masks.nm_mask(jnp.abs(w), 2, 4))
    mask[0:4, 0] = [True, False, False, False]           # one kept entry in this group
    packed = nm.compress_nm(w, 2, 4, mask=mask, group_tile=8)
    np.testing.assert_array_equal(np.asarray(packed.to_dense()), np.where(mask, np.asarray(w), 0))


def test_compress_rejects_bad_input():
    w = jnp.ones((16, 8))
    with pytest.raises(ValueError, match="0 < n <= m"):
        nm.compress_nm(w, 5, 4)
    with pytest.raises(ValueError, match="must divide the reduction size"):
        nm.compress_nm(jnp.ones((18, 8)), 2, 4)
    with pytest.raises(ValueError, match="more than n=2"):
        nm.compress_nm(w, 2, 4, mask=np.ones((16, 8), bool))
    with pytest.raises(ValueError, match="m=32 > 16"):
        nm.compress_nm(jnp.ones((32, 8)), 2, 32)
    with pytest.raises(ValueError, match="group_tile"):
        nm.compress_nm(w, 2, 4, group_tile=6)
    packed = nm.compress_nm(w, 2, 4, group_tile=8)
    with pytest.raises(ValueError, match="last axis"):
        nm.nm_matmul(jnp.ones((1, 15)), packed)
    with pytest.raises(TypeError, match="NMWeight"):
        nm.nm_matmul(jnp.ones((1, 16)), w)


@pytest.mark.parametrize("x_access", tile_tables.X_ACCESSES)
@pytest.mark.parametrize("n,m,batch", [(2, 4, 1), (2, 4, 3), (2, 8, 2)])
def test_kernel_matches_reference(n, m, batch, x_access, monkeypatch):
    monkeypatch.setattr(nm, "X_ACCESS", x_access)
    rng = np.random.default_rng(100 * n + 10 * m + batch + 1000 * tile_tables.X_ACCESSES.index(x_access))
    k, cols = 10 * m, 37                      # odd column count, groups padded to the tile
    wm = _nm_weight(rng, k, cols, n, m)
    packed = nm.compress_nm(wm, n, m, group_tile=8)
    x = jnp.asarray(rng.standard_normal((batch, k)), jnp.float32)
    reason = nm.supported(packed.shape, x.dtype, batch, interpret=True)
    if reason is not None and jax.default_backend() == "gpu":
        pytest.skip(reason)        # compiled for the GPU (gpu_kernel_tests.sh): batches it sends to XLA
    assert reason is None
    out = jit_call(nm.nm_matmul, x, packed, interpret=True, poison=True)
    ref = jit_call(nm.nm_matmul_reference, x, packed)
    assert out.shape == (batch, cols)
    assert_written(out)
    assert rel_error(out, ref) < 1e-5
    assert rel_error(ref, np.asarray(x) @ np.asarray(wm)) < 1e-5


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
@pytest.mark.parametrize("batch", [1, 2])
def test_natural_x_gather_matches_reference(n, m, batch, monkeypatch):
    monkeypatch.setattr(nm, "X_ACCESS", "gather")
    rng = np.random.default_rng(1000 + 100 * n + 10 * m + batch)
    group_tile = 8
    # 29 groups: K is not a multiple of group_tile * m (x is padded to 32 groups), and the
    # 4 group tiles split K 4 ways, so the gathers cross splits at global group offsets.
    k, cols = 29 * m, 37                      # 37 columns: not a multiple of the cols tile
    tiles = tile_tables.nm_tiles("interpret", batch)
    assert nm._choose_splits(4, -(-cols // tiles.cols), tiles.target_programs) == 4
    wm = _nm_weight(rng, k, cols, n, m)
    packed = nm.compress_nm(wm, n, m, group_tile=group_tile)
    x = jnp.asarray(rng.standard_normal((batch, k)), jnp.float32)
    out = jit_call(nm.nm_matmul, x, packed, interpret=True, poison=True)
    assert out.shape == (batch, cols)
    assert_written(out)
    assert rel_error(out, jit_call(nm.nm_matmul_reference, x, packed)) < 1e-5


@pytest.mark.parametrize("batch", [1, 2])
def test_natural_x_gather_lowers_to_triton_reading_x_as_it_is(batch, monkeypatch):
    """The GPU table's launch lowers to one Triton call whose x operand is x itself (lowered
    for CUDA on this machine: Pallas to Triton IR, no PTX)."""
    pytest.importorskip("jaxlib.triton")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")   # so the call gets Triton params
    k = cols = 8192
    tiles = tile_tables.nm_tiles("gpu", batch)
    assert tiles.x_access == "gather"
    packed = jax.eval_shape(lambda w: nm.compress_nm(w, 2, 4), jax.ShapeDtypeStruct((k, cols), jnp.bfloat16))
    x = jax.ShapeDtypeStruct((batch, k), jnp.bfloat16)
    call = jax.jit(lambda x, v, mt: nm._nm_apply(
        x, v, mt, (packed.shape, 2, 4, packed.group_tile, tiles.cols, False, False)))
    hlo = call.trace(x, packed.values, packed.meta).lower(lowering_platforms=("cuda",)).as_text()
    [triton_call] = [line for line in hlo.splitlines() if "xla.gpu.triton" in line]
    assert triton_call.split("(")[1].startswith("%arg0,")   # x, neither padded nor transposed
    assert "transpose" not in hlo


def test_gradients_match_reference():
    rng = np.random.default_rng(7)
    wm = _nm_weight(rng, 20, 21, 2, 4)
    packed = nm.compress_nm(wm, 2, 4, group_tile=8)
    x = jnp.asarray(rng.standard_normal((2, 20)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((2, 21)), jnp.float32)

    def loss(fn, x, p):
        return jnp.sum(fn(x, p) * cot)

    kern = lambda x, p: nm.nm_matmul(x, p, interpret=True)
    gx_r, gp_r = jax.jit(jax.grad(lambda x, p: loss(nm.nm_matmul_reference, x, p), (0, 1),
                                  allow_int=True))(x, packed)
    gx_k, gp_k = jax.jit(jax.grad(lambda x, p: loss(kern, x, p), (0, 1), allow_int=True))(x, packed)
    assert rel_error(gx_k, gx_r) < 1e-5
    assert rel_error(gp_k.values, gp_r.values) < 1e-5


def test_large_batch_and_cpu_fall_back_to_reference():
    rng = np.random.default_rng(8)
    packed = nm.compress_nm(_nm_weight(rng, 16, 8, 2, 4), 2, 4, group_tile=8)
    assert "batch 64" in nm.supported(packed.shape, jnp.bfloat16, 64, backend="gpu")
    assert "reference" in nm.supported(packed.shape, jnp.float32, backend="cpu")
    assert nm.supported((8192, 8192), jnp.bfloat16, 1, backend="gpu") is None
    assert nm.supported((8192, 8192), jnp.bfloat16, 1, backend="triton") is None
    with pytest.raises(ValueError, match="backend must be one of"):
        nm.supported((8192, 8192), jnp.bfloat16, 1, backend="mosaic_gpu")
    x = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(nm.nm_matmul(x, packed, backend="cpu")),
                                  np.asarray(nm.nm_matmul_reference(x, packed)))
