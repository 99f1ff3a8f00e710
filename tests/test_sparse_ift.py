"""Sparse Iso-FLOP Transformations: iso-FLOP reports, widened programs, training, errors."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj
from sparsejax import iso_flop
from sparsejax.models.transformer import TransformerConfig, TransformerLM, lm_loss

CFG = TransformerConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=24)
BLOCK_WEIGHTS = "re:.*layers.*/kernel"
FFN_WEIGHTS = "*/mlp/*/kernel"
KINDS = {"wide": sj.SparseWide, "parallel": sj.SparseParallel,
         "factorized": sj.SparseFactorized, "doped": sj.SparseDoped}


def _rule(kind, sparsity):
    return KINDS[kind](FFN_WEIGHTS if kind == "wide" else BLOCK_WEIGHTS, sparsity)


def _mixed(sparsity):
    """All four transformations in one recipe (one trace and one compile for all)."""
    return [sj.SparseWide(FFN_WEIGHTS, sparsity), sj.SparseParallel("*/attn/q/kernel", sparsity),
            sj.SparseFactorized("*/attn/k/kernel", sparsity),
            sj.SparseDoped("*/attn/[vo]/kernel", sparsity)]


def _init(model, params, tokens, rule):
    sfn = sj.sparsify(model.apply, rule)
    sparams, sstate = sfn.init(params, tokens[:, :-1], rng=jax.random.key(2))
    return sfn, sparams, sstate


def _kept(tree):
    return sum(int(np.sum(m)) for m in jax.tree.leaves(tree))


@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_report_is_iso_flop_and_counts_the_masks(sparsity):
    model = TransformerLM(CFG)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, CFG.vocab_size)
    # (inits and the programs compared run jitted here: one program each, where op by op
    # every operation at every new shape was a program to compile)
    sfn, sparams, sstate = _init(model, jax.jit(model.init)(jax.random.key(1), tokens[:, :-1]),
                                 tokens, _mixed(sparsity))
    rows = sfn.report().rows
    for kind in KINDS:   # each transformation on its own is iso-FLOP
        mine = [r for r in rows if r.rule.startswith(KINDS[kind].__name__ + "(")]
        assert len(mine) == {"wide": 3, "doped": 2}.get(kind, 1), kind
        before, after = sum(r.flops_before for r in mine), sum(r.flops_after for r in mine)
        assert abs(after / before - 1) <= 0.01, (kind, before, after)
    # The report's counts are the masks' counts (plus dense factors), not a formula alone.
    for row in rows:
        path = row.path.split("/")[1:]
        item, mask = sparams["params"], sstate["masks"]["params"]
        for key in path:
            item, mask = item[key], mask[key]
        dense_factors = sum(x.size for name, x in item.items() if mask[name] is None) \
            if isinstance(item, dict) else 0
        assert row.params_after == _kept(mask) + dense_factors, row.path
    # Sparse Wide: the hidden width grew by 1 / (1 - s); the masks keep density 1 - s
    up = sparams["params"]["layers_0"]["mlp"]["up"]["kernel"]
    assert up.shape == (CFG.d_model, iso_flop.wide_width(CFG.d_ff, sparsity))
    density = _kept(sstate["masks"]["params"]["layers_0"]["mlp"]["up"]["kernel"]) / up.size
    assert abs(density - (1 - sparsity)) < 0.01
    # the masked factors sit near the nominal sparsity too (rounding moves them a little)
    q_mask = sstate["masks"]["params"]["layers_0"]["attn"]["q"]["kernel"]["branches"]
    assert q_mask.shape[0] == round(1 / (1 - sparsity))
    assert abs(_kept(q_mask) / q_mask.size - (1 - sparsity)) < 0.01


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def mixed(request):
    # scanned: two stacked layers, so per-layer slicing of factors and masks is exercised
    cfg = dataclasses.replace(CFG, scan_layers=request.param, n_layers=2 if request.param else 1)
    model = TransformerLM(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(1), tokens[:, :-1])
    return (cfg, model, tokens) + _init(model, params, tokens, _mixed(0.75))


def test_sites_compute_the_wider_masked_model(mixed):
    cfg, model, tokens, sfn, sparams, sstate = mixed
    # The twin: each factorized matrix written out by hand from its factors and masks,
    # the widened FFN as a dense model of width d_ff / (1 - s).
    def dense(f, m):
        f = {n: x * m[n] if m[n] is not None else x for n, x in f.items()}
        if "branches" in f:
            return f["branches"].sum(-3)
        return f["u"] @ f["v"] + (f["s"] if "s" in f else 0)
    is_factors = lambda x: isinstance(x, dict) and ("u" in x or "branches" in x)
    is_wide = lambda path: "['mlp']" in jax.tree_util.keystr(path)
    wide_model = TransformerLM(dataclasses.replace(cfg, d_ff=4 * cfg.d_ff))

    @jax.jit
    def twin(sparams, masks, x):
        want_params = jax.tree_util.tree_map_with_path(
            lambda path, f, m: dense(f, m) if is_factors(f) else (f * m if is_wide(path) else f),
            sparams, masks, is_leaf=is_factors)
        return wide_model.apply(want_params, x)

    want = twin(sparams, sstate["masks"], tokens[:, :-1])
    got = jax.jit(sfn)(sparams, sstate, tokens[:, :-1])
    assert float(jnp.max(jnp.abs(want))) > 0.1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_trains_and_gradients_reach_only_kept_weights(mixed):
    cfg, model, tokens, sfn, sparams, sstate = mixed
    loss = lambda p: lm_loss(sfn(p, sstate, tokens[:, :-1]), tokens[:, 1:])
    tx = optax.adam(1e-2)

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = tx.update(grads, s, p)
        return value, grads, optax.apply_updates(p, updates), s

    first, grads, sparams, state = step(sparams, tx.init(sparams))
    masked = 0
    for g, m in zip(jax.tree.leaves(grads),
                    jax.tree.leaves(sstate["masks"], is_leaf=lambda x: x is None)):
        if m is None:
            continue
        masked += 1
        g, m = np.asarray(g), np.asarray(m)
        assert np.abs(np.where(m, 0.0, g)).max() == 0.0   # pruned: no gradient
        assert np.abs(np.where(m, g, 0.0)).max() > 0.0    # kept: learning
    assert masked == 8   # one layer or one stack: 3 wide, 1 + 2 + 2 factors
    for _ in range(12):
        last, _, sparams, state = step(sparams, state)
    assert float(last) < float(first) - 0.3, (float(first), float(last))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("sparsity", [1.0, -0.1])
@pytest.mark.parametrize("kind", list(KINDS))
def test_sparsity_outside_range_is_one_line(kind, sparsity):
    with pytest.raises(ValueError, match=rf"^{KINDS[kind].__name__}\(.*sparsity must be in \[0, 1\)") as e:
        KINDS[kind](FFN_WEIGHTS, sparsity)
    assert "\n" not in str(e.value)


def test_sparse_parallel_needs_whole_branches():
    with pytest.raises(ValueError, match=r"SparseParallel.*not a whole number"):
        sj.SparseParallel(FFN_WEIGHTS, 0.6)


def _init_error(model, params, x, rule) -> str:
    with pytest.raises(ValueError) as e:
        sj.sparsify(model.apply, rule).init(params, x, rng=jax.random.key(0))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_sparse_wide_refuses_weights_outside_an_ffn():
    model = TransformerLM(CFG)
    x = jnp.zeros((2, 8), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(1), x)
    message = _init_error(model, params, x, sj.SparseWide("*/attn/q/kernel", 0.5))
    assert message.startswith("params/layers_0/attn/q/kernel: SparseWide(") and "FFN" in message
    message = _init_error(model, params, x, sj.SparseWide("*/mlp/up/kernel", 0.5))
    assert "SparseWide(" in message and "mlp/gate/kernel" in message and "together" in message


class BiasMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="down")(nn.gelu(nn.Dense(12, name="up")(x)))


def test_sparse_wide_refuses_a_bias_over_the_hidden_units():
    x = jnp.ones((3, 4))
    model = BiasMLP()
    message = _init_error(model, jax.jit(model.init)(jax.random.key(0), x), x,
                          sj.SparseWide("*/kernel", 0.5))
    assert message.startswith("params/down/kernel: SparseWide(") and "bias" in message
