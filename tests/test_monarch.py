"""Monarch and block-diagonal math (sparsejax.monarch) and the Flax layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from sparsejax import monarch
from sparsejax.compiler.interpreter import sub_jaxprs
from sparsejax.models.monarch import BlockDiagonalDense, MonarchDense

# (K, N, nblocks): square, expanding, shrinking, and shapes nblocks does not divide
# (K, N or the intermediate block size q).
SHAPES = [(8, 20, 4), (20, 8, 4), (10, 13, 3), (7, 11, 2)]


def _keys(seed, n):
    return jax.random.split(jax.random.PRNGKey(seed), n)


def _fly_multiply(x, w1, w2, n):
    """fly's reference (dense block-diagonals and the two reshapes), in numpy."""
    nb, q, p = w1.shape
    s = w2.shape[1]
    t = x.shape[0]
    x = np.pad(x, ((0, 0), (0, nb * p - x.shape[1])))
    h = x @ scipy.linalg.block_diag(*w1).T
    h = h.reshape(t, q, nb).transpose(0, 2, 1).reshape(t, -1)
    z = h @ scipy.linalg.block_diag(*w2).T
    return z.reshape(t, nb, s).transpose(0, 2, 1).reshape(t, -1)[:, :n]


@pytest.mark.parametrize("k,n,nb", SHAPES)
def test_reference_matches_fly_layout(k, n, nb):
    kf, kx = _keys(k * n + nb, 2)
    f = monarch.init_factors(kf, k, n, nb)
    x = jax.random.normal(kx, (5, k))
    want = _fly_multiply(np.asarray(x, np.float64), np.asarray(f["w1"], np.float64),
                         np.asarray(f["w2"], np.float64), n)
    np.testing.assert_allclose(monarch.matmul_reference(x, f, n), want, rtol=1e-5, atol=1e-5)


def test_factor_shapes_follow_fly():
    assert monarch.monarch_shapes(4096, 16384, 4) == ((4, 1024, 1024), (4, 4096, 1024))
    assert monarch.monarch_shapes(16384, 4096, 4) == ((4, 1024, 4096), (4, 1024, 1024))
    assert monarch.monarch_shapes(10, 13, 3) == ((3, 4, 4), (3, 5, 4))


@pytest.mark.parametrize("k,n,nb", SHAPES)
def test_sparse_to_dense_preserves_outputs(k, n, nb):
    kf, kx = _keys(k + n * nb, 2)
    f = monarch.init_factors(kf, k, n, nb)
    x = jax.random.normal(kx, (6, k))
    w = monarch.to_dense(f, k, n)
    assert w.shape == (k, n)
    np.testing.assert_allclose(x @ w, monarch.matmul_reference(x, f, n), rtol=1e-5, atol=1e-6)


# Shapes whose intermediate block q is a multiple of nblocks: to_dense takes the direct
# block product there (the SHAPES above take the identity pushed through the factors).
BLOCK_SHAPES = [(16, 16, 4), (16, 64, 4), (64, 16, 4), (36, 36, 3), (34, 54, 3), (72, 18, 3)]


@pytest.mark.parametrize("k,n,nb", BLOCK_SHAPES)
def test_direct_dense_matches_fly_layout(k, n, nb):
    f = monarch.init_factors(_keys(k + 7 * n + nb, 1)[0], k, n, nb)
    nbq, q, _ = f["w1"].shape
    assert q % nbq == 0   # the shape takes the direct product
    eye = np.eye(k)
    want = _fly_multiply(eye, np.asarray(f["w1"], np.float64), np.asarray(f["w2"], np.float64), n)
    np.testing.assert_allclose(np.asarray(monarch.to_dense(f, k, n)), want, rtol=1e-5, atol=1e-6)
    stacked = {"w1": jnp.stack([f["w1"], -2.0 * f["w1"]]), "w2": jnp.stack([f["w2"], f["w2"]])}
    both = monarch.to_dense(stacked, k, n)
    np.testing.assert_allclose(np.asarray(both[1]), -2.0 * want, rtol=1e-5, atol=1e-6)


def test_bf16_rebuild_and_its_gradient_multiply_in_bf16():
    """A bf16 site rebuilding its weight (the ``xla_dense`` path) must not run float32 GEMMs:
    on the H200 the identity-through-the-factors rebuild and its gradient ran as float32
    SIMT GEMMs, 25 ms of an 85 ms training step."""
    f = monarch.init_factors(_keys(3, 1)[0], 64, 256, 4)
    fb = jax.tree.map(lambda a: a.astype(jnp.bfloat16), f)
    g = jax.random.normal(_keys(4, 1)[0], (64, 256), jnp.bfloat16)
    loss = lambda fb: jnp.sum(monarch.to_dense(fb, 64, 256).astype(jnp.float32) * g)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(fb)
    dots = []

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "dot_general":
                dots.append(tuple(v.aval.dtype for v in eqn.invars))
            for _, sub in sub_jaxprs(eqn):
                walk(sub)
    walk(jaxpr.jaxpr)
    assert len(dots) >= 3   # the rebuild and one product per factor's gradient
    assert all(d == (jnp.bfloat16, jnp.bfloat16) for d in dots), dots
    want = monarch.to_dense(jax.tree.map(lambda a: a.astype(jnp.float32), fb), 64, 256)
    got = monarch.to_dense(fb, 64, 256)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("k,n,nb", SHAPES)
def test_projection_recovers_structured_matrix(k, n, nb):
    f = monarch.init_factors(_keys(3 * k + n, 1)[0], k, n, nb)
    w = monarch.to_dense(f, k, n)
    w_back = monarch.to_dense(monarch.project(w, nb), k, n)
    np.testing.assert_allclose(w_back, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k,n,nb", [(12, 12, 3), (20, 8, 4)])
def test_projection_beats_random_and_perturbed_factors(k, n, nb):
    kw, kr, kp = _keys(k * nb + n, 3)
    w = jax.random.normal(kw, (k, n))
    f = monarch.project(w, nb)
    err = float(jnp.linalg.norm(monarch.to_dense(f, k, n) - w))
    for i, key in enumerate(jax.random.split(kr, 2)):
        rnd = monarch.init_factors(key, k, n, nb)
        assert err < float(jnp.linalg.norm(monarch.to_dense(rnd, k, n) - w))
        # Optimal: small moves of the factors never bring it closer.
        eps = jax.tree.map(lambda a, kk=jax.random.fold_in(kp, i): 1e-2 * jax.random.normal(kk, a.shape), f)
        moved = jax.tree.map(jnp.add, f, eps)
        assert err <= float(jnp.linalg.norm(monarch.to_dense(moved, k, n) - w)) + 1e-6


def test_projection_equals_per_block_svd_bound():
    # Square, divisible: each (out-block, in-block) sub-matrix gets rank q / nblocks, so the
    # error is the norm of the discarded singular values of every sub-matrix.
    k = n = 16
    nb = 4
    w = jax.random.normal(_keys(7, 1)[0], (k, n))
    m = np.asarray(w.T, np.float64)
    blocks = m.reshape(4, nb, nb, 4).transpose(1, 2, 0, 3)   # rows j, j + nb, ...; contiguous cols
    sv = np.linalg.svd(blocks, compute_uv=False)
    bound = np.sqrt((sv[..., 1:] ** 2).sum())
    err = float(jnp.linalg.norm(monarch.to_dense(monarch.project(w, nb), k, n) - w))
    np.testing.assert_allclose(err, bound, rtol=1e-4)


def test_stacked_layers_and_vmap():
    kw, kx = _keys(11, 2)
    w = jax.random.normal(kw, (3, 10, 13))
    f = monarch.project(w, 3)
    assert f["w1"].shape == (3, 3, 4, 4) and f["w2"].shape == (3, 3, 5, 4)
    for layer in range(3):
        one = monarch.project(w[layer], 3)
        np.testing.assert_allclose(f["w1"][layer], one["w1"], rtol=1e-5, atol=1e-6)
    dense = monarch.to_dense(f, 10, 13)
    assert dense.shape == (3, 10, 13)
    x = jax.random.normal(kx, (3, 4, 10))
    y = jax.vmap(lambda x, f: monarch.matmul_reference(x, f, 13))(x, f)
    np.testing.assert_allclose(y, jnp.einsum("lbk,lkn->lbn", x, dense), rtol=1e-4, atol=1e-5)
    g = monarch.init_factors(kx, 10, 13, 3, stack_shape=(2,))
    assert g["w1"].shape == (2, 3, 4, 4)


def test_init_output_variance_matches_dense():
    k, n, nb = 250, 300, 4     # padded on both sides
    var = []
    for key in _keys(5, 4):
        kf, kx = jax.random.split(key)
        f = monarch.init_factors(kf, k, n, nb)
        x = jax.random.normal(kx, (512, k))
        var.append(float(jnp.var(monarch.matmul_reference(x, f, n))))
    # Dense LeCun init: output variance K * (1 / K) = 1.
    np.testing.assert_allclose(np.mean(var), 1.0, rtol=0.1)
    f = monarch.init_factors(_keys(6, 1)[0], k, n, nb, dense_std=0.2)
    x = jax.random.normal(_keys(8, 1)[0], (2048, k))
    np.testing.assert_allclose(float(jnp.var(monarch.matmul_reference(x, f, n))), k * 0.04, rtol=0.15)


def test_blockdiag_math():
    k, n, nb = 10, 13, 3
    kf, kx, kw = _keys(13, 3)
    f = monarch.blockdiag_init(kf, k, n, nb)
    assert f["w"].shape == (3, 5, 4)
    x = jax.random.normal(kx, (5, k))
    dense = monarch.blockdiag_to_dense(f, k, n)
    want = np.pad(np.asarray(x), ((0, 0), (0, 2))) @ scipy.linalg.block_diag(*np.asarray(f["w"])).T
    np.testing.assert_allclose(monarch.blockdiag_matmul_reference(x, f, n), want[:, :n], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x @ dense, want[:, :n], rtol=1e-5, atol=1e-6)
    back = monarch.blockdiag_to_dense(monarch.blockdiag_project(dense, nb), k, n)
    np.testing.assert_allclose(back, dense, rtol=1e-6)
    w = jax.random.normal(kw, (k, n))
    proj = monarch.blockdiag_to_dense(monarch.blockdiag_project(w, nb), k, n)
    np.testing.assert_allclose(jnp.where(proj != 0, w, 0.0), proj, rtol=1e-6)   # keeps the blocks
    assert float(jnp.linalg.norm(proj - w)) < float(jnp.linalg.norm(dense - w))


def test_costs():
    assert monarch.param_count(64, 64, 4) == 2 * 64 * 64 // 4
    assert monarch.flops(10, 64, 64, 4) == 2 * 10 * 2 * 64 * 64 // 4
    assert monarch.dense_flops(10, 64, 64) == 2 * 10 * 64 * 64
    assert monarch.blockdiag_param_count(64, 64, 4) == 64 * 64 // 4
    with pytest.raises(ValueError, match="kind"):
        monarch.flops(1, 8, 8, 2, kind="other")


def test_bad_input_errors_name_the_path():
    with pytest.raises(ValueError, match=r"mlp/kernel: nblocks must satisfy"):
        monarch.project(jnp.ones((8, 8)), 0, name="mlp/kernel")
    with pytest.raises(ValueError, match=r"mlp/kernel: nblocks must satisfy .* min\(K, N\) = 6"):
        monarch.project(jnp.ones((8, 6)), 7, name="mlp/kernel")
    with pytest.raises(TypeError, match="nblocks must be an int"):
        monarch.init_factors(jax.random.PRNGKey(0), 8, 8, 2.0)
    with pytest.raises(ValueError, match=r"attn/w: expected a \(\.\.\., K, N\) weight"):
        monarch.project(jnp.ones((8,)), 2, name="attn/w")
    bad = jax.random.normal(jax.random.PRNGKey(0), (8, 8)).at[3, 2].set(jnp.nan)
    with pytest.raises(ValueError, match="layer/kernel: cannot project a weight with NaN"):
        monarch.project(bad, 2, name="layer/kernel")
    with pytest.raises(ValueError, match="w/k: cannot project"):
        monarch.blockdiag_project(bad, 2, name="w/k")
    with pytest.raises(ValueError, match="does not chain"):
        monarch.matmul_reference(jnp.ones((2, 8)), {"w1": jnp.ones((2, 4, 4)), "w2": jnp.ones((2, 4, 3))})


@pytest.mark.parametrize("use_kernel", [False, True])
def test_monarch_dense_layer(use_kernel):
    kx, ki = _keys(17, 2)
    x = jax.random.normal(kx, (2, 3, 10))
    layer = MonarchDense(13, nblocks=3, use_kernel=use_kernel)
    params = layer.init(ki, x)
    p = params["params"]
    assert p["w1"].shape == (3, 4, 4) and p["w2"].shape == (3, 5, 4) and p["bias"].shape == (13,)
    p = dict(p, bias=jax.random.normal(kx, (13,)))
    y = layer.apply({"params": p}, x)
    dense = monarch.to_dense({"w1": p["w1"], "w2": p["w2"]}, 10, 13)
    np.testing.assert_allclose(y, x @ dense + p["bias"], rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x) ** 2))(p)
    assert all(bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_dense_model_with_projected_weights_gives_same_outputs():
    # Dense -> Monarch conversion of a layer whose weight already has the structure.
    kx, kf = _keys(19, 2)
    x = jax.random.normal(kx, (4, 12))
    f = monarch.init_factors(kf, 12, 20, 4)
    w = monarch.to_dense(f, 12, 20)
    layer = MonarchDense(20, nblocks=4, use_bias=False)
    y = layer.apply({"params": monarch.project(w, 4)}, x)
    np.testing.assert_allclose(y, x @ w, rtol=1e-4, atol=1e-5)


def test_blockdiag_dense_layer():
    kx, ki = _keys(23, 2)
    x = jax.random.normal(kx, (5, 10))
    layer = BlockDiagonalDense(13, nblocks=3, use_bias=False)
    params = layer.init(ki, x)
    y = layer.apply(params, x)
    np.testing.assert_allclose(y, x @ monarch.blockdiag_to_dense(params["params"], 10, 13), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="nblocks must satisfy"):
        BlockDiagonalDense(13, nblocks=11).init(ki, x)
