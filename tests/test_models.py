"""Reference models: shapes, paths recipes target, causality, RoPE, scan equivalence, sparsify."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax as sj
from sparsejax.training import data
from sparsejax import paths as path_lib
from sparsejax.models import transformer as tr
from sparsejax.models import vision

_rope = jax.jit(tr.rope)
TINY = tr.TransformerConfig(vocab_size=37, d_model=24, n_layers=2, n_heads=3, d_ff=40)


def _tokens(seed, shape, vocab=TINY.vocab_size):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@pytest.fixture(scope="module")
def tiny_lm():
    model = tr.TransformerLM(TINY)
    return model, jax.jit(model.init)(jax.random.key(1), _tokens(0, (2, 13)))


def test_lm_shapes_paths_param_count_and_causality(tiny_lm):
    model, variables = tiny_lm
    x = _tokens(2, (2, 13))
    x2 = x.at[:, 7:].set((x[:, 7:] + 5) % TINY.vocab_size)     # change only the future
    both = jax.jit(model.apply)(variables, jnp.concatenate([x, x2]))
    assert both.shape == (4, 13, TINY.vocab_size) and both.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(both)))
    y, y2 = both[:2], both[2:]
    np.testing.assert_allclose(y[:, :7], y2[:, :7], rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(y[:, 7:] - y2[:, 7:]))) > 1e-3
    paths = set(path_lib.leaf_paths(variables))
    for layer in range(2):
        for name in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down"):
            assert f"params/layers_{layer}/{name}/kernel" in paths
    assert "params/lm_head/kernel" in paths
    assert sum(a.size for a in jax.tree.leaves(variables)) == TINY.num_params()


def test_rope_is_a_rotation_and_relative():
    x = jax.random.normal(jax.random.key(4), (9, 2, 6))
    pos = jnp.arange(9)
    r = _rope(x, pos)
    np.testing.assert_allclose(jnp.linalg.norm(r, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(r[0], x[0], rtol=1e-6)              # position 0 is the identity
    # q·k depends on the offset only: shifting both positions keeps the scores.
    q, k = x[3], x[5]
    s1 = jnp.sum(_rope(q[None], jnp.array([2]))[0] * _rope(k[None], jnp.array([6]))[0], -1)
    s2 = jnp.sum(_rope(q[None], jnp.array([7]))[0] * _rope(k[None], jnp.array([11]))[0], -1)
    np.testing.assert_allclose(s1, s2, rtol=1e-4, atol=1e-5)


def test_scan_and_remat_match_the_unrolled_model(tiny_lm):
    unrolled, variables = tiny_lm
    scanned = tr.TransformerLM(TINY.replace(scan_layers=True, remat=True))
    x = _tokens(5, (2, 9))
    p = variables["params"]
    stacked = {k: v for k, v in p.items() if not k.startswith("layers_")}
    stacked["layers"] = jax.tree.map(lambda *a: jnp.stack(a), p["layers_0"], p["layers_1"])
    assert jax.tree.structure(jax.eval_shape(scanned.init, jax.random.key(0), x)["params"]) == \
        jax.tree.structure(stacked)

    def loss_and_grad(model, v):
        return jax.jit(jax.value_and_grad(lambda v: tr.lm_loss(model.apply(v, x[:, :-1]), x[:, 1:])))(v)

    l1, g1 = loss_and_grad(unrolled, variables)
    l2, g2 = loss_and_grad(scanned, {"params": stacked})
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    np.testing.assert_allclose(g2["params"]["layers"]["mlp"]["up"]["kernel"][1],
                               g1["params"]["layers_1"]["mlp"]["up"]["kernel"], rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = TINY.replace(dtype="bfloat16")
    model = tr.TransformerLM(cfg)
    x = _tokens(7, (2, 5))
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(jax.eval_shape(model.init, jax.random.key(8), x)))
    logits = jax.jit(model.init_with_output)(jax.random.key(8), x)[0]
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("vocab", [300, tr.ONE_HOT_GRAD_MAX_VOCAB + 1])
def test_embedding_lookup_is_nn_embed_with_gradients_summed_in_float32(vocab):
    # Few distinct ids (most repeat), as in byte-level text: many tokens add to one row.
    table = jax.random.normal(jax.random.key(0), (vocab, 16))
    ids = jax.random.randint(jax.random.key(1), (3, 40), 0, 20)
    flax_embed = nn.Embed(vocab, 16, dtype=jnp.bfloat16)

    def loss(lookup):
        return lambda t: jnp.sum(jnp.sin(lookup(t).astype(jnp.float32)))

    ours = loss(lambda t: tr.embed_lookup(t, ids, jnp.bfloat16))
    theirs = loss(lambda t: flax_embed.apply({"params": {"embedding": t}}, ids))
    assert float(ours(table)) == float(theirs(table))      # the same forward values
    # Each token's cotangent is bf16 (the activation's dtype); their sum per row, exactly:
    rows = np.asarray(jnp.take(table, ids, axis=0).astype(jnp.bfloat16), np.float64)
    per_token = np.asarray(jnp.asarray(np.cos(rows), jnp.bfloat16), np.float64).reshape(-1, 16)
    want = np.zeros((vocab, 16))
    np.add.at(want, np.asarray(ids).reshape(-1), per_token)
    got = jax.grad(ours)(table)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_lm_loss_weights_and_tied_embeddings():
    logits = jax.random.normal(jax.random.key(9), (2, 5, 7))
    targets = _tokens(10, (2, 5), 7)
    full = tr.lm_loss(logits, targets)
    expected = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
    np.testing.assert_allclose(full, expected, rtol=1e-6)
    weights = jnp.zeros((2, 5)).at[0].set(1.0)
    np.testing.assert_allclose(tr.lm_loss(logits, targets, weights), tr.lm_loss(logits[:1], targets[:1]),
                               rtol=1e-6)
    tied = tr.TransformerLM(TINY.replace(tie_embeddings=True))
    variables = jax.eval_shape(tied.init, jax.random.key(11), targets)
    assert "lm_head" not in variables["params"]
    assert sum(a.size for a in jax.tree.leaves(variables)) == TINY.replace(tie_embeddings=True).num_params()


def test_fused_attention_matches_the_explicit_form_and_sparsify_finds_every_kernel(tiny_lm):
    model, variables = tiny_lm
    tokens = _tokens(3, (2, 13))
    fused = tr.TransformerLM(TINY.replace(attention="fused"))
    # (jitted: one program each, where op by op every operation was a program to compile)
    want = jax.jit(model.apply)(variables, tokens)
    np.testing.assert_allclose(jax.jit(fused.apply)(variables, tokens), want, rtol=1e-5, atol=1e-5)
    # Decoding with a KV cache keeps the explicit form: it matches the full forward's last row.
    cache = tr.init_cache(TINY, 2, 13)
    prefix, cache = jax.jit(lambda v, t, c: fused.apply(v, t, c, 0))(variables, tokens[:, :12], cache)
    last, _ = jax.jit(lambda v, t, c: fused.apply(v, t, c, 12))(variables, tokens[:, 12:], cache)
    np.testing.assert_allclose(last[:, 0], want[:, 12], rtol=1e-4, atol=1e-4)
    sfn = sj.sparsify(fused.apply, sj.Prune(r"re:.*(attn|mlp)/.*/kernel", sparsity=0.5))
    sfn.init(variables, tokens)
    assert len(sfn.report().rows) == 7 * TINY.n_layers


@pytest.mark.parametrize("changes, message", [
    ({"d_model": 25}, "multiple of n_heads"),
    ({"d_model": 15, "n_heads": 3}, "must be even"),
    ({"n_layers": 0}, "n_layers"),
    ({"dtype": "float33"}, "dtype"),
    ({"attention": "flash"}, "attention must be one of"),
])
def test_config_errors_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        TINY.replace(**changes)


def test_config_round_trips_through_a_dict():
    cfg = TINY.replace(scan_layers=True)
    assert tr.TransformerConfig.from_dict(cfg.to_dict()) == cfg
    conv = vision.ConvNetConfig(channels=(5, 7))
    assert vision.ConvNetConfig.from_dict(conv.to_dict()) == conv


@pytest.mark.parametrize("scan", [False, True])
def test_sparsify_finds_every_lm_kernel_and_trains(scan):
    cfg = TINY.replace(scan_layers=scan, vocab_size=40, d_model=32, n_heads=2, d_ff=48)
    model = tr.TransformerLM(cfg)
    x = _tokens(12, (4, 12), cfg.vocab_size)
    variables = jax.jit(model.init)(jax.random.key(13), x)
    recipe = sj.Recipe([sj.NM("*/mlp/*/kernel", n=2, m=4), sj.Prune("*", sparsity=0.75)])
    sfn = sj.sparsify(model.apply, recipe)
    sparams, sstate = sfn.init(variables, x)
    report = sfn.report()
    ruled = {r.path: r.rule for r in report.rows}
    assert len(ruled) == 7 * (1 if scan else 2) + 1
    assert all(r.startswith("NM") for p, r in ruled.items() if "/mlp/" in p)
    assert all(r.startswith("Prune") for p, r in ruled.items() if "/mlp/" not in p)

    if not scan:
        return      # training through the unrolled model adds compile time, not coverage
    opt = optax.adam(3e-3)
    opt_state = opt.init(sparams)

    @jax.jit
    def step(p, o):
        loss, g = jax.value_and_grad(lambda p: tr.lm_loss(sfn(p, sstate, x[:, :-1]), x[:, 1:]))(p)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    losses = []
    for _ in range(25):
        sparams, opt_state, loss = step(sparams, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("make", [lambda: vision.MLPMixer(vision.MixerConfig(width=16, n_layers=1, token_hidden=8,
                                                                              channel_hidden=24)),
                                  lambda: vision.ConvNet(vision.ConvNetConfig(channels=(6, 10, 12)))])
def test_vision_models_sparsify_and_learn_digits(make):
    model = make()
    digits = data.load_digits(seed=14)
    images, labels = jnp.asarray(digits.train_images[:64]), jnp.asarray(digits.train_labels[:64])
    variables = jax.jit(model.init)(jax.random.key(15), images)
    assert jax.jit(model.apply)(variables, images).shape == (64, 10)
    sfn = sj.sparsify(model.apply, sj.Prune("*/kernel", sparsity=0.5))
    sparams, sstate = sfn.init(variables, images)
    kernels = [p for p in path_lib.leaf_paths(variables) if p.endswith("/kernel")]
    assert sorted(r.path for r in sfn.report().rows) == sorted(kernels)
    opt = optax.adam(3e-2)
    opt_state = opt.init(sparams)

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(sfn(p, sstate, images), labels).mean()

    @jax.jit
    def step(p, o):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    losses = []
    for _ in range(41):          # step returns the loss before its update
        sparams, opt_state, loss = step(sparams, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_patchify_orders_patches_row_major():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    p = vision.patchify(x, 2)
    assert p.shape == (2, 6, 12)
    np.testing.assert_array_equal(p[1, 4].reshape(2, 2, 3), x[1, 2:4, 2:4])
    with pytest.raises(ValueError, match="patch size 4 must divide"):
        vision.patchify(x, 4)


@pytest.mark.parametrize("scan", [False, True])
def test_lm_kv_cache_decoding_matches_the_full_forward(scan):
    cfg = tr.TransformerConfig(d_model=32, n_layers=2, n_heads=4, d_ff=48, scan_layers=scan)
    model = tr.TransformerLM(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 256)
    # (jitted: one program each, where op by op every operation was a program to compile)
    params = jax.jit(model.init)(jax.random.key(1), tokens)
    full = jax.jit(model.apply)(params, tokens)
    logits, cache = jax.jit(lambda p, t, c: model.apply(p, t, c, 0))(params, tokens[:, :4],
                                                                      tr.init_cache(cfg, 2, 10))
    steps = [logits]
    decode = jax.jit(model.apply)
    for i in range(4, 7):   # one token at a time, the position traced
        logits, cache = decode(params, tokens[:, i:i + 1], cache, jnp.int32(i))
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5, rtol=2e-5)
    assert cache[0].shape == (2, 2, 10, 4, 8)
