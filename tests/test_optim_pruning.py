"""Pruning schedules, allocation, scores, rewinding; pruned weights stay zero."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import masks as mask_math
from sparsejax import optim
from sparsejax.layout import WeightLayout


def _params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return {"Dense_0": {"kernel": jax.random.normal(k[0], (9, 13)), "bias": jax.random.normal(k[1], (13,))},
            "Dense_1": {"kernel": jax.random.normal(k[2], (13, 7))},
            "scan": {"kernel": jax.random.normal(k[3], (3, 5, 6))}}


def _layouts(params):
    """Flax defaults, except the scanned kernel: 3 stacked (5, 6) matrices."""
    lays = jax.tree.map(lambda _: None, params)
    lays["scan"]["kernel"] = WeightLayout((3, 5, 6), (0,), (1,), (2,))
    return lays


def _grad_fn(params, t):
    return jax.tree.map(lambda p: jnp.sin(3.0 * p + t) + 0.3, params)


def _train(tx, params, steps, state=None, start=0):
    state = tx.init(params) if state is None else state

    @jax.jit
    def step(p, s, t):
        u, s = tx.update(_grad_fn(p, t), s, p)
        return optax.apply_updates(p, u), s, s

    for t in range(start, start + steps):
        params, state, _ = step(params, state, t)
    return params, state


def test_gradual_schedule_follows_the_cubic_formula():
    s = optim.gradual(0.9, begin_step=10, end_step=110, frequency=20, initial_sparsity=0.2)
    for t in [10, 30, 57, 90, 110, 500]:
        progress = min(max((t - 10) / 100, 0), 1)
        np.testing.assert_allclose(s.sparsity(t), 0.9 + (0.2 - 0.9) * (1 - progress) ** 3, rtol=1e-6)
    updates = [t for t in range(0, 200) if bool(s.is_update(t))]
    assert updates == [10, 30, 50, 70, 90, 110]
    odd = optim.gradual(0.5, 0, 25, frequency=10)
    assert [t for t in range(40) if bool(odd.is_update(t))] == [0, 10, 20, 25]


def test_iterative_schedule_prunes_a_constant_fraction_per_round():
    s = optim.iterative(0.875, rounds=3, round_length=10, begin_step=5)
    np.testing.assert_allclose([s.sparsity(t) for t in (5, 15, 25, 35, 99)],
                               [0.0, 0.5, 0.75, 0.875, 0.875], rtol=1e-6)
    assert [t for t in range(60) if bool(s.is_update(t))] == [15, 25, 35]


@pytest.mark.parametrize("distribution", ["uniform", "global"])
def test_gmp_reaches_the_target_exactly_and_pruned_weights_stay_zero(distribution):
    params = _params(1)
    tx = optim.prune(optax.adam(0.05), optim.gradual(0.8, 0, 30, frequency=10),
                     distribution=distribution, min_kept=3, layouts=_layouts(params))
    params, state = _train(tx, params, 31)
    masks = optim.current_masks(state)
    assert masks["Dense_0"]["bias"] is None
    sizes = {"Dense_0": 9 * 13, "Dense_1": 13 * 7, "scan": 3 * 30}
    zeros = {k: int(jnp.sum(~masks[k]["kernel"])) for k in sizes}
    if distribution == "uniform":
        assert zeros["Dense_0"] == 117 - round(0.2 * 117)
        assert zeros["Dense_1"] == 91 - round(0.2 * 91)
        per_layer = jnp.sum(masks["scan"]["kernel"], axis=(1, 2))
        np.testing.assert_array_equal(per_layer, [round(0.2 * 30)] * 3)  # per stacked matrix
    else:
        assert sum(zeros.values()) == sum(sizes.values()) - round(0.2 * sum(sizes.values()))
    pruned_at_end = jax.tree.map(lambda m: ~m, masks)
    # keep training: pruned weights stay exactly zero, and so do their Adam moments
    params, tx_state = _train(tx, params, 50, state=state, start=31)
    for k in sizes:
        assert bool(jnp.all(params[k]["kernel"][pruned_at_end[k]["kernel"]] == 0))
        adam = tx_state.inner_state[0]
        assert bool(jnp.all(adam.mu[k]["kernel"][pruned_at_end[k]["kernel"]] == 0))
        assert bool(jnp.all(adam.nu[k]["kernel"][pruned_at_end[k]["kernel"]] == 0))
    assert float(jnp.abs(params["Dense_0"]["bias"]).min()) > 0


def test_global_keeps_a_minimum_per_layer():
    params = _params(2)
    params["Dense_1"]["kernel"] = params["Dense_1"]["kernel"] * 1e-4  # would collapse under global
    tx = optim.prune(None, optim.one_shot(0.7), distribution="global", min_kept=5)
    _, state = _train(tx, params, 1)
    masks = optim.current_masks(state)
    assert int(masks["Dense_1"]["kernel"].sum()) == 5
    top5 = mask_math.topk_mask(jnp.abs(params["Dense_1"]["kernel"]).reshape(-1), 5)
    np.testing.assert_array_equal(masks["Dense_1"]["kernel"].reshape(-1), top5)


def test_erk_densities_scale_with_the_erk_ratio_and_meet_the_target():
    lays = [optim.mask_layouts({"k": jnp.zeros(s)})["k"] for s in [(64, 300), (300, 100), (100, 10)]]
    sparsities = np.array([float(s) for s in optim.layer_sparsities(lays, 0.9, "erk")])
    ratios = optim.erk_ratios(lays)
    sizes = np.array([64 * 300, 300 * 100, 100 * 10])
    density = 1 - sparsities
    dense_ones = density > 1 - 1e-6
    scaled = density[~dense_ones] / ratios[~dense_ones]
    np.testing.assert_allclose(scaled, scaled[0], rtol=1e-4)
    np.testing.assert_allclose(np.sum(density * sizes), 0.1 * sizes.sum(), rtol=1e-4)
    assert density[2] > density[1] and density[2] > density[0]


def test_saliency_and_movement_scores():
    params = _params(3)
    g = _grad_fn(params, 0.0)
    tx = optim.prune(optax.sgd(0.0), optim.one_shot(0.6), score="saliency")
    _, state = tx.update(g, tx.init(params), params)
    expected = mask_math.unstructured_mask(jnp.abs(params["Dense_1"]["kernel"] * g["Dense_1"]["kernel"]), 0.6)
    np.testing.assert_array_equal(optim.current_masks(state)["Dense_1"]["kernel"], expected)

    tx = optim.prune(optax.sgd(0.0), optim.one_shot(0.6, step=2), score="movement")
    state = tx.init(params)
    acc = 0.0
    for t in range(3):
        gt = _grad_fn(params, float(t))
        acc = acc - params["Dense_1"]["kernel"] * gt["Dense_1"]["kernel"]
        _, state = jax.jit(tx.update)(gt, state, params)
    np.testing.assert_array_equal(optim.current_masks(state)["Dense_1"]["kernel"],
                                  mask_math.unstructured_mask(acc, 0.6))


def test_random_score_and_straight_through_training():
    params = _params(4)
    tx = optim.prune(optax.sgd(0.1), optim.one_shot(0.75), score="random", zero_pruned=False)
    params, state = _train(tx, params, 20)
    masks = optim.current_masks(state)
    assert int((~masks["Dense_1"]["kernel"]).sum()) == 91 - round(0.25 * 91)
    # straight-through: pruned dense weights keep their values and keep training
    assert float(jnp.abs(params["Dense_1"]["kernel"][~masks["Dense_1"]["kernel"]]).min()) > 0


def test_iterative_pruning_rewinds_survivors_to_the_saved_weights():
    params = _params(5)
    tx = optim.prune(optax.adam(0.05), optim.iterative(0.75, rounds=2, round_length=4),
                     rewind_step=1)
    state = tx.init(params)
    step = jax.jit(lambda p, s, t: tx.update(_grad_fn(p, t), s, p))
    saved = None
    for t in range(5):
        if t == 1:
            saved = params
        u, state = step(params, state, t)
        params = optax.apply_updates(params, u)
    masks = optim.current_masks(state)  # round 1 ended at step 4: 50% pruned, survivors rewound
    for k in ("Dense_0", "Dense_1", "scan"):
        m = masks[k]["kernel"]
        np.testing.assert_allclose(params[k]["kernel"][m], saved[k]["kernel"][m], rtol=1e-6)
        assert bool(jnp.all(params[k]["kernel"][~m] == 0))
    assert int(state.inner_state[0].count) == 0  # the optimizer restarted


def test_bad_schedules_and_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="final_sparsity must be a sparsity in \\[0, 1\\)"):
        optim.gradual(1.0, 0, 10)
    with pytest.raises(ValueError, match="initial_sparsity"):
        optim.gradual(0.5, 0, 10, initial_sparsity=-0.1)
    with pytest.raises(ValueError, match="ends before it begins: end_step=5 < begin_step=10"):
        optim.gradual(0.5, 10, 5)
    with pytest.raises(ValueError, match="sparsity"):
        optim.one_shot(1.5)
    with pytest.raises(ValueError, match="score must be one of"):
        optim.prune(None, optim.one_shot(0.5), score="fisher")
    with pytest.raises(ValueError, match="distribution must be one of"):
        optim.prune(None, optim.one_shot(0.5), distribution="random")
    with pytest.raises(ValueError, match="initial_masks\\[Dense_1/kernel\\]: shape"):
        params = _params()
        bad = jax.tree.map(lambda p: None, params)
        bad["Dense_1"]["kernel"] = jnp.ones((2, 2), bool)
        optim.prune(None, optim.one_shot(0.5), initial_masks=bad).init(params)


def test_inner_comes_first_and_the_old_order_still_prunes_the_same():
    params = _params(3)
    grads = _grad_fn(params, 0.5)
    new = optim.prune(optax.sgd(0.1), optim.one_shot(0.6), score="saliency")
    with pytest.warns(DeprecationWarning, match=r"prune\(inner, schedule\)"):
        old = optim.prune(optim.one_shot(0.6), optax.sgd(0.1), score="saliency")
    runs = []
    for tx in (new, old):
        u, state = tx.update(grads, tx.init(params), params)
        runs.append((u, optim.current_masks(state)))
    chex.assert_trees_all_equal(runs[0], runs[1])
    assert float(optim.masked_sparsity(runs[0][1])) == pytest.approx(0.6, abs=0.02)
    with pytest.raises(TypeError, match=r"call prune\(inner, schedule\)"):
        optim.prune(optax.sgd(0.1))          # no schedule
    assert set(optim.SCORES) == {"magnitude", "random", "saliency", "movement"}
