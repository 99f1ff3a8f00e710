"""A call traced differently from init keeps its rewritten sites.

Every call signature is traced anew; its site eqns need not sit where init's trace had
them (params of another dtype add or drop Flax's casts; a KV-cache decode step is another
program). Each such call must still take the lowered kernels / factorized products
instead of silently computing the original dense product.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax.compiler.passes.factorized import FactorizedHandler
from sparsejax.models import transformer

LINEAR = r"re:.*(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel"


def _lm(scan: bool):
    cfg = transformer.TransformerConfig(vocab_size=64, d_model=64, n_layers=2 if scan else 1,
                                        n_heads=2, d_ff=128, scan_layers=scan, dtype="bfloat16")
    model = transformer.TransformerLM(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.vocab_size)
    # (jitted: one program, where op by op every operation was a program to compile)
    return cfg, model, tokens, jax.jit(model.init)(jax.random.key(1), tokens)


def _bf16(tree):
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x is not None else None, tree,
                        is_leaf=lambda x: x is None)


def _count(jaxpr, name):
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else [v]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    n += _count(inner if hasattr(inner, "eqns") else inner.jaxpr, name)
    return n


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("scan", [False, True])
def test_lowered_kernels_survive_bf16_params_and_a_kv_cache_call(scan):
    cfg, model, tokens, params = _lm(scan)
    sfn = sj.sparsify(model.apply, sj.Block(LINEAR, sparsity=0.5, block=(32, 32)))
    sp, ss = sfn.init(params, tokens)            # traced with float32 params
    low = sfn.lower(ss, premasked=True, interpret=True)
    pm = low.premask(sp, ss)
    kernels = _count(low.rewritten_jaxpr(pm, ss, tokens).jaxpr, "pallas_call")
    assert kernels > 0
    # bf16 params drop the casts Flax inserts before each dot: other eqn positions.
    assert _count(low.rewritten_jaxpr(_bf16(pm), ss, tokens).jaxpr, "pallas_call") == kernels
    # A decode step with a KV cache is another program altogether.
    cache = transformer.init_cache(cfg, 2, 16)
    tok = tokens[:, :1]
    decode = low.rewritten_jaxpr(_bf16(pm), ss, tok, cache, jnp.int32(5)).jaxpr
    assert _count(decode, "pallas_call") == kernels


def test_monarch_sites_keep_their_factorized_product_when_retraced(monkeypatch):
    cfg, model, tokens, params = _lm(False)
    sfn = sj.sparsify(model.apply, sj.Monarch(LINEAR, nblocks=2))
    sp, ss = sfn.init(params, tokens)
    rebuilt = []
    original = FactorizedHandler.materialize
    monkeypatch.setattr(FactorizedHandler, "materialize",
                        lambda self, ref: rebuilt.append(self.path) or original(self, ref))
    sfn.rewritten_jaxpr(_bf16(sp), ss, tokens)
    cache = transformer.init_cache(cfg, 2, 16)
    sfn.rewritten_jaxpr(_bf16(sp), ss, tokens[:, :1], cache, jnp.int32(5))
    assert rebuilt == []                          # no site rebuilt its dense weight


def test_spark_ffn_decode_step_takes_the_sparse_gemv_after_a_prefill_init():
    cfg, model, tokens, params = _lm(False)
    sfn = sj.sparsify(model.apply, sj.SparkTopK("*", site="ffn", k_frac=0.25))
    sp, ss = sfn.init(params, tokens)            # init traced the prefill program
    low = sfn.lower(ss, interpret=True)
    cache = transformer.init_cache(cfg, 1, 16)
    tok, pos = tokens[:1, :1], jnp.int32(3)
    decode = low.rewritten_jaxpr(_bf16(sp), ss, tok, cache, pos).jaxpr
    assert _count(decode, "pallas_call") >= cfg.n_layers       # a sparse down GEMV per layer
    got = jax.jit(low)(_bf16(sp), ss, tok, cache, pos)[0]
    want = jax.jit(sfn)(_bf16(sp), ss, tok, cache, pos)[0]
    assert _rel(got, want) < 2e-2
