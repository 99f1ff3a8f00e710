"""Model code no one here wrote: the patterns third-party models use, each against its oracle.

A small Gemma-3-style decoder written the way the Gemma family's Linen code writes it
(fused gate/up einsum with a ``(2, d_model, d_ff)`` weight, ``'BTNH,BSNH->BTNS'`` scores,
tanh soft-capping, ``jnp.where`` causal / sliding-window masks, a tied embedding), plus the
einsum, stacked-weight, scaled-weight and naming patterns other libraries use.
"""

import logging

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax import topk

K_MASK = -2.3819763e38     # the Gemma code's mask value


# ----------------------------------------------------------------- a Gemma-3-style decoder


class Einsum(nn.Module):
    """Gemma's Einsum layer: a weight ``w`` of the given shape, applied by an einsum string."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, eqn, x):
        w = self.param("w", nn.initializers.normal(0.3), self.shape)
        return jnp.einsum(eqn, x, w)


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
        var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(var + 1e-6) * (1 + scale)


def apply_rope(x, positions, max_wavelength=10_000):
    half = x.shape[-1] // 2
    timescale = max_wavelength ** (2 * jnp.arange(half) / x.shape[-1])
    angle = positions[..., None] / timescale
    sin, cos = jnp.sin(angle)[..., None, :], jnp.cos(angle)[..., None, :]
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class Attention(nn.Module):
    num_heads: int
    head_dim: int
    sliding_window: int | None
    soft_cap: float = 50.0
    topk_k: int | None = None            # the oracle: Spark top-k written into the model

    @nn.compact
    def __call__(self, x, positions):
        d = x.shape[-1]
        q = Einsum((self.num_heads, d, self.head_dim), name="q_einsum")("BTD,NDH->BTNH", x)
        k, v = Einsum((2, self.num_heads, d, self.head_dim), name="kv_einsum")(
            "BSD,CKDH->CBSKH", x)
        q, k = RMSNorm(name="_query_norm")(q), RMSNorm(name="_key_norm")(k)
        q, k = apply_rope(q, positions), apply_rope(k, positions)
        logits = jnp.einsum("BTNH,BSNH->BTNS", q * self.head_dim ** -0.5, k)
        logits = jnp.tanh(logits / self.soft_cap) * self.soft_cap
        t = x.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))[None]
        if self.sliding_window is not None:
            i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
            mask = mask & (i - j < self.sliding_window)[None]
        logits = jnp.where(mask[:, :, None, :], logits, K_MASK)
        if self.topk_k is not None:
            logits = topk.statistical_topk(logits, k=min(self.topk_k, t - 1), mode="hard",
                                           fill=jnp.finfo(logits.dtype).min,
                                           where=logits > jnp.finfo(logits.dtype).min / 2)
        probs = jax.nn.softmax(logits, axis=-1)
        encoded = jnp.einsum("BTNS,BSNH->BTNH", probs, v)
        return Einsum((self.num_heads, self.head_dim, d), name="attn_vec_einsum")(
            "BTNH,NHD->BTD", encoded)


class FeedForward(nn.Module):
    hidden_dim: int
    topk_frac: float | None = None       # the oracle

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        gating = self.param("gating_einsum", nn.initializers.normal(0.3), (2, d, self.hidden_dim))
        gate = jnp.einsum("...F,NFH->...NH", x, gating)
        pre = gate[..., 0, :]
        if self.topk_frac is not None:
            pre = topk.statistical_topk(pre, k_frac=self.topk_frac, mode="soft")
        activations = nn.gelu(pre) * gate[..., 1, :]
        linear = self.param("linear", nn.initializers.normal(0.3), (self.hidden_dim, d))
        return jnp.einsum("...H,HF->...F", activations, linear)


class Block(nn.Module):
    sliding_window: int | None
    attn_k: int | None = None
    ffn_frac: float | None = None

    @nn.compact
    def __call__(self, x, positions):
        h = RMSNorm(name="pre_attention_norm")(x)
        h = Attention(2, 8, self.sliding_window, topk_k=self.attn_k, name="attn")(h, positions)
        x = x + RMSNorm(name="post_attention_norm")(h)
        h = RMSNorm(name="pre_ffw_norm")(x)
        h = FeedForward(32, topk_frac=self.ffn_frac, name="mlp")(h)
        return x + RMSNorm(name="post_ffw_norm")(h)


class GemmaLike(nn.Module):
    vocab: int = 32
    d_model: int = 16
    attn_k: int | None = None
    ffn_frac: float | None = None
    final_cap: float = 30.0

    @nn.compact
    def __call__(self, tokens):
        table = self.param("input_embedding", nn.initializers.normal(1.0), (self.vocab, self.d_model))
        x = table[(tokens,)] * jnp.sqrt(self.d_model)
        positions = jnp.arange(tokens.shape[1])[None]
        for i, window in enumerate((4, None)):    # a local (sliding) layer, then a global one
            x = Block(window, self.attn_k, self.ffn_frac, name=f"layer_{i}")(x, positions)
        x = RMSNorm(name="final_norm")(x)
        logits = jnp.dot(x, table.T)              # the output head is the tied embedding
        return jnp.tanh(logits / self.final_cap) * self.final_cap


@pytest.fixture(scope="module")
def gemma():
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 32)
    model = GemmaLike()
    return model, jax.jit(model.init)(jax.random.key(1), tokens), tokens


SPARK = [sj.SparkTopK(site="ffn", k_frac=0.25), sj.SparkTopK(site="attention", k=2)]


def test_gemma_spark_ffn_and_attention_sites(gemma):
    model, params, tokens = gemma
    sfn = sj.sparsify(model.apply, SPARK)
    sparams, sstate = sfn.init(params, tokens)
    sites = sfn.report().activations
    # FFN: the gate half of the fused '...F,NFH->...NH' projection, sliced, before gelu
    ffn = [a for a in sites if a.kind == "ffn"]
    assert len(ffn) == 2 and all(a.shape == (2, 6, 32) for a in ffn)
    assert all(a.paths[0].endswith("gating_einsum") and a.paths[1].endswith("linear") for a in ffn)
    # attention: 'BTNH,BSNH->BTNS' scores after the transpose, soft-cap and where-masks
    attn = [a for a in sites if a.kind == "attention"]
    assert len(attn) == 2 and all(a.shape == (2, 6, 2, 6) for a in attn)
    out = jax.jit(sfn)(sparams, sstate, tokens)
    oracle = jax.jit(GemmaLike(attn_k=2, ffn_frac=0.25).apply)(params, tokens)
    chex.assert_trees_all_close(out, oracle, rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, jax.jit(model.apply)(params, tokens), atol=1e-3)


def test_gemma_sites_found_alike_at_one_token(gemma):
    model, params, tokens = gemma
    sfn = sj.sparsify(model.apply, SPARK)
    sparams, sstate = sfn.init(params, tokens[:1, :1])    # decode: one sequence, one token
    assert sorted(a.kind for a in sfn.report().activations) == ["attention"] * 2 + ["ffn"] * 2
    out = jax.jit(sfn)(sparams, sstate, tokens[:1])       # the same rewrite at 6 tokens
    oracle = jax.jit(GemmaLike(attn_k=2, ffn_frac=0.25).apply)(params, tokens[:1])
    chex.assert_trees_all_close(out, oracle, rtol=1e-5, atol=1e-5)


def test_gemma_weight_rules_match_their_oracle(gemma):
    model, params, tokens = gemma
    sfn = sj.sparsify(model.apply, [sj.NM("*_einsum/w", n=2, m=4), sj.Prune("*", 0.5)])
    sparams, sstate = sfn.init(params, tokens)
    assert {type(sfn.rule_of(p)).__name__ for p in sfn.masked_paths} == {"NM", "Prune"}
    masked = sfn.dense_params(sparams, sstate)
    chex.assert_trees_all_close(jax.jit(sfn)(sparams, sstate, tokens),
                                jax.jit(model.apply)(masked, tokens), rtol=1e-5, atol=1e-5)
    # norm scales are read elementwise, never by a matmul: no rule applies to them
    assert not any("scale" in p for p in sfn.masked_paths)


# ----------------------------------------------------------------- item 1: batch size 1


def _spark_mlp_oracle(params, x, k_frac):
    p = params["params"]
    h = x @ p["layers_0"]["kernel"] + p["layers_0"]["bias"]
    h = nn.gelu(topk.statistical_topk(h, k_frac=k_frac, mode="soft"))
    return h @ p["layers_2"]["kernel"] + p["layers_2"]["bias"]


def test_ffn_site_at_batch_size_one():
    model = nn.Sequential([nn.Dense(64), nn.gelu, nn.Dense(32)])
    x4 = jax.random.normal(jax.random.key(0), (4, 16))
    params = jax.jit(model.init)(jax.random.key(1), x4)   # jitted: one program, not one per op
    oracle = jax.jit(_spark_mlp_oracle, static_argnums=2)
    for init_x, call_x in ((x4, x4[:1]), (x4[:1], x4[:1]), (x4[:1], x4)):
        sfn = sj.sparsify(model.apply, sj.SparkTopK(site="ffn", k_frac=0.25))
        sparams, sstate = sfn.init(params, init_x)
        out = jax.jit(sfn)(sparams, sstate, call_x)
        chex.assert_trees_all_close(out, oracle(params, call_x, 0.25), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out, jax.jit(model.apply)(params, call_x), atol=1e-3)


def test_rule_with_sites_at_init_refuses_a_call_without_any():
    params = {"up": jnp.ones((8, 16)), "down": jnp.ones((16, 8))}

    def fn(p, x, ffn=True):
        return (jax.nn.relu(x @ p["up"]) @ p["down"]) if ffn else x @ p["up"] @ p["down"]

    sfn = sj.sparsify(fn, sj.SparkTopK(site="ffn", k_frac=0.25))
    sparams, sstate = sfn.init(params, jnp.ones((2, 8)))
    with pytest.raises(ValueError, match=r"SparkTopK.*selected 1 ffn site.* at init.*none"):
        sfn(sparams, sstate, jnp.ones((2, 8)), ffn=False)


# ----------------------------------------------------------------- item 3: norm-scale einsums


def test_einsum_without_contraction_is_not_a_weight_site():
    params = {"w": jax.random.normal(jax.random.key(0), (16, 16)), "scale": jnp.linspace(0.5, 2, 16)}

    def fn(p, x):   # penzai applies a norm scale as an einsum with no contracted axis
        return jnp.einsum("...d,d->...d", x, p["scale"]) @ p["w"]

    x = jax.random.normal(jax.random.key(1), (3, 16))
    sfn = sj.sparsify(fn, sj.NM("*", n=2, m=4))
    sparams, sstate = sfn.init(params, x)
    assert sfn.masked_paths == ("w",)
    chex.assert_trees_all_close(sfn(sparams, sstate, x), fn(sfn.dense_params(sparams, sstate), x))
    with pytest.raises(ValueError, match=r"Prune\('scale'.*no matmul or conv"):
        sj.sparsify(fn, sj.Prune("scale")).init(params, x)


# ----------------------------------------------------------------- item 4: einsum storage order


@pytest.fixture(scope="module")
def out_proj():
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 8))          # 6 heads of head_dim 8
    wo = jax.random.normal(jax.random.key(1), (6, 8, 16))            # (h, e, d)
    return x, wo


def _einsum_out(p, x):
    return jnp.einsum("bqhe,hed->bqd", x, p["wo"])                 # contracts (e, h) in that order


def test_einsum_matrix_view_follows_storage_order(out_proj):
    x, wo = out_proj
    sfn = sj.sparsify(_einsum_out, sj.NM("wo", n=2, m=4))
    sparams, sstate = sfn.init({"wo": wo}, x)
    mask = np.asarray(sstate["masks"]["wo"])
    # 2:4 groups run along head_dim (e innermost), as Linen DenseGeneral lays K out
    assert (mask.reshape(6, 2, 4, 16).sum(axis=2) == 2).all()
    dense_general = nn.DenseGeneral(16, axis=(-2, -1), use_bias=False)
    dg = sj.sparsify(dense_general.apply, sj.NM("*kernel", n=2, m=4))
    _, dg_state = dg.init({"params": {"kernel": wo}}, x)
    np.testing.assert_array_equal(mask, dg_state["masks"]["params"]["kernel"])
    chex.assert_trees_all_close(sfn(sparams, sstate, x),
                                _einsum_out(sfn.dense_params(sparams, sstate), x))


def test_einsum_blocks_and_factors_follow_storage_order(out_proj):
    x, wo = out_proj
    sfn = sj.sparsify(_einsum_out, sj.Block("wo", 0.5, block=(8, 4)))
    _, sstate = sfn.init({"wo": wo}, x)
    mask = np.asarray(sstate["masks"]["wo"])
    # a K-block of 8 is one head's head_dim: the mask is constant along e within a block
    assert (mask == mask[:, :1, :]).all() and 0 < mask.mean() < 1
    for rule in (sj.Monarch("wo", nblocks=2), sj.BlockDiagonal("wo", nblocks=2)):
        sfn = sj.sparsify(_einsum_out, rule)
        sparams, sstate = sfn.init({"wo": wo}, x)
        assert "fallback" not in sfn.report().rows[0].kernel
        chex.assert_trees_all_close(sfn(sparams, sstate, x),
                                    _einsum_out(sfn.dense_params(sparams, sstate), x),
                                    rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- item 8: stacked, indexed


def _loop_fn(p, x):
    return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["w"][i]), x)


def _first_fn(p, x):
    return x @ p["w"][0]


@pytest.mark.parametrize("fn", [_loop_fn, _first_fn], ids=["fori_loop", "index0"])
@pytest.mark.parametrize("rule_type", [sj.Monarch, sj.BlockDiagonal])
def test_factorized_stacked_weight_indexed_per_layer(fn, rule_type):
    params = {"w": jax.random.normal(jax.random.key(0), (3, 16, 16)) / 4}
    x = jax.random.normal(jax.random.key(1), (4, 16))
    sfn = sj.sparsify(fn, rule_type("w", nblocks=4))
    sparams, sstate = sfn.init(params, x)
    out = jax.jit(sfn)(sparams, sstate, x)
    chex.assert_trees_all_close(out, jax.jit(fn)(sfn.dense_params(sparams, sstate), x),
                                rtol=1e-5, atol=1e-5)
    assert "fallback" not in sfn.report().rows[0].kernel     # per-layer factors, no dense matrix
    jaxpr = str(sfn.rewritten_jaxpr(sparams, sstate, x))
    assert "f32[3,16,16]" not in jaxpr and "f32[16,16]" not in jaxpr
    g = jax.jit(jax.grad(lambda sp: jnp.sum(sfn(sp, sstate, x) ** 2)))(sparams)
    assert all(np.isfinite(v).all() and np.abs(v).sum() > 0 for v in jax.tree.leaves(g))


# ----------------------------------------------------------------- item 11: ops before the matmul


SCALES = {"mul": lambda w: w * 0.5, "rmul": lambda w: 2.0 * w, "div": lambda w: w / 4.0}


@pytest.mark.parametrize("scale, rule", [
    ("mul", sj.Prune("w", 0.5)), ("rmul", sj.Prune("w", 0.5)), ("div", sj.NM("w", 2, 4)),
    ("mul", sj.NM("w", 2, 4)), ("rmul", sj.Monarch("w", nblocks=2))],
    ids=["prune-mul", "prune-rmul", "nm-div", "nm-mul", "monarch-rmul"])
def test_weight_scaled_by_a_scalar_is_still_a_site(scale, rule):
    scaled = SCALES[scale]
    params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
    x = jax.random.normal(jax.random.key(1), (3, 16))
    fn = lambda p, x: x @ scaled(p["w"])
    sfn = sj.sparsify(fn, rule)
    sparams, sstate = sfn.init(params, x)
    chex.assert_trees_all_close(sfn(sparams, sstate, x), fn(sfn.dense_params(sparams, sstate), x),
                                rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda sp: jnp.sum(sfn(sp, sstate, x)))(sparams)
    assert all(np.abs(v).sum() > 0 for v in jax.tree.leaves(g))


def test_error_names_the_op_between_weight_and_matmul():
    key = jax.random.key(0)
    params = {"w": jax.random.normal(key, (16, 8)), "a": jnp.ones((16, 2)), "b": jnp.ones((2, 8)),
              "g": jnp.ones((8,))}
    x = jnp.ones((3, 16))
    lora = lambda p, x: x @ (p["w"] + p["a"] @ p["b"])
    with pytest.raises(ValueError, match=r"Prune\('w'.*w reaches a matmul only through `add`"):
        sj.sparsify(lora, sj.Prune("w")).init(params, x)
    weight_norm = lambda p, x: x @ (p["g"] * p["w"] / jnp.linalg.norm(p["w"], axis=0))
    with pytest.raises(ValueError, match=r"w reaches a matmul only through .*`mul`"):
        sj.sparsify(weight_norm, sj.Prune("w")).init(params, x)


# ----------------------------------------------------------------- item 16: select by role


class Mixed(nn.Module):
    """Two matmul weights named unlike each other: ``w`` and ``kernel``."""

    @nn.compact
    def __call__(self, tokens):
        table = self.param("embedding", nn.initializers.normal(1.0), (32, 16))
        x = table[tokens]
        w = self.param("w", nn.initializers.normal(0.3), (16, 16))
        x = jax.nn.relu(x @ w)
        x = nn.Dense(16, name="dense")(x)
        return nn.Dense(32, name="head")(x)


@pytest.fixture(scope="module")
def mixed():
    tokens = jax.random.randint(jax.random.key(0), (2, 5), 0, 32)
    model = Mixed()
    return model, jax.jit(model.init)(jax.random.key(1), tokens), tokens


def test_rules_select_weights_by_what_they_do(mixed):
    model, params, tokens = mixed
    sfn = sj.sparsify(model.apply, sj.NM(sj.MatmulWeights(), n=2, m=4))
    sparams, sstate = sfn.init(params, tokens)
    assert set(sfn.masked_paths) == {"params/w", "params/dense/kernel", "params/head/kernel"}
    chex.assert_trees_all_close(jax.jit(sfn)(sparams, sstate, tokens),
                                jax.jit(model.apply)(sfn.dense_params(sparams, sstate), tokens))
    sfn = sj.sparsify(model.apply, sj.NM(sj.MatmulWeights(head=False), n=2, m=4))
    sfn.init(params, tokens)
    assert set(sfn.masked_paths) == {"params/w", "params/dense/kernel"}



def test_selectors_on_a_tied_embedding(gemma):
    # a tied embedding is an embedding (read by a lookup) and the head (its matmul ends fn)
    gemma_model, g_params, g_tokens = gemma
    for selector in (sj.MatmulWeights(embeddings=False), sj.MatmulWeights(head=False)):
        sfn = sj.sparsify(gemma_model.apply, sj.Prune(selector, 0.5))
        sfn.init(g_params, g_tokens)
        assert "params/input_embedding" not in sfn.masked_paths
        assert len(sfn.masked_paths) == 10                   # 5 einsum weights per layer
    sfn = sj.sparsify(gemma_model.apply, sj.Prune(sj.MatmulWeights(within="*layer_1*"), 0.5))
    sfn.init(g_params, g_tokens)
    assert len(sfn.masked_paths) == 5 and all("layer_1" in p for p in sfn.masked_paths)
    assert "MatmulWeights(" in sfn.report().rows[0].rule


def test_init_names_matmul_weights_no_rule_touched(mixed, caplog):
    model, params, tokens = mixed
    with caplog.at_level(logging.WARNING, logger="sparsejax"):
        sj.sparsify(model.apply, sj.NM("*kernel", n=2, m=4)).init(params, tokens)
    [record] = [r for r in caplog.records if "no rule touched" in r.getMessage()]
    message = record.getMessage()
    assert "params/w" in message and "embedding" not in message and "\n" not in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sparsejax"):
        sj.sparsify(model.apply, sj.NM(sj.MatmulWeights(), n=2, m=4)).init(params, tokens)
    assert not [r for r in caplog.records if "no rule touched" in r.getMessage()]
