"""Proximal optimizers: each prox against brute-force minimisation of its objective."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import optim


def _brute_group(z, d, ids, tau, l1=None, steps=30_000):
    """Minimises 1/2 sum d (x-z)^2 + sum_g tau_g ||x_g|| (+ l1 ||x||_1) by plain gradient descent.

    Smoothed norms, and a step size decaying geometrically by 1e4 so the iterates
    of groups (and entries) that vanish settle on zero instead of oscillating.
    """
    ng = len(tau)
    z, d, tau = (jnp.asarray(a, jnp.float32) for a in (z, d, tau))
    ids = jnp.asarray(ids)
    lr0 = 0.2 / float(d.max())
    decay = 1e-4 ** (1.0 / steps)

    def body(t, x):
        norms = jnp.sqrt(jax.ops.segment_sum(x * x, ids, ng) + 1e-20)
        grad = d * (x - z) + tau[ids] * x / norms[ids]
        if l1 is not None:
            grad += l1 * x / jnp.sqrt(x * x + 1e-20)
        return x - lr0 * decay ** t * grad

    return np.asarray(jax.jit(lambda z: jax.lax.fori_loop(0, steps, body, z))(z), np.float64)


def _objective(x, z, d, ids, tau, l1=None):
    norms = np.sqrt(np.bincount(ids, x * x, minlength=len(tau)))
    value = 0.5 * np.sum(d * (x - z) ** 2) + np.sum(tau * norms)
    if l1 is not None:
        value += np.sum(l1 * np.abs(x))
    return value


def test_soft_threshold_matches_grid_minimisation():
    rng = np.random.default_rng(1)
    z = rng.normal(size=9) * 2
    tau = rng.uniform(0.1, 1.5, size=9)
    grid = np.linspace(-6, 6, 240001)
    brute = np.array([grid[np.argmin(0.5 * (grid - zi) ** 2 + ti * np.abs(grid))]
                      for zi, ti in zip(z, tau)])
    ours = np.asarray(optim.soft_threshold(jnp.asarray(z, jnp.float32), jnp.asarray(tau, jnp.float32)))
    np.testing.assert_allclose(ours, brute, atol=1e-4)


@pytest.mark.parametrize("preconditioned", [False, True])
def test_group_prox_minimises_its_objective(preconditioned):
    rng = np.random.default_rng(2 + preconditioned)
    ids = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3])
    z = rng.normal(size=ids.size)
    d = rng.uniform(0.2, 3.0, size=ids.size) if preconditioned else np.ones(ids.size)
    tau = np.array([0.4, 2.5, 0.9, 0.3])  # group 1 is small enough to vanish
    x = np.asarray(optim.group_prox(jnp.asarray(z), jnp.asarray(ids), 4, jnp.asarray(tau),
                                    jnp.asarray(d) if preconditioned else None), np.float64)
    brute = _brute_group(z, d, ids, tau)
    np.testing.assert_allclose(x, brute, atol=2e-4)
    assert _objective(x, z, d, ids, tau) <= _objective(brute, z, d, ids, tau) + 1e-6
    # a group is exactly zero iff ||D z_g|| <= tau_g
    dz_norm = np.sqrt(np.bincount(ids, (d * z) ** 2))
    for g in range(4):
        assert (np.all(x[ids == g] == 0)) == (dz_norm[g] <= tau[g])


def test_sparse_group_prox_is_l1_then_group_in_the_metric():
    rng = np.random.default_rng(4)
    ids = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    z = rng.normal(size=ids.size) * 1.5
    d = rng.uniform(0.3, 2.0, size=ids.size)
    tau, lam1 = np.array([0.5, 0.8, 0.2]), 0.3
    y = optim.soft_threshold(jnp.asarray(z), jnp.asarray(lam1 / d))
    x = np.asarray(optim.group_prox(y, jnp.asarray(ids), 3, jnp.asarray(tau), jnp.asarray(d)),
                   np.float64)
    brute = _brute_group(z, d, ids, tau, l1=lam1)
    assert _objective(x, z, d, ids, tau, lam1) <= _objective(brute, z, d, ids, tau, lam1) + 1e-6
    np.testing.assert_allclose(x, brute, atol=5e-4)


def _params(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"Dense_0": {"kernel": jax.random.normal(k[0], (5, 7)), "bias": jax.random.normal(k[1], (7,))},
            "Dense_1": {"kernel": jax.random.normal(k[2], (7, 3))}}


def _grads(params, seed=1):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return jax.tree.map(lambda p, k: jax.random.normal(k, p.shape), params,
                        jax.tree.unflatten(jax.tree.structure(params), list(keys)))


def test_prox_sgd_l1_step_is_soft_threshold_of_sgd_step():
    params, grads = _params(), _grads(_params())
    lr, lam = 0.1, 0.7
    tx = optim.prox_sgd(lr, optim.l1(lam))
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    for name in ("Dense_0", "Dense_1"):
        z = params[name]["kernel"] - lr * grads[name]["kernel"]
        expected = jnp.sign(z) * jnp.maximum(jnp.abs(z) - lr * lam, 0)
        chex.assert_trees_all_close(new[name]["kernel"], expected, atol=1e-6)
    # biases (ndim 1) are not regularised: plain SGD
    chex.assert_trees_all_close(new["Dense_0"]["bias"],
                                params["Dense_0"]["bias"] - lr * grads["Dense_0"]["bias"], atol=1e-6)


def test_prox_adamw_uses_the_preconditioner():
    params, grads = _params(2), _grads(_params(2), 3)
    lr, lam, wd = 0.05, 0.4, 0.01
    groups = optim.output_channels("Dense_1/kernel")
    reg = optim.sparse_group_lasso(lam, 2.0, groups)
    tx = optim.prox_adamw(lr, reg, weight_decay=wd)
    state = tx.init(params)
    step = jax.jit(tx.update)
    updates, state = step(grads, state, params)
    p1 = optax.apply_updates(params, updates)
    grads2 = _grads(params, 5)
    updates, state = step(grads2, state, p1)
    p2 = optax.apply_updates(p1, updates)
    # replay the second step by hand for Dense_1/kernel: Adam moments, z, then the D-metric prox
    b1, b2, eps = 0.9, 0.999, 1e-8
    g1, g2 = grads["Dense_1"]["kernel"], grads2["Dense_1"]["kernel"]
    m = (1 - b1) * (b1 * g1 + g2)
    v = (1 - b2) * (b2 * g1 ** 2 + g2 ** 2)
    d = np.sqrt(np.asarray(v) / (1 - b2 ** 2)) + eps
    w = np.asarray(p1["Dense_1"]["kernel"], np.float64)
    z = w - lr * (np.asarray(m) / (1 - b1 ** 2) / d + wd * w)
    ids = np.broadcast_to(np.arange(3), (7, 3)).ravel()
    tau = lr * 2.0 * np.sqrt(7) * np.ones(3)
    brute = _brute_group(z.ravel(), d.ravel(), ids, tau, l1=lr * lam)
    ours = np.asarray(p2["Dense_1"]["kernel"], np.float64).ravel()
    assert _objective(ours, z.ravel(), d.ravel(), ids, tau, lr * lam) <= \
        _objective(brute, z.ravel(), d.ravel(), ids, tau, lr * lam) + 1e-6
    np.testing.assert_allclose(ours, brute, atol=5e-4)
    # the scalar-lr shortcut (identity metric) gives a different point here
    euclid = np.asarray(optim.group_prox(optim.soft_threshold(jnp.asarray(z.ravel()), lr * lam),
                                         jnp.asarray(ids), 3, jnp.asarray(tau)))
    assert np.max(np.abs(euclid - ours)) > 1e-3


def test_group_lasso_over_several_parameters_zeroes_whole_neurons_and_shrinks():
    params = _params(7)
    neuron = optim.channels(("Dense_0/kernel", -1), ("Dense_0/bias", -1), ("Dense_1/kernel", -2))
    tx = optim.prox_sgd(0.1, optim.group_lasso(0.05, neuron))
    state = tx.init(params)

    def loss(p, x):
        h = jax.nn.relu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return h @ p["Dense_1"]["kernel"]

    x = jax.random.normal(jax.random.PRNGKey(9), (16, 5))
    target = jax.random.normal(jax.random.PRNGKey(10), (16, 3))

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda p: jnp.mean((loss(p, x) - target) ** 2))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(200):
        params, state = step(params, state)
    k0, b0, k1 = params["Dense_0"]["kernel"], params["Dense_0"]["bias"], params["Dense_1"]["kernel"]
    dead = (jnp.abs(k0).sum(0) == 0) & (b0 == 0) & (jnp.abs(k1).sum(1) == 0)
    partial = ((jnp.abs(k0).sum(0) == 0) | (b0 == 0) | (jnp.abs(k1).sum(1) == 0)) & ~dead
    assert 1 <= int(dead.sum()) < 7 and not bool(partial.any())
    small, kept = optim.remove_zero_groups(params, neuron)
    n_alive = 7 - int(dead.sum())
    assert small["Dense_0"]["kernel"].shape == (5, n_alive)
    assert small["Dense_0"]["bias"].shape == (n_alive,)
    assert small["Dense_1"]["kernel"].shape == (n_alive, 3)
    assert list(kept.values()) == [n_alive]
    np.testing.assert_allclose(loss(small, x), loss(params, x), atol=1e-5)


def test_half_space_step_reaches_exact_group_zeros():
    w = {"k": jnp.array([[1.0, 0.4], [1.0, -0.3], [0.3, 0.2]])}  # groups = columns (output channels)
    g = {"k": jnp.array([[15.0, 0.1], [15.0, 0.2], [5.0, -0.3]])}  # column 0 is pushed through zero
    reg = optim.group_lasso(0.05, optim.output_channels("k"))
    plain = optim.prox_sgd(0.1, reg)
    hspg = optim.prox_sgd(0.1, reg, half_space=optim.HalfSpace(start_step=0))
    up, _ = plain.update(g, plain.init(w), w)
    uh, _ = hspg.update(g, hspg.init(w), w)
    wp, wh = optax.apply_updates(w, up)["k"], optax.apply_updates(w, uh)["k"]
    assert np.all(np.abs(wp[:, 0]) > 0)  # the prox overshoots to the other side
    np.testing.assert_array_equal(wh[:, 0], 0.0)  # the half-space step lands on zero
    # column 1 stays in its half-space: trial point z - lr*lam*sqrt(3)*w/||w||
    z = w["k"][:, 1] - 0.1 * g["k"][:, 1]
    trial = z - 0.1 * 0.05 * np.sqrt(3) * w["k"][:, 1] / jnp.linalg.norm(w["k"][:, 1])
    np.testing.assert_allclose(wh[:, 1], trial, atol=1e-6)
    # zero groups stay zero on later steps
    uh2, _ = hspg.update(g, hspg.init(w), {"k": wh})
    np.testing.assert_array_equal(optax.apply_updates({"k": wh}, uh2)["k"][:, 0], 0.0)


def test_group_kinds_resolve_over_flax_layouts():
    params = {"query": {"kernel": np.zeros((8, 2, 4))}, "key": {"kernel": np.zeros((8, 2, 4))},
              "value": {"kernel": np.zeros((8, 2, 4))}, "out": {"kernel": np.zeros((2, 4, 8))},
              "conv": {"kernel": np.zeros((3, 3, 4, 6))}}
    heads = optim.attention_heads("query/kernel", "key/kernel", "value/kernel", "out/kernel")
    index = optim.resolve_groups([heads, optim.input_neurons("conv/kernel")], params)
    assert index.num_groups == 2 + 4
    np.testing.assert_array_equal(index.sizes, [32 * 4] * 2 + [3 * 3 * 6] * 4)
    leaves = dict(zip(["conv", "key", "out", "query", "value"], index.ids))
    assert np.all(leaves["out"][1] == 1) and np.all(leaves["query"][:, 0, :] == 0)
    blocks = optim.resolve_groups(optim.blocks("conv/kernel", (4, 3)), params)
    assert blocks.num_groups == (36 // 4) * (6 // 3)
    nm = optim.resolve_groups(optim.nm_groups("conv/kernel", 4), params)
    assert nm.num_groups == (36 // 4) * 6 and np.all(nm.sizes == 4)


def test_bad_group_specs_and_weights_name_the_parameter():
    params = {"a": {"kernel": np.zeros((6, 4))}, "b": {"kernel": np.zeros((5, 3))}}
    with pytest.raises(ValueError, match="b/kernel.*5 channels"):
        optim.resolve_groups(optim.channels(("a/kernel", 0), ("b/kernel", 0)), params)
    with pytest.raises(ValueError, match="b/kernel"):
        optim.resolve_groups(optim.blocks("b/kernel", (2, 2)), params)
    with pytest.raises(ValueError, match="m=4 does not divide parameter a/kernel"):
        optim.resolve_groups(optim.nm_groups("*/kernel", 4), params)
    with pytest.raises(ValueError, match="matches no parameter"):
        optim.resolve_groups(optim.output_channels("c/kernel"), params)
    with pytest.raises(ValueError, match="l1 must be a number >= 0"):
        optim.l1(-0.1)
    with pytest.raises(ValueError, match="group must be a number >= 0"):
        optim.group_lasso(-1.0, optim.output_channels("a/kernel"))
    with pytest.raises(ValueError, match="b/kernel"):
        optim.prox_adamw(0.1, optim.group_lasso(0.1, optim.blocks("*kernel", (2, 2)))).init(params)


def test_stacked_layers_get_groups_per_layer():
    layers = 3
    stacked = {"up": {"kernel": np.zeros((layers, 5, 7))}, "down": {"kernel": np.zeros((layers, 7, 5))}}
    unstacked = [{"up": {"kernel": np.zeros((5, 7))}, "down": {"kernel": np.zeros((7, 5))}}
                 for _ in range(layers)]
    neuron = optim.channels(("up/kernel", -1), ("down/kernel", -2), stack_axes=1)
    index = optim.resolve_groups(neuron, stacked)
    assert index.num_groups == layers * 7 and np.all(index.sizes == 10)
    down, up = index.ids
    for layer in range(layers):           # layer l's neuron j is group l * 7 + j in both leaves
        np.testing.assert_array_equal(up[layer], np.arange(7)[None, :] + 7 * layer + 0 * up[layer])
        np.testing.assert_array_equal(down[layer], np.arange(7)[:, None] + 7 * layer + 0 * down[layer])
    # every kind gives each layer the groups an unstacked layer would have
    for spec, flat in [(optim.output_channels("up/kernel", stack_axes=1), optim.output_channels("up/kernel")),
                       (optim.blocks("up/kernel", (5, 7), stack_axes=1), optim.blocks("up/kernel", (5, 7))),
                       (optim.nm_groups("down/kernel", 7, stack_axes=1), optim.nm_groups("down/kernel", 7))]:
        per_layer = optim.resolve_groups(flat, unstacked[0])
        index = optim.resolve_groups(spec, stacked)
        assert index.num_groups == layers * per_layer.num_groups
        ids = [x for x in index.ids if x is not None][0]
        ref = [x for x in per_layer.ids if x is not None][0]
        for layer in range(layers):
            np.testing.assert_array_equal(ids[layer], ref + layer * per_layer.num_groups)


def test_group_lasso_on_stacked_layers_zeroes_neurons_per_layer():
    # Layer 0's neuron 0 is pushed to zero; the same neuron of layer 1 has a large weight and must
    # survive, which a group spanning the stack would not allow.
    w = {"k": jnp.stack([jnp.array([[0.01, 1.0], [0.01, 1.0]]), jnp.array([[2.0, 1.0], [2.0, 1.0]])])}
    tx = optim.prox_sgd(1.0, optim.group_lasso(0.1, optim.output_channels("k", stack_axes=1)))
    zero = jax.tree.map(jnp.zeros_like, w)
    new = optax.apply_updates(w, jax.jit(tx.update)(zero, tx.init(w), w)[0])["k"]
    np.testing.assert_array_equal(new[0, :, 0], 0.0)
    assert np.all(np.abs(new[1, :, 0]) > 1.5) and np.all(np.abs(new[:, :, 1]) > 0.5)


def test_stacked_group_errors_name_the_parameter():
    stacked = {"up": {"kernel": np.zeros((3, 5, 7))}, "down": {"kernel": np.zeros((2, 7, 5))},
               "bias": np.zeros((3, 7))}
    with pytest.raises(ValueError, match="down/kernel has layer axes \\(2,\\)"):
        optim.resolve_groups(optim.channels(("up/kernel", -1), ("down/kernel", -2), stack_axes=1), stacked)
    with pytest.raises(ValueError, match="bias of shape \\(3, 7\\) is not a matrix once its 1 layer axes"):
        optim.resolve_groups(optim.blocks("bias", (1, 1), stack_axes=1), stacked)
    with pytest.raises(ValueError, match="stack_axes must be an int >= 0"):
        optim.output_channels("up/kernel", stack_axes=-1)
    with pytest.raises(ValueError, match="unstack the layers first"):
        optim.remove_zero_groups(stacked, optim.output_channels("up/kernel", stack_axes=1))
