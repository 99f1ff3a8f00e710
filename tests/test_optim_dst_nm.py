"""SET / RigL topology moves, and N:M training (SR-STE, progressive gradient flow)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import masks as mask_math
from sparsejax import optim


def _params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"a": {"kernel": jax.random.normal(k[0], (11, 6)), "bias": jax.random.normal(k[1], (6,))},
            "b": {"kernel": jax.random.normal(k[2], (16, 5))}}


def test_cosine_drop_fraction_formula():
    f = optim.cosine_drop_fraction(0.3, 100)
    for t in [0, 10, 50, 99]:
        # float32: absolute resolution near 0.3 is ~3e-8
        np.testing.assert_allclose(f(t), 0.15 * (1 + np.cos(np.pi * t / 100)), rtol=1e-6, atol=1e-7)
    assert float(f(100)) == 0.0 and float(f(150)) == 0.0


def test_rigl_drops_smallest_and_regrows_where_the_gradient_is_largest():
    params = _params(1)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(7), p.shape), params)
    tx = optim.rigl(optax.adam(0.0), 0.7, end_step=100, update_every=1, drop_fraction=0.4,
                    distribution="uniform")
    state = tx.init(params)
    params = optim.apply_masks(params, optim.current_masks(state))
    old = optim.current_masks(state)
    state = state._replace(step=jnp.asarray(1, jnp.int32))  # an update step
    # give the moments something to reset
    state = state._replace(inner_state=jax.tree.map(lambda x: x + 1.0 if x.dtype == jnp.float32
                                                     and x.ndim else x, state.inner_state))
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    new = optim.current_masks(new_state)
    frac = float(optim.cosine_drop_fraction(0.4, 100)(1))
    for k in ("a", "b"):
        m0, m1 = old[k]["kernel"], new[k]["kernel"]
        w, g = params[k]["kernel"], grads[k]["kernel"]
        n_active = int(m0.sum())
        n_drop = int(round(frac * n_active))
        assert n_drop > 0 and int(m1.sum()) == n_active
        keep = mask_math.topk_mask(jnp.where(m0, jnp.abs(w), -jnp.inf).reshape(-1),
                                   n_active - n_drop).reshape(m0.shape)
        grow = mask_math.topk_mask(jnp.where(keep, -jnp.inf, jnp.abs(g)).reshape(-1),
                                   n_drop).reshape(m0.shape)
        np.testing.assert_array_equal(m1, keep | grow)
        # every grown weight had a larger |g| than every inactive one left out
        assert float(jnp.abs(g)[grow].min()) >= float(jnp.abs(g)[~m1].max())
        newly = m1 & ~m0
        assert bool(newly.any())
        new_w = optax.apply_updates(params, updates)[k]["kernel"]
        assert bool(jnp.all(new_w[newly] == 0)) and bool(jnp.all(new_w[~m1] == 0))
        adam = new_state.inner_state[0]
        assert bool(jnp.all(adam.mu[k]["kernel"][newly] == 0))
        assert bool(jnp.all(adam.nu[k]["kernel"][~m1] == 0))
        # the published SET/RigL: every moment of a grown weight restarts at 0 (the moments
        # were all made nonzero above)
        nu = adam.nu[k]["kernel"]
        assert bool(jnp.all(nu[newly] == 0)) and bool(jnp.all(nu[m1 & ~newly] != 0))


ADAM_LIKE = {
    "adam": lambda lr: optax.adam(lr),
    # train.py's optimizer: AdamW behind a gradient clip
    "clip_adamw": lambda lr: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr)),
    "injected_adamw": lambda lr: optax.inject_hyperparams(optax.adamw)(learning_rate=lr),
}


@pytest.mark.parametrize("name", sorted(ADAM_LIKE))
def test_grown_weights_restart_adam_moments_at_zero(name):
    # As the published SET/RigL (and JaxPruner): a grown weight starts at 0 with mu = nu = 0,
    # wherever Adam sits in the optimizer chain; active weights keep their moments.
    lr, warm = 1e-3, 20
    params = _params(9)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(5), p.shape), params)
    tx = optim.rigl(ADAM_LIKE[name](lr), 0.8, end_step=2 * warm, update_every=warm,
                    distribution="uniform")
    state = tx.init(params)
    params = optim.apply_masks(params, optim.current_masks(state))
    step = jax.jit(lambda p, s: tx.update(grads, s, p))
    for _ in range(warm + 1):  # the last step moves the topology
        before = optim.current_masks(state)
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    masks = optim.current_masks(state)
    adam = [s for s in jax.tree.leaves(state.inner_state, is_leaf=lambda x: hasattr(x, "nu"))
            if hasattr(s, "nu")]
    assert len(adam) == 1
    for k in ("a", "b"):
        m0, m1 = before[k]["kernel"], masks[k]["kernel"]
        newly = m1 & ~m0
        assert bool(newly.any())
        assert bool(jnp.all(params[k]["kernel"][newly] == 0))
        nu, mu = adam[0].nu[k]["kernel"], adam[0].mu[k]["kernel"]
        assert bool(jnp.all(nu[newly] == 0)) and bool(jnp.all(mu[newly] == 0))
        assert bool(jnp.all(nu[m1 & ~newly] > 0))


def test_grown_weights_restart_sgd_momentum_at_zero():
    params = _params(10)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(6), p.shape), params)
    tx = optim.rigl(optax.sgd(0.0, momentum=0.9), 0.7, end_step=10, update_every=1,
                    distribution="uniform", zero_pruned=False)
    state = tx.init(params)._replace(step=jnp.asarray(1, jnp.int32))
    _, state = tx.update(grads, state, params)  # momentum at every weight (zero_pruned=False)
    old = optim.current_masks(state)
    _, new_state = tx.update(grads, state, params)
    trace = new_state.inner_state[0].trace
    for k in ("a", "b"):
        newly = new_state.masks[k]["kernel"] & ~old[k]["kernel"]
        assert bool(newly.any())
        assert bool(jnp.all(trace[k]["kernel"][newly] == 0))
        assert bool(jnp.all(trace[k]["kernel"][~newly] != 0))


def test_dense_grads_extra_argument_drives_growth():
    params = _params(2)
    grads = jax.tree.map(jnp.ones_like, params)
    dense = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(3), p.shape), params)
    tx = optim.rigl(optax.sgd(0.0), 0.5, end_step=10, update_every=1, distribution="uniform")
    state = tx.init(params)._replace(step=jnp.asarray(1, jnp.int32))
    _, s_dense = tx.update(grads, state, params, dense_grads=dense)
    _, s_plain = tx.update(grads, state, params)
    m0 = state.masks["b"]["kernel"]
    grown = s_dense.masks["b"]["kernel"] & ~m0
    inactive_left = ~s_dense.masks["b"]["kernel"]
    assert float(jnp.abs(dense["b"]["kernel"])[grown].min()) >= \
        float(jnp.abs(dense["b"]["kernel"])[inactive_left & ~m0].max())
    assert not bool(jnp.all(s_dense.masks["b"]["kernel"] == s_plain.masks["b"]["kernel"]))


def test_set_keeps_sparsity_and_zeros_through_many_moves():
    params = _params(4)
    tx = optim.sparse_evolutionary_training(optax.adam(0.05), 0.8, end_step=40, update_every=5)
    state = tx.init(params)
    step = jax.jit(lambda p, s, t: tx.update(jax.tree.map(lambda x: jnp.cos(x + t), p), s, p))
    first = optim.current_masks(state)
    for t in range(45):
        u, state = step(params, state, t)
        params = optax.apply_updates(params, u)
        masks = optim.current_masks(state)
        for k in ("a", "b"):
            assert bool(jnp.all(params[k]["kernel"][~masks[k]["kernel"]] == 0))
    counts = {k: int(first[k]["kernel"].sum()) for k in ("a", "b")}
    assert {k: int(masks[k]["kernel"].sum()) for k in ("a", "b")} == counts
    assert not bool(jnp.all(first["b"]["kernel"] == masks["b"]["kernel"]))  # the topology moved
    assert masks["a"]["bias"] is None


def test_random_masks_meet_erk_sparsity():
    params = _params(5)
    masks = optim.random_masks(params, 0.75, distribution="erk", seed=3)
    total = sum(int(m.size) for m in jax.tree.leaves(masks))
    kept = sum(int(m.sum()) for m in jax.tree.leaves(masks))
    assert abs(kept - 0.25 * total) <= 2  # per-layer rounding only
    with pytest.raises(ValueError, match="sparsity must be a sparsity in \\[0, 1\\)"):
        optim.rigl(None, 1.0, end_step=10)


def test_srste_adds_the_decay_term_and_keeps_n_of_m():
    params = _params(6)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(8), p.shape), params)
    lr, lam = 0.1, 0.05
    tx = optim.srste(optax.sgd(lr), 2, 4, decay=lam, where=lambda path, _: path == "b/kernel")
    state = tx.init(params)
    m = optim.current_masks(state)["b"]["kernel"]
    np.testing.assert_array_equal(m, mask_math.nm_mask(jnp.abs(params["b"]["kernel"]), 2, 4))
    updates, state = jax.jit(tx.update)(grads, state, params)
    w = params["b"]["kernel"]
    expected = -lr * (grads["b"]["kernel"] + lam * jnp.where(m, 0.0, w))
    np.testing.assert_allclose(updates["b"]["kernel"], expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(updates["a"]["kernel"], -lr * grads["a"]["kernel"], rtol=1e-6)
    new_w = w + updates["b"]["kernel"]
    new_m = optim.current_masks(state)["b"]["kernel"]
    np.testing.assert_array_equal(new_m, mask_math.nm_mask(jnp.abs(new_w), 2, 4))
    np.testing.assert_array_equal(new_m.reshape(4, 4, 5).sum(1), 2)


def test_progressive_nm_strength_and_stepwise_patterns():
    params = {"w": jax.random.normal(jax.random.PRNGKey(9), (16, 3))}
    lin = optim.progressive_nm(optax.sgd(0.01), 2, 8, decay="linear", begin_step=2, end_step=6)
    exp = optim.progressive_nm(optax.sgd(0.01), 2, 8, decay="exponential", begin_step=0,
                               end_step=8, rate=3.0)
    for tx, formula in [(lin, lambda t: np.clip(1 - (t - 2) / 4, 0, 1)),
                        (exp, lambda t: 0.0 if t >= 8 else np.exp(-3.0 * t / 8))]:
        state, p = tx.init(params), params
        for t in range(1, 10):
            u, state = jax.jit(tx.update)(jax.tree.map(jnp.sin, p), state, p)
            p = optax.apply_updates(p, u)
            np.testing.assert_allclose(optim.current_mask_strength(state), formula(t), rtol=1e-5,
                                       atol=1e-7)
        m = optim.current_masks(state)["w"]
        np.testing.assert_array_equal(m.reshape(2, 8, 3).sum(1), 2)
    soft = optim.soft_mask_params(params, {"w": m}, 0.25)
    np.testing.assert_allclose(soft["w"], params["w"] * jnp.where(m, 1.0, 0.25), rtol=1e-6)

    step = optim.progressive_nm(optax.sgd(0.01), 2, 8, decay="stepwise", boundaries=[3, 5, 7])
    state, p, kept = step.init(params), params, []
    for t in range(1, 9):
        u, state = jax.jit(step.update)(jax.tree.map(jnp.cos, p), state, p)
        p = optax.apply_updates(p, u)
        kept.append(int(optim.current_masks(state)["w"].reshape(2, 8, 3).sum(1).max()))
    assert kept == [8, 8, 7, 7, 4, 4, 2, 2]  # dense -> 7:8 -> 4:8 -> 2:8


def test_nm_errors_name_the_parameter():
    params = {"w": jnp.ones((10, 3)) * 0.5}
    with pytest.raises(ValueError, match="w has reduction size K=10.*m=4"):
        optim.srste(None, 2, 4).init(params)
    with pytest.raises(ValueError, match="needs 0 < n <= m"):
        optim.srste(None, 5, 4)
    with pytest.raises(ValueError, match="boundaries needs 3"):
        optim.progressive_nm(None, 2, 8, decay="stepwise", boundaries=[1, 2])
