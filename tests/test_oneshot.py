"""Calibration (compiler) and one-shot pruning: magnitude, Wanda, SparseGPT, DSnoT."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sparsejax as sj
from sparsejax.compiler import calibration
from sparsejax.oneshot import (Structure, dsnot_refine, magnitude_prune, reconstruction_error,
                               sparsegpt_prune, sparsegpt_reference, wanda_prune)

STRUCTURES = [Structure("matrix", 0.5), Structure("per_output", 0.7), Structure.nm(2, 4),
              Structure.nm(4, 8)]


def mlp(params, x):
    """A plain-function MLP whose channels have very different scales at every layer, as the
    outlier features of LLMs do (inputs, and per-channel gains like a norm's learned scale)."""
    h = jnp.tanh(x @ params["w1"]) * params["g1"]
    h = jnp.tanh(h @ params["w2"]) * params["g2"]
    return h @ params["w3"]


def _mlp_setup(seed=0, k=32, hidden=32, out=32, batches=3, rows=40):
    keys = jax.random.split(jax.random.key(seed), 6)
    params = {"w1": jax.random.normal(keys[0], (k, hidden)) / np.sqrt(k),
              "w2": jax.random.normal(keys[1], (hidden, hidden)) / np.sqrt(hidden),
              "w3": jax.random.normal(keys[2], (hidden, out)) / np.sqrt(hidden)}
    params["g1"], params["g2"] = jnp.exp(jax.random.normal(keys[3], (2, hidden)))
    scales = jnp.exp(jax.random.normal(jax.random.fold_in(keys[3], 1), (k,)))
    mix = jnp.eye(k) + 0.5 * jax.random.normal(keys[4], (k, k)) / np.sqrt(k)
    xs = [(jax.random.normal(jax.random.fold_in(keys[5], i), (rows, k)) @ mix) * scales
          for i in range(batches)]
    return params, xs


@pytest.fixture(scope="module")
def mlp_setup():
    return _mlp_setup()


def _layer(seed, k=32, n=32, tokens=96):
    rng = np.random.default_rng(seed)
    mix = np.eye(k) + rng.normal(size=(k, k)) / np.sqrt(k)
    x = rng.normal(size=(tokens, k)) @ mix * rng.uniform(0.2, 3.0, size=k)
    w = rng.normal(size=(k, n)).astype(np.float32)
    return w, (x.T @ x).astype(np.float32)


# ----------------------------------------------------------------------------- calibration


def test_calibration_gram_matches_activations(mlp_setup):
    params, xs = mlp_setup
    stats = calibration.calibrate(mlp, params, xs)
    h1 = [jnp.tanh(x @ params["w1"]) * params["g1"] for x in xs]
    want = {"w1": xs, "w2": h1,
            "w3": [jnp.tanh(h @ params["w2"]) * params["g2"] for h in h1]}
    for path, acts in want.items():
        x = jnp.concatenate(acts).astype(jnp.float64 if jax.config.x64_enabled else jnp.float32)
        s = stats[path]
        chex.assert_trees_all_close(s.gram, x.T @ x, rtol=2e-5, atol=1e-3)
        chex.assert_trees_all_close(s.sum, x.sum(0), rtol=1e-5, atol=1e-4)
        chex.assert_trees_all_close(s.sqsum, (x * x).sum(0), rtol=1e-5, atol=1e-3)
        assert float(s.count) == x.shape[0]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gram_of_16_bit_activations_is_their_float32_gram(dtype):
    # 16-bit activations (bf16 models) take the 16-bit matmul with float32 accumulation:
    # it must equal the float64 Gram of the same values up to float32 accumulation.
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(300, 24)) * rng.uniform(0.1, 8.0, size=24), dtype)
    want = np.asarray(x, np.float64).T @ np.asarray(x, np.float64)
    stats = jax.jit(calibration.gram_stats)(x)
    assert stats.gram.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(stats.gram), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(np.asarray(stats.sqsum), np.diag(want), rtol=1e-5)


def test_calibration_per_layer_in_scans_and_across_devices():
    """A scanned stack gives one Gram per layer; a sharded batch or a psum gives the global sum."""
    keys = jax.random.split(jax.random.key(1), 3)
    stack = jax.random.normal(keys[0], (3, 8, 8)) / 3

    def scanned(params, x):
        def body(h, w):
            return jnp.tanh(h @ w), None
        return jax.lax.scan(body, x, params["w"])[0]

    x = jax.random.normal(keys[1], (16, 8))
    params = {"w": stack}
    cal = calibration.trace(scanned, params, x)
    (key,) = [s.key for s in cal.sites]
    stats = cal.collect(params, [(x,)], [key])
    h = x
    for layer in range(3):
        chex.assert_trees_all_close(stats[key].gram[layer], h.T @ h, rtol=1e-5, atol=1e-4)
        h = jnp.tanh(h @ stack[layer])

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    chex.assert_trees_all_close(cal.collect(params, [(sharded,)], [key])[key].gram,
                                stats[key].gram, rtol=1e-5, atol=1e-4)
    program = cal.program([key], axis_name="data")
    psummed = jax.jit(jax.shard_map(lambda p, a: program(p, a)[1], mesh=mesh,
                                    in_specs=(P(), P("data")), out_specs=P(),
                                    check_vma=False))(
        jax.tree.leaves(params), [sharded])
    chex.assert_trees_all_close(psummed[key].gram, stats[key].gram, rtol=1e-5, atol=1e-4)


def test_calibration_nnx():
    from flax import nnx

    class Two(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(8, 12, rngs=rngs)
            self.b = nnx.Linear(12, 4, rngs=rngs)

        def __call__(self, x):
            return self.b(jnp.tanh(self.a(x)))

    graphdef, state = nnx.split(Two(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(2), (10, 8))
    stats = calibration.calibrate(lambda s, x: nnx.merge(graphdef, s)(x), state, [x])
    (path,) = [p for p in stats if "b" in p.split("/") and "kernel" in p]
    module = nnx.merge(graphdef, state)
    h = jnp.tanh(module.a(x))
    chex.assert_trees_all_close(stats[path].gram, h.T @ h, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- methods


@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s.describe())
def test_sparsegpt_matches_float64_reference(structure):
    w, gram = _layer(3)
    q, keep, damp = sparsegpt_prune(jnp.asarray(w), jnp.asarray(gram), structure, block=16)
    q_ref, keep_ref = sparsegpt_reference(w, gram, structure, block=16)
    assert damp == 0.01
    np.testing.assert_array_equal(np.asarray(keep), keep_ref)
    np.testing.assert_allclose(np.asarray(q), q_ref, rtol=1e-4, atol=1e-4 * np.abs(q_ref).max())


def _check_exact(keep, structure):
    keep = np.asarray(keep)
    k, n = keep.shape
    if structure.kind == "nm":
        groups = keep.reshape(k // structure.m, structure.m, n).sum(1)
        assert (groups == structure.n).all()
    elif structure.kind == "per_output":
        assert (keep.sum(0) == k - round(structure.sparsity * k)).all()
    else:
        assert keep.sum() == k * n - round(structure.sparsity * k * n)


@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: s.describe())
def test_masks_hit_exact_sparsity_and_pattern(structure):
    w, gram = _layer(4)
    w, gram = jnp.asarray(w), jnp.asarray(gram)
    norm = jnp.sqrt(jnp.diagonal(gram))
    outs = {"magnitude": magnitude_prune(w, structure), "wanda": wanda_prune(w, norm, structure)}
    q, keep, _ = sparsegpt_prune(w, gram, structure, block=16)
    outs["sparsegpt"] = (q, keep)
    mean = jnp.full((32,), 0.3)
    outs["dsnot"] = dsnot_refine(w, *outs["wanda"], gram, mean, norm ** 2 / 96, structure)[:2]
    for name, (w_hat, keep) in outs.items():
        _check_exact(keep, structure)
        assert not np.any(np.asarray(w_hat)[~np.asarray(keep)]), name


def _wanda_repository_mask(w_out_in, x, sparsity=None, prune_n=0, prune_m=0):
    """The Wanda repository's prune_wanda (lib/prune.py) in NumPy: W is (out, in) as
    torch.nn.Linear stores it; True = pruned. prune_n is the count *pruned* per prune_m."""
    metric = np.abs(w_out_in) * np.sqrt((x.astype(np.float64) ** 2).sum(0))[None, :]
    pruned = np.zeros(metric.shape, bool)
    if prune_n:
        for ii in range(0, metric.shape[1], prune_m):
            lowest = np.argsort(metric[:, ii:ii + prune_m], axis=1, kind="stable")[:, :prune_n]
            np.put_along_axis(pruned, ii + lowest, True, axis=1)
    else:
        lowest = np.argsort(metric, axis=-1, kind="stable")[:, :int(metric.shape[1] * sparsity)]
        np.put_along_axis(pruned, lowest, True, axis=1)
    return pruned


@pytest.mark.parametrize("rule,kwargs", [(sj.Prune("*", 0.5), {"sparsity": 0.5}),
                                         (sj.NM("*", 4, 8), {"prune_n": 4, "prune_m": 8})],
                         ids=["50%", "4:8"])
def test_wanda_matches_the_papers_code_through_a_linen_dense(rule, kwargs):
    # Score |W_ij|·‖X_j‖₂ compared within each output (row of torch's (out, in) weight), N:M
    # groups along the inputs. In (24 inputs) != out (16): a transposed score, norm or group
    # direction would not even have the right shape; loud input channels make Wanda's mask
    # differ from magnitude's, so the comparison means something.
    import flax.linen as nn
    layer = nn.Dense(16, use_bias=False)
    rng = np.random.default_rng(7)
    xs = [jnp.asarray(rng.normal(size=(2, 20, 24)) * np.exp(2 * rng.normal(size=24)), jnp.float32)
          for _ in range(2)]
    params = layer.init(jax.random.key(0), xs[0])
    out = sj.oneshot(layer.apply, params, xs, [rule], method="wanda")
    keep = np.asarray(out.sstate["masks"]["params"]["kernel"])            # (in, out)
    x = np.concatenate([np.asarray(b).reshape(-1, 24) for b in xs])
    w = np.asarray(params["params"]["kernel"])
    want_pruned = _wanda_repository_mask(w.T, x, **kwargs)                # (out, in)
    np.testing.assert_array_equal(~keep.T, want_pruned)
    magnitude = np.asarray(sj.oneshot(layer.apply, params, xs, [rule], method="magnitude")
                           .sstate["masks"]["params"]["kernel"])
    assert (magnitude != keep).mean() > 0.05


def test_unstructured_sparsities_share_one_compiled_solver():
    # 50 / 60 / 70% reach SparseGPT's and DSnoT's solvers as counts: one program per kind
    # and shape (a sweep over sparsities compiles once), each result still exact.
    from sparsejax.oneshot import dsnot, sparsegpt
    w, gram = _layer(8, k=16, n=24)
    w, gram = jnp.asarray(w), jnp.asarray(gram)
    norm = jnp.sqrt(jnp.diagonal(gram))
    sizes = []
    for sparsity in (0.45, 0.55, 0.65):
        structure = Structure("per_output", sparsity)
        q, keep, _ = sparsegpt_prune(w, gram, structure, block=8)
        _check_exact(keep, structure)
        start, keep = wanda_prune(w, norm, structure)
        keep = dsnot_refine(w, start, keep, gram, jnp.zeros(16), norm ** 2 / 96, structure)[1]
        _check_exact(keep, structure)
        sizes.append((sparsegpt._solve._cache_size(), dsnot._refine._cache_size()))
    assert sizes[0] == sizes[1] == sizes[2], sizes


def test_dsnot_never_worse_than_its_start_and_swaps():
    w, gram = _layer(5)
    w, gram = jnp.asarray(w), jnp.asarray(gram)
    norm = jnp.sqrt(jnp.diagonal(gram))
    mean = jnp.asarray(np.random.default_rng(0).normal(size=32), jnp.float32)
    for structure in (Structure("per_output", 0.7), Structure.nm(2, 4)):
        start, keep = wanda_prune(w, norm, structure)
        w_hat, keep2, swaps = dsnot_refine(w, start, keep, gram, mean, norm ** 2 / 96, structure)
        before = float(reconstruction_error(w, start, gram))
        after = float(reconstruction_error(w, w_hat, gram))
        assert after <= before and int(swaps.sum()) > 0
        _check_exact(keep2, structure)


def test_error_order_sparsegpt_wanda_magnitude_every_layer(mlp_setup):
    params, xs = mlp_setup
    program = calibration.trace(mlp, params, xs[0])
    for rule in (sj.Prune("re:w.", 0.5),):     # N:M: the reference and exactness tests
        errors = {}
        for method in ("magnitude", "wanda", "sparsegpt"):
            out = sj.oneshot(mlp, params, xs, [rule], method=method, sequential=False,
                             observe="all", block_size=16, calibration_program=program)
            errors[method] = out.report.errors()
        for path in errors["magnitude"]:
            assert errors["sparsegpt"][path] <= errors["wanda"][path] <= errors["magnitude"][path], (
                rule, path, {m: e[path] for m, e in errors.items()})


def test_oneshot_sequential_state_and_report(mlp_setup):
    params, xs = mlp_setup
    rule = sj.Prune("re:w[12]", 0.5)
    out = sj.oneshot(mlp, params, xs, [rule], method="wanda")
    # Sequential: w2's mask is Wanda's on the activations of the *pruned* first layer.
    h = jnp.concatenate([jnp.tanh(x @ out.params["w1"]) * params["g1"] for x in xs])
    want = Structure("per_output", 0.5).keep(jnp.abs(params["w2"]) * jnp.linalg.norm(h, axis=0)[:, None])
    np.testing.assert_array_equal(np.asarray(out.sstate["masks"]["w2"]), np.asarray(want))
    assert out.sstate["masks"]["w3"] is None and out.report.passes == 2
    chex.assert_trees_all_close(out.sfn(out.params, out.sstate, xs[0]), mlp(out.params, xs[0]))
    np.testing.assert_array_equal(np.asarray(out.params["w3"]), np.asarray(params["w3"]))
    text = str(out.report)
    assert "w1" in text and "w2" in text and "err mask" in text


def test_oneshot_scanned_stack_is_pruned_layer_by_layer():
    """A scanned stack (as nn.scan lays it out) is pruned in layer order, each layer
    calibrated on the outputs of the layers already pruned."""
    stack = jax.random.normal(jax.random.key(3), (3, 8, 8)) / 3

    def scanned(params, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, params["w"])[0]

    xs = [jax.random.normal(jax.random.key(4 + i), (16, 8)) for i in range(2)]
    out = sj.oneshot(scanned, {"w": stack}, xs, [sj.NM("w", 2, 4)], method="wanda")
    assert [r.name for r in out.report.sites] == ["w[0]", "w[1]", "w[2]"]
    assert out.report.passes == 3
    h = jnp.concatenate(xs)
    for layer in range(3):    # layer l's mask is Wanda's on the pruned layers' outputs
        want = Structure.nm(2, 4).keep(jnp.abs(stack[layer]) * jnp.linalg.norm(h, axis=0)[:, None])
        np.testing.assert_array_equal(np.asarray(out.sstate["masks"]["w"][layer]), np.asarray(want))
        h = jnp.tanh(h @ out.params["w"][layer])


def test_oneshot_sequential_per_layer_calibrates_a_layer_at_once():
    """sequential="layer": one pass per scanned layer; every site of layer l sees the outputs
    of pruned layers < l, and within the layer the dense activations (b's input comes from
    the dense a), as the SparseGPT and Wanda code do."""
    keys = jax.random.split(jax.random.key(5), 2)
    params = {"a": jax.random.normal(keys[0], (3, 8, 8)) / 3,
              "b": jax.random.normal(keys[1], (3, 8, 8)) / 3}

    def scanned(params, x):
        def layer(h, w):
            return jnp.tanh(jnp.tanh(h @ w[0]) @ w[1]), None
        return jax.lax.scan(layer, x, (params["a"], params["b"]))[0]

    xs = [jax.random.normal(jax.random.key(6 + i), (16, 8)) for i in range(2)]
    rule = [sj.Prune("*", 0.5)]
    out = sj.oneshot(scanned, params, xs, rule, method="wanda", sequential="layer")
    assert out.report.passes == 3 and len(out.report.sites) == 6
    assert sj.oneshot(scanned, params, xs, rule, method="wanda").report.passes == 6
    wanda = lambda w, x: Structure("per_output", 0.5).keep(jnp.abs(w) * jnp.linalg.norm(x, axis=0)[:, None])
    masks, pruned = out.sstate["masks"], out.params
    h = jnp.concatenate(xs)
    for layer in range(3):
        inner_dense = jnp.tanh(h @ params["a"][layer])
        np.testing.assert_array_equal(np.asarray(masks["a"][layer]), np.asarray(wanda(params["a"][layer], h)))
        np.testing.assert_array_equal(np.asarray(masks["b"][layer]),
                                      np.asarray(wanda(params["b"][layer], inner_dense)))
        h = jnp.tanh(jnp.tanh(h @ pruned["a"][layer]) @ pruned["b"][layer])
    with pytest.raises(ValueError, match="sequential must be True, False or 'layer'"):
        sj.oneshot(scanned, params, xs, rule, method="wanda", sequential="group")


def test_calibration_linen_scan_stack_is_per_layer():
    from sparsejax.models import transformer
    cfg = transformer.TransformerConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                                        scan_layers=True)
    model = transformer.TransformerLM(cfg)
    x = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
    params = jax.jit(model.init)(jax.random.key(1), x)      # one program, not one per operation
    stats = calibration.calibrate(model.apply, params, [x])
    assert stats["params/layers/mlp/down/kernel"].gram.shape == (2, 32, 32)   # one per layer
    assert stats["params/lm_head/kernel"].gram.shape == (16, 16)
    gram = stats["params/layers/attn/q/kernel"].gram
    assert not np.allclose(gram[0], gram[1]) and float(jnp.min(jnp.diagonal(gram[0]))) > 0


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_name_site_and_method(mlp_setup):
    params, xs = mlp_setup
    with pytest.raises(ValueError, match=r"method='wanda'.*calibration batch 1.*same shapes"):
        sj.oneshot(mlp, params, [xs[0], xs[1][:10]], [sj.Prune("*", 0.5)], method="wanda")
    with pytest.raises(ValueError, match=r"fails on the example batch"):
        sj.oneshot(mlp, params, [xs[0][:, :5]], [sj.Prune("*", 0.5)], method="wanda")
    with pytest.raises(ValueError, match=r"w1: oneshot\(method='sparsegpt'\): Block"):
        sj.oneshot(mlp, params, xs, [sj.Block("re:w1", 0.5, block=(8, 8))],
                   method="sparsegpt")
    with pytest.raises(ValueError, match="method must be one of"):
        sj.oneshot(mlp, params, xs, [sj.Prune("*", 0.5)], method="obs")


def test_too_few_tokens_and_singular_hessian_damp_more_never_nan(mlp_setup):
    params, xs = mlp_setup
    few = [x[:4].at[:, :8].set(0.0) for x in xs[:1]]     # 4 tokens < 32 inputs, 8 dead channels
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sj.oneshot(mlp, params, few, [sj.Prune("re:w1", 0.5)], method="sparsegpt")
    assert any("4 calibration tokens < 32 inputs" in str(w.message) for w in caught)
    assert "dampening raised" in str(out.report) and out.report.sites[0].damp >= 0.1
    assert np.isfinite(np.asarray(out.params["w1"])).all()
    # The dead input channels carry no information: SparseGPT prunes their weights.
    assert not np.asarray(out.params["w1"])[:8].any()
    # An exactly singular Gram (rank 1) still factorizes after dampening.
    q, keep, damp = sparsegpt_prune(jnp.ones((16, 4)), jnp.ones((16, 16)), Structure.nm(2, 4),
                                    damp=0.0)
    assert np.isfinite(np.asarray(q)).all() and damp > 0


# ----------------------------------------------------------------------------- train.py


def test_train_py_oneshot_flag(tmp_path):
    import json
    import pathlib
    import train
    from flax.serialization import to_bytes
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)))
    tiny = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, seq_len=32, batch_size=8, steps=1,
                eval_batches=2, log_every=1, mesh="data:1", data=str(corpus))
    with pytest.raises(ValueError, match="--oneshot prunes a trained model"):
        train.prepare(train.Config(**tiny, oneshot="wanda"))
    # A "finished dense run": its final params file is all --init_from reads.
    dense = train.prepare(train.Config(**tiny, recipe="dense", workdir=str(tmp_path / "dense")))
    state, _, _ = train.create_state(dense)
    (tmp_path / "dense" / train.FINAL_PARAMS).write_bytes(to_bytes(state.params))
    with pytest.raises(ValueError, match="--oneshot='obs': use one of"):
        train.prepare(train.Config(**tiny, oneshot="obs", init_from=str(tmp_path / "dense")))
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"rules": [{"rule": "Prune", "pattern": "re:.*mlp.*/kernel",
                                             "sparsity": 0.5}]}))
    result = train.train_and_evaluate(train.Config(
        **tiny, recipe=str(recipe), init_from=str(tmp_path / "dense"), oneshot="sparsegpt",
        oneshot_batches=2, workdir=str(tmp_path / "pruned")))
    text = (tmp_path / "pruned" / "oneshot.txt").read_text()
    assert "eval loss" in text and "params/layers_0/mlp/down/kernel" in text
    assert {round(r.density, 3) for r in result["report"].rows} == {0.5}   # fine-tuned, masks fixed


def test_calibration_observes_activation_eqns_with_any_observer(mlp_setup):
    """The hook for activation rules: an eqn's output, with a custom additive observer."""
    params, xs = mlp_setup
    cal = calibration.trace(mlp, params, xs[0])
    tanh_keys = [(i,) for i, e in enumerate(cal.closed.jaxpr.eqns) if e.primitive.name == "tanh"]
    observer = lambda h: {"above": jnp.sum(jnp.abs(h) > 0.5, axis=tuple(range(h.ndim - 1))),
                          "n": jnp.asarray(h.size // h.shape[-1], jnp.float32)}
    stats = cal.collect(params, xs, activation_keys=tanh_keys[:1], observer=observer)
    h = jnp.concatenate([jnp.tanh(x @ params["w1"]) for x in xs])
    np.testing.assert_array_equal(np.asarray(stats[tanh_keys[0]]["above"]),
                                  np.asarray(jnp.sum(jnp.abs(h) > 0.5, axis=0)))
    assert float(stats[tanh_keys[0]]["n"]) == h.shape[0]
