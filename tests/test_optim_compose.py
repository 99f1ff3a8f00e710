"""Every transform: jit equals eager, composes with optax wrappers, checkpoints with orbax."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from sparsejax import optim
from sparsejax.layout import WeightLayout


def _params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"a": {"kernel": jax.random.normal(k[0], (8, 6)), "bias": jax.random.normal(k[1], (6,))},
            "b": {"kernel": jax.random.normal(k[2], (16, 5))}}


def _grads(params, t):
    return jax.tree.map(lambda p: jnp.sin(2.0 * p + t) + 0.2, params)


TRANSFORMS = {
    "prox_sgd": lambda: optim.prox_sgd(0.05, optim.sparse_group_lasso(0.1, 0.2, optim.output_channels())),
    "prox_adamw": lambda: optim.prox_adamw(0.05, optim.group_lasso(0.2, optim.input_neurons()),
                                           half_space=optim.HalfSpace(1)),
    "prune": lambda: optim.prune(optax.adam(0.05), optim.gradual(0.6, 0, 1, frequency=1)),
    "set": lambda: optim.sparse_evolutionary_training(optax.adam(0.05), 0.6, end_step=4, update_every=1),
    "rigl": lambda: optim.rigl(optax.adam(0.05), 0.6, end_step=4, update_every=1),
    "srste": lambda: optim.srste(optax.adam(0.05), 2, 4),
    "progressive_nm": lambda: optim.progressive_nm(optax.adam(0.05), 2, 8, decay="stepwise",
                                                   boundaries=[1, 1, 2]),
}


def _run(tx, params, steps, jit):
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    for t in range(steps):
        u, state = update(_grads(params, float(t)), state, params)
        params = optax.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_jit_matches_eager(name):
    params = _params(1)
    eager = _run(TRANSFORMS[name](), params, 2, jit=False)
    jitted = _run(TRANSFORMS[name](), params, 2, jit=True)
    chex.assert_trees_all_close(jitted, eager, atol=1e-5, rtol=1e-5)


def test_composes_with_chain_inject_hyperparams_and_multisteps():
    params = _params(2)
    chained = optax.chain(optax.clip_by_global_norm(1.0),
                          optim.rigl(optax.adam(0.05), 0.75, end_step=6, update_every=2,
                                     distribution="uniform"))
    injected = optax.inject_hyperparams(
        lambda learning_rate: optim.prune(optax.adam(learning_rate), optim.one_shot(0.75)))(
            learning_rate=0.05)
    multi = optax.MultiSteps(optim.prune(optax.adam(0.05), optim.one_shot(0.75)),
                             every_k_schedule=2)
    for tx in (chained, injected, multi):
        p, state = _run(tx, params, 6, jit=True)
        masks = optim.current_masks(state)
        kept = int(masks["b"]["kernel"].sum())
        assert kept == round(0.25 * 80)
        assert bool(jnp.all(p["b"]["kernel"][~masks["b"]["kernel"]] == 0))
        assert masks["a"]["bias"] is None
    # the injected learning rate reaches the inner optimizer
    _, state = _run(injected, params, 1, jit=True)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    u, _ = injected.update(_grads(params, 0.0), state, params)
    masks = optim.current_masks(state)
    np.testing.assert_array_equal(u["b"]["kernel"][masks["b"]["kernel"]], 0.0)


def test_current_masks_errors_without_a_mask_state():
    with pytest.raises(ValueError, match="holds no sparsejax mask state"):
        optim.current_masks(optax.adam(0.1).init(_params()))


@pytest.mark.parametrize("name", ["prune", "rigl", "prox_adamw", "progressive_nm"])
def test_state_survives_an_orbax_save_and_restore(name, tmp_path):
    params = _params(3)
    tx = TRANSFORMS[name]()
    _, state = _run(tx, params, 2, jit=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", state)
    ckpt.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = ckpt.restore(tmp_path / "state", abstract)
    chex.assert_trees_all_equal(restored, state)
    assert type(restored) is type(state)
    update = jax.jit(tx.update)
    u1, s1 = update(_grads(params, 5.0), state, params)
    u2, s2 = update(_grads(params, 5.0), restored, params)
    chex.assert_trees_all_close((u1, s1), (u2, s2))


def test_masks_feed_a_sparsified_function():
    from sparsejax import Prune, sparsify

    def fn(params, x):
        return jnp.tanh(x @ params["a"]["kernel"] + params["a"]["bias"]) @ params["b"]["kernel"][:6]

    params = _params(4)
    x = jax.random.normal(jax.random.PRNGKey(5), (3, 8))
    sfn = sparsify(fn, Prune("a/kernel", sparsity=0.5))
    sparams, sstate = sfn.init(params, x)
    tx = optim.prune(optax.adam(0.01), optim.one_shot(0.75, step=1), layouts=sfn.layouts,
                     initial_masks=sstate["masks"], where=lambda path, _: path == "a/kernel")
    state = tx.init(sparams)
    np.testing.assert_array_equal(optim.current_masks(state)["a"]["kernel"], sstate["masks"]["a"]["kernel"])
    for t in range(2):
        g = jax.grad(lambda p: jnp.sum(sfn(p, {"masks": optim.current_masks(state)}, x) ** 2))(sparams)
        u, state = tx.update(g, state, sparams)
        sparams = optax.apply_updates(sparams, u)
    masks = optim.current_masks(state)
    assert int(masks["a"]["kernel"].sum()) == 12
    assert masks["b"]["kernel"] is None
    dense = jax.tree.map(lambda p, m: p if m is None else p * m, sparams, masks)
    np.testing.assert_allclose(sfn(sparams, {"masks": masks}, x), fn(dense, x), rtol=1e-5, atol=1e-6)


def test_layouts_and_where_select_the_masked_leaves():
    params = {"scan": jnp.ones((2, 3, 4)), "w": jnp.ones((3, 4)), "b": jnp.ones(4)}
    lays = optim.mask_layouts(params, {"scan": WeightLayout((2, 3, 4), (0,), (1,), (2,)),
                                       "w": None, "b": None},
                              where=lambda path, leaf: path != "w")
    assert lays["scan"].stack_axes == (0,) and lays["w"] is None and lays["b"] is None
    with pytest.raises(ValueError, match="layouts\\[w\\]: layout shape"):
        optim.mask_layouts(params, {"scan": None, "w": WeightLayout.default((4, 4)), "b": None})


def test_forward_masks_hands_over_from_the_one_owner():
    params = _params(6)
    fixed = {"a": {"kernel": jnp.asarray(np.random.default_rng(0).random((8, 6)) < 0.5),
                   "bias": None}, "b": {"kernel": None}}
    sstate = {"masks": fixed}
    # no transform owns masks: sparsify's fixed masks, the same arrays
    plain = optax.adam(0.1).init(params)
    assert not optim.owns_masks(plain)
    assert optim.forward_masks(sstate, plain) is fixed
    # a pruning transform owns them (inside a chain): its moving masks, not sstate's stale copy
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optim.prune(optax.adam(0.05), optim.one_shot(0.75, step=0)))
    state = tx.init(params)
    _, state = tx.update(_grads(params, 0.0), state, params)
    assert optim.owns_masks(state)
    moved = jax.jit(optim.forward_masks)(sstate, state)
    chex.assert_trees_all_equal(moved, optim.current_masks(state))
    assert float(optim.masked_sparsity(moved)) == pytest.approx(0.75, abs=0.02)
    # the N:M transform's soft masks at its current strength: 1 kept, strength where pruned
    pgf = optim.progressive_nm(optax.adam(0.05), 2, 8, decay="linear", begin_step=0, end_step=4)
    state = pgf.init(params)
    _, state = pgf.update(_grads(params, 0.0), state, params)
    strength = float(optim.current_mask_strength(state))
    assert 0.0 < strength < 1.0
    hard = optim.current_masks(state)["b"]["kernel"]
    soft = optim.forward_masks(sstate, state)["b"]["kernel"]
    np.testing.assert_allclose(soft, np.where(hard, 1.0, strength), rtol=1e-6)
    # two owners would be ambiguous
    with pytest.raises(ValueError, match="2 mask states"):
        optim.forward_masks(sstate, (state, state))
