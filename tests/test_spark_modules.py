"""Spark FFN and Spark attention modules: equivalences with dense layers and sparsity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.kernels import spark_ffn as sf
from sparsejax.models.spark import GatedFFN, SparkAttention, SparkFFN
from sparsejax.topk import statistical_topk


# Inputs drawn by numpy; inits, layers and the written-out references run jitted: one program
# each, where op by op every operation at every new shape was a program to compile.
def _x(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_spark_ffn_without_predictor_loads_dense_weights_and_sparsifies_the_gate():
    x = _x(0, (2, 5, 24))
    params = jax.jit(GatedFFN(d_ff=97).init)(jax.random.key(1), x)
    y = jax.jit(SparkFFN(d_ff=97, k_frac=0.1).apply)(params, x)

    @jax.jit
    def reference(params, x):
        p = params["params"]
        pre = x @ p["gate"]
        h = statistical_topk(pre, k_frac=0.1, mode="soft")
        return (jnp.where(h > 0, jax.nn.gelu(h), 0.0) * (x @ p["up"])) @ p["down"]

    np.testing.assert_allclose(np.asarray(y), np.asarray(reference(params, x)), rtol=1e-5, atol=1e-6)
    dense = jax.jit(GatedFFN(d_ff=97).apply)(params, x)
    assert _rel(y, dense) > 0.1


def test_spark_ffn_predictor_split_and_decode_path_agree():
    d, d_ff, r = 40, 150, 16
    x = _x(2, (3, d))
    module = SparkFFN(d_ff=d_ff, k_frac=0.08, predictor_dims=r)
    params = jax.jit(module.init)(jax.random.key(3), x)
    p = params["params"]
    assert p["wi"].shape == (d, d_ff) and p["wo"].shape == (d_ff, d)
    y = jax.jit(module.apply)(params, x)

    @jax.jit
    def decode_paths(p, x):
        w = sf.decode_weights_from_spark(p["wi"], p["wo"], r)
        return (sf.topk_ffn_decode_reference(x, w, k_frac=0.08),
                sf.topk_ffn_decode(x, w, k_frac=0.08, capacity=d_ff, impl="xla"),
                statistical_topk(x[:, :r] @ p["wi"][:r], k_frac=0.08, mode="mask").sum())

    ref, fast, kept = decode_paths(p, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), rtol=1e-4, atol=1e-5)
    # the up half never sees the predictor dims: changing x[:, r:] leaves the selection alone
    assert int(kept) > 0


def test_spark_ffn_kept_fraction_and_gradients():
    x = _x(4, (64, 32))
    module = SparkFFN(d_ff=512, k_frac=0.08, predictor_dims=12)
    params = jax.jit(module.init)(jax.random.key(5), x)
    h = jax.jit(lambda p, x: module.apply(p, x, capture_intermediates=False))(params, x)
    assert h.shape == x.shape
    kept = float(jax.jit(lambda wi, x: statistical_topk(x[:, :12] @ wi[:12], k_frac=0.08,
                                                        mode="mask").mean())(params["params"]["wi"], x))
    assert abs(kept - 0.08) < 0.02
    g = jax.jit(jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 2)))(params)
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(g))


def test_attention_without_predictor_keeps_at_most_about_k_keys():
    x = _x(6, (2, 48, 32))
    att = SparkAttention(num_heads=2, head_dim=16, k=6)
    params = jax.jit(att.init)(jax.random.key(7), x)
    y = jax.jit(att.apply)(params, x)
    assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()
    # with k >= sequence length nothing is dropped: standard causal attention
    full = jax.jit(SparkAttention(num_heads=2, head_dim=16, k=48).apply)(params, x)

    @jax.jit
    def causal_attention(p, x):
        q, k, v = (jnp.einsum("btd,dhe->bhte", x, p[n]) for n in ("query", "key", "value"))
        s = jnp.einsum("bhqe,bhke->bhqk", q, k) / 4.0
        s = jnp.where(jnp.tril(jnp.ones((48, 48), bool)), s, -jnp.inf)
        return jnp.einsum("bhqe,hed->bqd", jnp.einsum("bhqk,bhke->bhqe", jax.nn.softmax(s, -1), v),
                          p["out"])

    want = causal_attention(params["params"], x)
    np.testing.assert_allclose(np.asarray(full), np.asarray(want), rtol=1e-4, atol=1e-5)
    assert _rel(y, full) > 1e-3


def test_spark_attention_predictor_form():
    x = _x(8, (1, 20, 24))
    att = SparkAttention(num_heads=2, head_dim=8, k=5, predictor_dims=3)
    params = jax.jit(att.init)(jax.random.key(9), x)
    y = jax.jit(att.apply)(params, x)

    @jax.jit
    def predictor_form(p, x):
        q, k, v = (jnp.einsum("btd,dhe->bhte", x, p[n]) for n in ("query", "key", "value"))
        causal = jnp.tril(jnp.ones((20, 20), bool))
        pred = jnp.where(causal, jnp.einsum("bhqe,bhke->bhqk", q[..., :3], k[..., :3]) / np.sqrt(3),
                         -jnp.inf)
        rest = jnp.einsum("bhqe,bhke->bhqk", q[..., 3:], k[..., 3:]) / np.sqrt(5)
        kept = statistical_topk(pred, k=5, mode="hard", fill=-jnp.inf, where=causal)
        w = jax.nn.softmax(kept, -1) * jax.nn.softplus(rest)
        return w, jnp.einsum("bhqe,hed->bqd", jnp.einsum("bhqk,bhke->bhqe", w, v), p["out"])

    w, want = predictor_form(params["params"], x)
    assert ((np.asarray(w) > 0).sum(-1) <= 20).all()
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_bad_predictor_dims():
    x = _x(10, (2, 16))
    with pytest.raises(ValueError, match="predictor_dims"):
        SparkFFN(d_ff=32, predictor_dims=16).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="predictor_dims"):
        SparkAttention(num_heads=1, head_dim=8, k=2, predictor_dims=8).init(jax.random.key(0), _x(1, (1, 4, 16)))
