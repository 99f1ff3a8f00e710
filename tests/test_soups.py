"""Sparse model soups: same-mask averaging, the greedy recipe, and the IMP-with-soups driver."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import soups
from sparsejax.training import imp_soups
from sparsejax.optim import magnitude_masks, masked_sparsity

SHAPES = {"Dense_0": {"kernel": (6, 8), "bias": (8,)}, "Dense_1": {"kernel": (8, 3), "bias": (3,)}}


def random_params(seed, scale=1.0):
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
    return jax.tree.map(lambda shape: scale * jax.random.normal(next(keys), shape), SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))


def masks_at(params, sparsity, seed=0):
    """Random masks at the kernels (None at biases)."""
    rng = np.random.default_rng(seed)
    return {name: {"kernel": jnp.asarray(rng.random(layer["kernel"].shape) >= sparsity),
                   "bias": None} for name, layer in params.items()}


def forward(params, x):
    h = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


def apply(params, masks):
    return jax.tree.map(lambda p, m: p if m is None else p * m, params, masks,
                        is_leaf=lambda x: x is None)


def loss_fn(params, masks, batch):
    logits = forward(apply(params, masks), batch["x"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    return loss, {"loss": loss}


DATA = jax.random.normal(jax.random.PRNGKey(7), (96, 6))
LABELS = jnp.argmax(DATA @ jax.random.normal(jax.random.PRNGKey(8), (6, 3)), -1)


def batches(copy, cycle, position):
    # a different order of the same data per copy and cycle
    order = np.random.default_rng(1000 * cycle + 10 * copy + position // 6).permutation(96)
    idx = order[(position % 6) * 16:(position % 6 + 1) * 16]
    return {"x": np.asarray(DATA)[idx], "y": np.asarray(LABELS)[idx]}


def make_optimizer(hparams):
    return optax.adamw(3e-2, weight_decay=hparams.get("weight_decay", 0.0))


def held_out(params, masks=None):
    logits = forward(params if masks is None else apply(params, masks), DATA[:48] * 1.1)
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, LABELS[:48]).mean())


# --------------------------------------------------------------------------- averaging


def test_soup_of_identical_masks_is_their_masked_mean():
    ingredients = [random_params(s) for s in range(3)]
    masks = masks_at(ingredients[0], 0.6)
    soup = soups.uniform_soup(ingredients, [masks] * 3)
    # the ingredients hold nonzeros at pruned entries: the soup must still be exactly sparse
    mean = jax.tree.map(lambda *xs: sum(xs) / 3, *ingredients)
    chex.assert_trees_all_close(soup, apply(mean, masks), rtol=1e-6, atol=1e-6)
    for name in SHAPES:
        pruned = ~np.asarray(masks[name]["kernel"])
        assert pruned.any() and np.all(np.asarray(soup[name]["kernel"])[pruned] == 0)
        assert np.all(np.asarray(soup[name]["kernel"])[~pruned] != 0)
    # the mask is unchanged: what is kept is exactly what was kept
    zeros = {n: np.asarray(soup[n]["kernel"]) == 0 for n in SHAPES}
    for n in SHAPES:
        np.testing.assert_array_equal(zeros[n], ~np.asarray(masks[n]["kernel"]))


@pytest.mark.parametrize("soup", ["uniform", "greedy"])
def test_mismatched_masks_are_refused_naming_the_first_differing_path(soup):
    ingredients = [random_params(s) for s in range(3)]
    masks = masks_at(ingredients[0], 0.5)
    other = jax.tree.map(lambda m: m, masks, is_leaf=lambda x: x is None)
    other["Dense_1"] = {"kernel": ~masks["Dense_1"]["kernel"], "bias": None}
    call = (lambda ms: soups.uniform_soup(ingredients, ms)) if soup == "uniform" else \
        (lambda ms: soups.greedy_soup(ingredients, ms, held_out))
    with pytest.raises(ValueError, match=r"ingredients 0 and 2 have different masks at "
                                         r"Dense_1/kernel \(24 of 24 entries differ\)") as e:
        call([masks, masks, other])
    assert "\n" not in str(e.value)
    unmasked = jax.tree.map(lambda m: m, masks, is_leaf=lambda x: x is None)
    unmasked["Dense_0"] = {"kernel": None, "bias": None}
    with pytest.raises(ValueError, match="ingredients 0 and 1 have different masks at "
                                         "Dense_0/kernel .ingredient 1 leaves it unmasked"):
        call([masks, unmasked, masks])
    with pytest.raises(ValueError, match="one masks pytree per ingredient"):
        call([masks])


def test_greedy_soup_is_never_worse_than_the_best_ingredient_it_starts_from():
    masks = masks_at(random_params(0), 0.5)
    grew = 0
    for trial in range(6):
        # ingredients around one point (averaging helps) mixed with far-off ones (it hurts)
        centre = random_params(100 + trial)
        near = [jax.tree.map(lambda c, n: c + 0.3 * n, centre, random_params(10 * trial + i))
                for i in range(3)]
        far = [random_params(50 + trial, scale=3.0)]
        ingredients = near + far if trial % 2 else far + near
        result = soups.greedy_soup(ingredients, [masks] * 4, held_out)
        masked_losses = [held_out(p, masks) for p in ingredients]
        np.testing.assert_allclose(result.ingredient_losses, masked_losses, rtol=1e-6)
        assert result.chosen[0] == int(np.argmin(masked_losses))
        assert result.loss <= min(masked_losses)
        assert held_out(result.params) == pytest.approx(result.loss, rel=1e-6)
        expected = soups.uniform_soup([ingredients[i] for i in result.chosen],
                                      [masks] * len(result.chosen))
        chex.assert_trees_all_close(result.params, expected)
        grew += len(result.chosen) > 1
        # the caller's own per-ingredient losses give the same soup without re-evaluating them
        known = soups.greedy_soup(ingredients, [masks] * 4, held_out, ingredient_losses=masked_losses)
        assert known.chosen == result.chosen
        chex.assert_trees_all_close(known.params, result.params)
    assert grew > 0   # the recipe did average somewhere, not only pick the best
    with pytest.raises(ValueError, match="ingredient_losses has 2 values for 4 ingredients"):
        soups.greedy_soup(ingredients, [masks] * 4, held_out, ingredient_losses=[0.0, 1.0])


# --------------------------------------------------------------------------- pruning


def test_magnitude_masks_are_nested_and_hit_the_sparsity():
    params = random_params(3)
    first = magnitude_masks(params, 0.5, distribution="global")
    assert masked_sparsity(first) == pytest.approx(0.5, abs=1 / 72)
    assert first["Dense_0"]["bias"] is None
    # prune a perturbed model further: what was pruned stays pruned
    moved = jax.tree.map(lambda p, n: p + 0.5 * n, params, random_params(4))
    second = magnitude_masks(moved, 0.8, masks=first, distribution="uniform")
    for n in SHAPES:
        a, b = np.asarray(first[n]["kernel"]), np.asarray(second[n]["kernel"])
        assert not np.any(b & ~a)
        assert 1 - b.mean() == pytest.approx(0.8, abs=1 / b.size)
        kept = np.abs(np.asarray(moved[n]["kernel"]))[b]
        dropped = np.abs(np.asarray(moved[n]["kernel"]))[a & ~b]
        assert kept.min() >= dropped.max()   # survivors of the first mask ranked by magnitude


# --------------------------------------------------------------------------- the driver


def test_vmapped_retrains_equal_sequential_retrains():
    params = random_params(5, scale=0.5)
    masks = magnitude_masks(params, 0.5)
    hyper = {"weight_decay": jnp.asarray([0.0, 1e-2, 1e-1])}
    kw = dict(loss_fn=loss_fn, make_optimizer=make_optimizer, batches=batches, steps=6, copies=3,
              hyperparams=hyper)
    together, loss_v = imp_soups.retrain_copies(params, masks, parallel="vmap", **kw)
    one_by_one, loss_s = imp_soups.retrain_copies(params, masks, parallel="sequential", **kw)
    chex.assert_trees_all_close(together, one_by_one, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loss_v, loss_s, rtol=1e-5)
    copies = imp_soups.unstack(together, 3)
    assert not np.allclose(copies[0]["Dense_0"]["kernel"], copies[1]["Dense_0"]["kernel"])
    for c in copies:   # pruned weights stay exactly zero through training
        assert np.all(np.asarray(c["Dense_1"]["kernel"])[~np.asarray(masks["Dense_1"]["kernel"])] == 0)


def test_copies_spread_over_devices_equal_one_device():
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    params = random_params(6, scale=0.5)
    masks = magnitude_masks(params, 0.5)
    kw = dict(loss_fn=loss_fn, make_optimizer=make_optimizer, batches=batches, steps=3, copies=2)
    spread, _ = imp_soups.retrain_copies(params, masks, devices=jax.devices()[:2], **kw)
    assert len(spread["Dense_0"]["kernel"].sharding.device_set) == 2
    single, _ = imp_soups.retrain_copies(params, masks, **kw)
    chex.assert_trees_all_close(jax.device_get(spread), jax.device_get(single), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of the 2 devices"):
        imp_soups.retrain_copies(params, masks, devices=jax.devices()[:2],
                                 **{**kw, "copies": 3})


def test_imp_soups_cycles_prune_retrain_and_average():
    params = random_params(9, scale=0.5)
    lines = []
    config = imp_soups.SoupConfig(sparsities=(0.5, 0.75), steps=4, copies=2, merge="greedy",
                                  pretrain_steps=4)
    result = imp_soups.run_imp_soups(params, config, loss_fn=loss_fn, make_optimizer=make_optimizer,
                                     batches=batches, evaluate=lambda p, m: {"loss": held_out(p, m)},
                                     log=lines.append)
    assert [c.sparsity for c in result.cycles] == pytest.approx([0.5, 0.75], abs=0.02)
    assert len(lines) == 3 and "cycle 2 at 75" in lines[-1]
    for c in result.cycles:
        assert len(c.ingredients) == 2 and c.merged == c.greedy
        assert c.greedy["loss"] <= min(i["loss"] for i in c.ingredients) + 1e-7
    # the final soup is exactly as sparse as its mask
    assert masked_sparsity(result.masks) == pytest.approx(0.75, abs=0.02)
    for n in SHAPES:
        pruned = ~np.asarray(result.masks[n]["kernel"])
        assert np.all(np.asarray(result.params[n]["kernel"])[pruned] == 0)


def test_one_copy_is_plain_imp():
    params = random_params(11, scale=0.5)
    config = imp_soups.SoupConfig(sparsities=(0.5,), steps=3, copies=1)
    result = imp_soups.run_imp_soups(params, config, loss_fn=loss_fn, make_optimizer=make_optimizer,
                                     batches=batches, evaluate=lambda p, m: {"loss": held_out(p, m)},
                                     log=None)
    masks = magnitude_masks(params, 0.5)
    trained, _ = imp_soups.retrain_copies(params, masks, loss_fn=loss_fn,
                                          make_optimizer=make_optimizer, batches=batches,
                                          steps=3, copies=1)
    chex.assert_trees_all_close(result.params, imp_soups.unstack(trained, 1)[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsities=(0.75, 0.5)), "must not fall"),
    (dict(sparsities=()), "at least one"),
    (dict(sparsities=(1.0,)), r"sparsities\[0\] must be a sparsity in \[0, 1\)"),
    (dict(copies=0), "copies must be a positive int"),
    (dict(merge="mean"), "merge must be one of"),
    (dict(copies=2, weight_decays=(0.0,)), "one value per copy"),
    (dict(distribution="erk2"), "distribution must be one of"),
])
def test_bad_settings_are_refused_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message):
        imp_soups.SoupConfig(**kwargs)


# --------------------------------------------------------------------------- train.py


def _train_module():
    import pathlib
    import sys
    root = str(pathlib.Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    import train
    return train


def test_train_py_runs_imp_with_soups(tmp_path):
    train = _train_module()
    cfg = train.Config(model="mixer", data="digits", recipe="dense", soup_copies=2,
                       soup_sparsities="0.5,0.8", soup_merge="greedy", steps=8, batch_size=16,
                       warmup_steps=2, mesh="data:1", workdir=str(tmp_path / "run"))
    result = train.train_and_evaluate(cfg)
    assert [c.sparsity for c in result["cycles"]] == pytest.approx([0.5, 0.8], abs=0.01)
    assert np.isfinite(result["eval"]["loss"]) and "accuracy" in result["eval"]
    assert "merge: greedy" in (tmp_path / "run" / "summary.txt").read_text()
    from flax import serialization
    saved = serialization.msgpack_restore((tmp_path / "run" / train.FINAL_PARAMS).read_bytes())
    kernel = np.asarray(saved["params"]["mixer_0"]["channel_mixing"]["up"]["kernel"])
    mask = np.asarray(result["masks"]["params"]["mixer_0"]["channel_mixing"]["up"]["kernel"])
    assert np.all(kernel[~mask] == 0) and np.all(kernel[mask] != 0)


@pytest.mark.parametrize("overrides, message", [
    (dict(recipe="gmp90"), "use --recipe=dense, not --recipe=gmp90"),
    (dict(soup_sparsities="0.5,x"), r"--soup_sparsities='0.5,x': write comma-separated numbers"),
    (dict(soup_sparsities="0.9,0.5"), "--soup_\\* flags: sparsities must not fall"),
    (dict(soup_weight_decays="0.1"), "one value per copy"),
    (dict(optimizer="adam", soup_weight_decays="0.1,0.2"), "--optimizer=adam takes no weight decay"),
    (dict(soup_merge="mean"), "merge must be one of"),
    (dict(soup_copies=-1), "--soup_copies must be >= 0"),
    (dict(outer="diloco"), "runs its own cycles in one process"),
])
def test_train_py_soup_flags_are_checked_in_one_line(tmp_path, overrides, message):
    train = _train_module()
    cfg = train.Config(**{"recipe": "dense", "soup_copies": 2, "workdir": str(tmp_path),
                          **overrides})
    with pytest.raises(ValueError, match=message) as e:
        train.check_config(cfg)
    assert "\n" not in str(e.value)
