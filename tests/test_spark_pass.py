"""The Spark pass inserts statistical top-k into unmodified models, found by structure."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sparsejax as sj
from sparsejax.models.spark import GatedFFN, SparkAttention, SparkFFN


class PlainAttention(nn.Module):
    """SparkAttention's parameters and math without the top-k."""

    num_heads: int
    head_dim: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        shape = (d, self.num_heads, self.head_dim)
        init = nn.initializers.lecun_normal()
        wq, wk, wv = (self.param(n, init, shape) for n in ("query", "key", "value"))
        wo = self.param("out", init, (self.num_heads, self.head_dim, d))
        proj = lambda w: jnp.einsum("...td,dhe->...hte", x, w)
        q, k, v = proj(wq), proj(wk), proj(wv)
        t = x.shape[-2]
        valid = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.einsum("...hqe,...hke->...hqk", q, k) / jnp.sqrt(self.head_dim)
        weights = jax.nn.softmax(jnp.where(valid, scores, -jnp.inf), axis=-1)
        return jnp.einsum("...hqe,hed->...qd", jnp.einsum("...hqk,...hke->...hqe", weights, v), wo)


# Inputs are drawn by numpy; inits, forward passes and gradients run jitted: one program each,
# where op by op every operation at every new shape was a program to compile.
def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def test_ffn_pass_equals_spark_ffn_module():
    x = _normal(0, (3, 7, 24))
    dense, spark = GatedFFN(d_ff=96), SparkFFN(d_ff=96, k_frac=0.1)
    params = jax.jit(dense.init)(jax.random.key(1), x)
    sfn = sj.sparsify(dense.apply, sj.SparkTopK(site="ffn", k_frac=0.1))
    sparams, sstate = sfn.init(params, x)
    out = jax.jit(sfn)(sparams, sstate, x)
    chex.assert_trees_all_close(out, jax.jit(spark.apply)(params, x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out, jax.jit(dense.apply)(params, x), atol=1e-3)
    g = jax.jit(jax.grad(lambda p: jnp.sum(sfn(p, sstate, x) ** 2)))(sparams)
    g_ref = jax.jit(jax.grad(lambda p: jnp.sum(spark.apply(p, x) ** 2)))(params)
    chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_ffn_pass_with_the_pallas_kernel_equals_xla():
    x = _normal(4, (2, 5, 24))
    dense = GatedFFN(d_ff=96)
    params = jax.jit(dense.init)(jax.random.key(5), x)
    outs, grads = [], []
    for impl in ("xla", "pallas"):      # pallas: interpret mode on CPU
        sfn = sj.sparsify(dense.apply, sj.SparkTopK(site="ffn", k_frac=0.1, impl=impl))
        sparams, sstate = sfn.init(params, x)
        outs.append(jax.jit(sfn)(sparams, sstate, x))
        grads.append(jax.jit(jax.grad(lambda p: jnp.sum(sfn(p, sstate, x) ** 2)))(sparams))
    chex.assert_trees_all_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="impl must be 'xla', 'pallas' or 'auto'"):
        sj.SparkTopK(site="ffn", impl="triton")


@pytest.mark.parametrize("impl", ["xla", "pallas"])    # pallas: the kernel, interpret mode on CPU
def test_attention_pass_equals_spark_attention_module(impl):
    x = _normal(2, (2, 9, 16))
    plain, spark = PlainAttention(2, 8), SparkAttention(num_heads=2, head_dim=8, k=3)
    params = jax.jit(plain.init)(jax.random.key(3), x)
    sfn = sj.sparsify(plain.apply, sj.SparkTopK(site="attention", k=3, impl=impl))
    sparams, sstate = sfn.init(params, x)
    out = jax.jit(sfn)(sparams, sstate, x)
    chex.assert_trees_all_close(out, jax.jit(spark.apply)(params, x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(out, jax.jit(plain.apply)(params, x), atol=1e-3)
    assert (str(sfn.rewritten_jaxpr(sparams, sstate, x)).count("pallas_call") > 0) == (impl == "pallas")


def test_attention_kernel_keeps_the_models_causal_mask_and_gradients():
    """A causal model's masked scores stay masked through the kernel, rows with at most k
    visible keys keep them all, and the gradients are the XLA path's."""
    x = _normal(4, (2, 12, 32))
    model = Layer()
    params = jax.jit(lambda key, x: model.init(key, x, None))(jax.random.key(5), x)
    outs, grads = [], []
    for impl in ("xla", "pallas"):
        sfn = sj.sparsify(lambda p, v: model.apply(p, v, None)[0],
                          sj.SparkTopK(site="attention", k=4, impl=impl))
        sparams, sstate = sfn.init(params, x)
        outs.append(jax.jit(sfn)(sparams, sstate, x))
        grads.append(jax.jit(jax.grad(lambda p: jnp.sum(sfn(p, sstate, x) ** 2)))(sparams))
    chex.assert_trees_all_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(2, qkv_features=16, name="attn")(
            h, h, mask=nn.make_causal_mask(h[..., 0]))
        h = nn.LayerNorm()(x)
        g, u = nn.Dense(64, name="gate")(h), nn.Dense(64, name="up")(h)
        return x + nn.Dense(x.shape[-1], name="down")(nn.silu(g) * u), None


class ScannedLM(nn.Module):
    @nn.compact
    def __call__(self, x):
        x, _ = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=2)(name="layers")(x, None)
        return x


def test_scanned_lm_sites_and_measured_kept_fraction():
    x = _normal(4, (4, 16, 16))
    model = ScannedLM()
    params = jax.jit(model.init)(jax.random.key(5), x)
    sfn = sj.sparsify(model.apply, [sj.SparkTopK("*mlp*", site="ffn", k_frac=0.125),
                                    sj.SparkTopK(site="attention", k=4)])
    with pytest.raises(ValueError, match=r"SparkTopK\('\*mlp\*'.*selects no ffn site"):
        sfn.init(params, x)   # the FFN weights are named gate/up/down, not mlp
    sfn = sj.sparsify(model.apply, [sj.SparkTopK("*down*", site="ffn", k_frac=0.125),
                                    sj.SparkTopK(site="attention", k=4)])
    sparams, sstate = sfn.init(params, x)
    kinds = sorted(a.kind for a in sfn.report().activations)
    assert kinds == ["attention", "ffn"]
    stats = sfn.measure_activations(sparams, sstate, x)
    ffn = [s for s in stats if s["kind"] == "ffn"]
    assert [s["layer"] for s in ffn] == [0, 1]            # one entry per scanned layer
    for s in ffn:
        assert 0.3 < s["before"] < 0.7                     # a SiLU FFN: about half positive
        assert abs(s["after"] - 0.125) < 0.05              # statistical top-k near its target
    attn = [s for s in stats if s["kind"] == "attention"]
    assert all(s["after"] < s["before"] for s in attn)
    text = str(sfn.report())
    assert "measured" in text and "ffn" in text


def test_nnx_model_without_names():
    class FFN(nnx.Module):
        def __init__(self, rngs):
            self.w1, self.w2 = nnx.Linear(12, 48, rngs=rngs), nnx.Linear(48, 12, rngs=rngs)

        def __call__(self, x):
            return self.w2(jax.nn.relu(self.w1(x)))

    graphdef, state = nnx.split(FFN(nnx.Rngs(0)))
    fn = lambda s, x: nnx.merge(graphdef, s)(x)
    x = _normal(1, (64, 12))
    sfn = sj.sparsify(fn, sj.SparkTopK(site="ffn", k_frac=0.1, mode="hard"))
    sparams, sstate = sfn.init(state, x)
    [site] = sfn.report().activations
    assert site.paths == ("w1/kernel", "w2/kernel")
    hidden = sfn.measure_activations(sparams, sstate, x)[0]
    assert hidden["after"] < 0.15


def test_bad_spark_rules():
    with pytest.raises(ValueError, match="k or k_frac, not both"):
        sj.SparkTopK(k=3, k_frac=0.1)
    with pytest.raises(ValueError, match=r"k_frac must be in \(0, 1\)"):
        sj.SparkTopK(k_frac=1.5)
    with pytest.raises(ValueError, match="site must be 'ffn' or 'attention'"):
        sj.SparkTopK(site="mlp")
    params = {"w": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match=r"selects no attention site; sites found: none"):
        sj.sparsify(lambda p, x: x @ p["w"], sj.SparkTopK(site="attention")).init(
            params, jnp.ones((2, 4)))


def _kernel_applies(monkeypatch, times):
    """The top-k kernel counts as applying here (it runs in interpret mode on the CPU), and
    measuring is faked with ``times`` per candidate."""
    from sparsejax.kernels import path_choice as pc
    from sparsejax.kernels import statistical_topk as stk

    monkeypatch.setattr(stk, "supported", lambda *a, **kw: None)
    monkeypatch.setattr(pc, "_measuring_pays", lambda: True)
    monkeypatch.setattr(pc, "measure", lambda cands, specs, **kw: {c.name: times[c.name] for c in cands})


def _attention_setup():
    x = _normal(2, (2, 9, 16))
    plain = PlainAttention(2, 8)
    params = jax.jit(plain.init)(jax.random.key(3), x)
    sfn = sj.sparsify(plain.apply, sj.SparkTopK(site="attention", k=3, impl="auto"))
    sparams, sstate = sfn.init(params, x)
    return sfn, sparams, sstate, x


def _kernels(step, args) -> int:
    return str(jax.make_jaxpr(lambda *a: step(*a))(*args)).count("pallas_call")


def test_auto_topk_takes_the_measured_faster_path(fresh_paths, monkeypatch):
    from sparsejax.kernels import path_choice as pc

    sfn, sparams, sstate, x = _attention_setup()
    _kernel_applies(monkeypatch, {"pallas": 2.0, "xla": 5.0})
    with pc.recording() as seen:
        out = sfn(sparams, sstate, x)
    assert _kernels(sfn, (sparams, sstate, x)) == 1
    (choice, names, movable), = [v for k, v in seen.items() if k.startswith("statistical_topk|attention")]
    assert choice.name == "pallas" and names == ("pallas", "xla") and movable == ("xla",)
    pc.clear_cache()
    _kernel_applies(monkeypatch, {"pallas": 6.0, "xla": 5.0})
    sfn.invalidate()
    out_xla = sfn(sparams, sstate, x)
    assert _kernels(sfn, (sparams, sstate, x)) == 0
    chex.assert_trees_all_close(out, out_xla, rtol=1e-5, atol=1e-5)
    # forced either way
    for path, kernels in (("pallas", 1), ("xla", 0)):
        with pc.mode(f"force:{path}"):
            sfn.invalidate()
            assert _kernels(sfn, (sparams, sstate, x)) == kernels


def test_program_tuning_tries_xla_topk_where_the_kernel_won_alone(fresh_paths, monkeypatch):
    sfn, sparams, sstate, x = _attention_setup()
    _kernel_applies(monkeypatch, {"pallas": 2.0, "xla": 5.0})      # alone: the kernel by 2.5x
    step = lambda p, s, v: jnp.sum(sfn(p, s, v) ** 2)
    args = (sparams, sstate, x)
    assert _kernels(step, args) == 1
    # In the program XLA's top-k fuses with its neighbours: faster without the kernel.
    # XLA's top-k is the site's fallback: the first trial, the one site on it, is kept; the
    # site tried back on the kernel is not.
    tuning = sfn.tune(step, *args, timer=lambda f, a: 1.0 + 0.1 * _kernels(f, a))
    assert [(t.path, t.kept) for t in tuning.trials] == [("xla", True), ("pallas", False)]
    assert tuning.verdicts and set(tuning.verdicts.values()) == {"xla"}
    assert _kernels(step, args) == 0                                 # the verdict is obeyed


def test_auto_topk_where_the_kernel_does_not_apply_is_xla_unmeasured(fresh_paths, monkeypatch):
    from sparsejax.kernels import path_choice as pc

    monkeypatch.setattr(pc, "measure", lambda *a, **kw: pytest.fail("measured"))
    sfn, sparams, sstate, x = _attention_setup()           # the CPU: no top-k kernel
    assert _kernels(sfn, (sparams, sstate, x)) == 0
