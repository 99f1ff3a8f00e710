"""Statistical top-k: kept fraction, agreement of its forms, numerics, gradients, errors."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import topk

# jit with static options: one compile per case instead of op-by-op dispatch (fast tests)
statistical_topk = jax.jit(topk.statistical_topk, static_argnames=(
    "k", "k_frac", "axis", "mode", "fill", "stop_gradient_threshold"))
statistical_threshold = jax.jit(topk.statistical_threshold, static_argnames=(
    "k", "k_frac", "axis", "stop_gradient"))
exact_topk_reference = jax.jit(topk.exact_topk_reference, static_argnames=(
    "k", "k_frac", "axis", "mode", "fill"))


def _gauss(seed, shape, loc=0.0, scale=1.0, dtype=jnp.float32):
    return (loc + scale * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


@pytest.mark.parametrize("k_frac", [0.02, 0.08, 0.3])
@pytest.mark.parametrize("loc,scale", [(0.0, 1.0), (250.0, 3.0)])
def test_kept_fraction_within_5_percent_on_gaussian_rows(k_frac, loc, scale):
    x = _gauss(int(k_frac * 1000 + loc), (96, 3001), loc, scale)
    kept = float(jnp.mean(statistical_topk(x, k_frac=k_frac, mode="mask")))
    assert abs(kept - k_frac) <= 0.05 * k_frac, (kept, k_frac)


def test_kept_fraction_with_integer_k_and_bf16():
    d, k = 2047, 164
    x = _gauss(1, (128, d), dtype=jnp.bfloat16)
    kept = float(jnp.mean(statistical_topk(x, k=k, mode="mask")))
    assert abs(kept - k / d) <= 0.05 * k / d


def test_soft_matches_formula_in_float64():
    x = _gauss(2, (7, 513), 1.5, 2.0)
    k_frac = 0.1
    xn = np.asarray(x, np.float64)
    z = statistics.NormalDist().inv_cdf(1 - k_frac)
    theta = xn.mean(-1, keepdims=True) + xn.std(-1, keepdims=True) * z
    want = np.maximum(xn - theta, 0.0)
    got = np.asarray(statistical_topk(x, k_frac=k_frac, mode="soft"), np.float64)
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(np.asarray(statistical_threshold(x, k_frac=k_frac)), theta, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_hard_soft_and_mask_keep_the_same_entries(dtype):
    x = _gauss(3, (33, 771), dtype=dtype)
    mask = statistical_topk(x, k_frac=0.08, mode="mask")
    soft = statistical_topk(x, k_frac=0.08, mode="soft")
    hard = statistical_topk(x, k_frac=0.08, mode="hard", fill=-jnp.inf)
    assert soft.dtype == dtype and hard.dtype == dtype and mask.dtype == jnp.bool_
    assert int(mask.sum()) > 0
    # soft is positive exactly where kept (bf16 rounding of tiny x - theta may give 0: float32 check)
    soft32 = statistical_topk(x.astype(jnp.float32), k_frac=0.08, mode="soft")
    np.testing.assert_array_equal(np.asarray(soft32 > 0), np.asarray(mask))
    np.testing.assert_array_equal(np.asarray(hard > -jnp.inf), np.asarray(mask))
    np.testing.assert_array_equal(np.asarray(jnp.where(mask, x, -jnp.inf)), np.asarray(hard))
    assert bool(jnp.all(jnp.where(mask, True, soft == 0)))


def test_other_axis_equals_moved_axis():
    x = _gauss(4, (5, 301, 3))
    a = statistical_topk(x, k=20, axis=1)
    b = jnp.moveaxis(statistical_topk(jnp.moveaxis(x, 1, -1), k=20), -1, 1)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_constant_rows_give_no_nan_and_finite_gradients():
    # 0.1 has no exact float32 sum: a mean rounded below the value would keep the whole row
    x = jnp.concatenate([jnp.full((1, 64), 3.25), jnp.full((1, 64), 0.1), _gauss(5, (2, 64))])
    for mode in ("soft", "hard", "mask"):
        out = statistical_topk(x, k=5, mode=mode)
        assert not bool(jnp.any(out[:2])), mode           # nothing kept on constant rows
        if mode != "mask":
            assert bool(jnp.all(jnp.isfinite(out)))
    for stop in (False, True):
        g = jax.grad(lambda v: jnp.sum(statistical_topk(v, k=5, stop_gradient_threshold=stop) ** 2))(x)
        assert bool(jnp.all(jnp.isfinite(g)))


def test_bf16_and_huge_d_give_no_nan_or_inf():
    d = 1 << 21
    x = _gauss(6, (1, d), 7.0, 0.5, jnp.bfloat16)
    for k in (1, 100):
        theta = statistical_threshold(x, k=k)
        assert bool(jnp.all(jnp.isfinite(theta)))
        out = statistical_topk(x, k=k, mode="soft")
        assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
        kept = int(statistical_topk(x, k=k, mode="mask").sum())
        assert 0 <= kept < 10 * k
    # a large offset does not cancel the variance (one-pass statistics are shifted)
    y = _gauss(7, (4, 1 << 16), 1e4, 1.0)
    kept = float(jnp.mean(statistical_topk(y, k_frac=0.08, mode="mask")))
    assert abs(kept - 0.08) <= 0.004


def test_gradient_with_and_without_threshold_stop():
    x = _gauss(8, (3, 97))
    k_frac = 0.1
    loss = lambda v, stop: jnp.sum(statistical_topk(v, k_frac=k_frac, stop_gradient_threshold=stop))
    mask = np.asarray(statistical_topk(x, k_frac=k_frac, mode="mask"), np.float64)
    g_stop = np.asarray(jax.grad(loss)(x, True))
    np.testing.assert_allclose(g_stop, mask, atol=1e-6)
    # d/dx_i sum_j max(x_j - theta, 0) = 1[i kept] - n_kept * dtheta/dx_i,
    # dtheta/dx_i = 1/d + z (x_i - mean) / (d std)
    xn = np.asarray(x, np.float64)
    d = xn.shape[-1]
    z = statistics.NormalDist().inv_cdf(1 - k_frac)
    mean, std = xn.mean(-1, keepdims=True), xn.std(-1, keepdims=True)
    dtheta = 1 / d + z * (xn - mean) / (d * std)
    want = mask - mask.sum(-1, keepdims=True) * dtheta
    np.testing.assert_allclose(np.asarray(jax.grad(loss)(x, False)), want, atol=1e-4)


def test_traced_k_frac_under_jit():
    x = _gauss(9, (64, 1000))
    f = jax.jit(lambda v, kf: topk.statistical_topk(v, k_frac=kf, mode="mask").mean())
    for kf in (0.05, 0.2):
        assert abs(float(f(x, jnp.float32(kf))) - kf) <= 0.05 * kf


def test_where_mask_counts_only_valid_entries():
    t = 40
    scores = _gauss(10, (3, t, t))
    causal = jnp.tril(jnp.ones((t, t), bool))
    masked = jnp.where(causal, scores, -jnp.inf)
    out = statistical_topk(masked, k=8, mode="hard", fill=-jnp.inf, where=causal)
    kept = np.asarray(out > -jnp.inf)
    assert not kept[:, ~np.asarray(causal)].any()
    # rows with at most k valid keys keep them all
    np.testing.assert_array_equal(kept[:, :8], np.broadcast_to(np.asarray(causal[:8]), (3, 8, t)))
    assert bool(jnp.all(jnp.isfinite(statistical_threshold(masked, k=8, where=causal)[:, 8:])))
    # long rows keep about k of their valid entries
    assert 4 <= kept[:, 30:].sum(-1).mean() <= 12
    soft = statistical_topk(masked, k=8, mode="soft", where=causal)
    assert bool(jnp.all(jnp.isfinite(soft[:, 8:])))


def test_exact_reference_keeps_exactly_k():
    x = _gauss(11, (9, 203))
    mask = np.asarray(exact_topk_reference(x, k=17, mode="mask"))
    assert (mask.sum(-1) == 17).all()
    xn = np.asarray(x)
    kth = np.sort(xn, -1)[:, -17:-16]
    np.testing.assert_array_equal(mask, xn >= kth)
    soft = np.asarray(exact_topk_reference(x, k=17, mode="soft"))
    np.testing.assert_array_equal(soft > 0, mask)
    hard = exact_topk_reference(x, k_frac=0.1, mode="hard", fill=-1e9, axis=-1)
    assert int((hard > -1e9).sum(-1)[0]) == 20


def test_statistical_matches_exact_selection_on_most_entries():
    x = _gauss(12, (32, 4096))
    a = np.asarray(statistical_topk(x, k_frac=0.08, mode="mask"))
    b = np.asarray(exact_topk_reference(x, k_frac=0.08, mode="mask"))
    recall = (a & b).sum() / b.sum()
    assert recall > 0.9, recall


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(k=3, k_frac=0.1), ValueError, "exactly one"),
    (dict(), ValueError, "exactly one"),
    (dict(k=0), ValueError, "0 < k < d"),
    (dict(k=64), ValueError, "0 < k < d"),
    (dict(k=2.5), TypeError, "k must be an int"),
    (dict(k_frac=1.0), ValueError, "0 < k_frac < 1"),
    (dict(k_frac=0.0), ValueError, "0 < k_frac < 1"),
    (dict(k=3, mode="top"), ValueError, "mode must be one of"),
    (dict(k=3, axis=2), ValueError, "axis=2"),
])
def test_bad_arguments_name_the_parameter(kwargs, err, match):
    x = _gauss(13, (4, 64))
    with pytest.raises(err, match=match):
        topk.statistical_topk(x, **kwargs)


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="float"):
        topk.statistical_topk(jnp.arange(12).reshape(3, 4), k=1)
