"""sparsify with mask rules equals the oracle fn(params * mask), on every program shape."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import sparsejax as sj


def oracle_params(sparams, sstate):
    return jax.tree.map(lambda p, m: p if m is None else p * m.astype(p.dtype),
                        sparams, sstate["masks"])


def tree_allclose(a, b, **kw):
    chex.assert_trees_all_close(a, b, **kw)


# ------------------------------------------------------------------------ models


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(24)(x)
        x = nn.gelu(x)
        x = nn.Dense(16, name="hidden")(x)
        return nn.Dense(5)(jax.nn.relu(x))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(32, name="up")(nn.LayerNorm()(x))
        return x + nn.Dense(x.shape[-1], name="down")(nn.silu(h)), None


class ScannedStack(nn.Module):
    """A residual stack with nn.scan over layers (stacked kernels sliced per layer)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, name="embed")(x)
        x, _ = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)(name="layers")(x, None)
        return nn.DenseGeneral((2, 4), name="head")(x)


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(12, (3, 3), strides=2, name="conv2")(x))
        return nn.Dense(3, name="out")(x.reshape(x.shape[0], -1))


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.first = nnx.Linear(12, 20, rngs=rngs)
        self.second = nnx.Linear(20, 8, rngs=rngs)

    def __call__(self, x):
        return self.second(jax.nn.relu(self.first(x)))


def control_flow_fn(params, x):
    """cond, while (fori_loop with a dynamic trip count) and a plain scan."""
    w_stack, w_out = params["stack"], params["out"]

    def body(c, w):
        return jnp.tanh(c @ w), None

    x, _ = lax.scan(body, x, w_stack)
    x = lax.cond(x.sum() > 0, lambda c: c @ w_stack[0], lambda c: c @ w_stack[1].T, x)
    n = (jnp.abs(x).sum() > -1).astype(jnp.int32) + 1  # traced trip count -> while loop
    x = lax.fori_loop(0, n, lambda i, c: jnp.sin(c @ params["loop"]), x)
    return x @ w_out


@jax.custom_vjp
def custom_matmul(x, w):
    return x @ w


custom_matmul.defvjp(lambda x, w: (x @ w, (x, w)),
                     lambda res, g: (g @ res[1].T, res[0].T @ g))


def custom_fn(params, x):
    return jnp.sum(custom_matmul(x, params["w"]) ** 2, axis=-1)


# Inputs are drawn by numpy, and the models' inits and the programs compared below run
# jitted: one program each, where op by op every operation at every new shape was a
# program to compile.
def _normal(seed, shape, scale=1.0):
    return jnp.asarray((scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32))


def _linen(model, x):
    variables = jax.jit(model.init)(jax.random.key(1), x)
    return model.apply, variables


def _nnx(x):
    graphdef, state = nnx.split(NNXNet(nnx.Rngs(3)))
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state


def _plain_params(seed):
    return {"stack": _normal(seed, (3, 8, 8), 1 / 3), "loop": _normal(seed + 1, (8, 8), 1 / 3),
            "out": _normal(seed + 2, (8, 4))}


CASES = {
    "linen_mlp": lambda: (*_linen(MLP(), jnp.ones((4, 10))), _normal(2, (4, 10))),
    "linen_scan": lambda: (*_linen(ScannedStack(), jnp.ones((2, 5, 6))), _normal(2, (2, 5, 6))),
    "conv": lambda: (*_linen(ConvNet(), jnp.ones((2, 9, 9, 3))), _normal(2, (2, 9, 9, 3))),
    "nnx": lambda: (*_nnx(None), _normal(2, (3, 12))),
    "control_flow": lambda: (control_flow_fn, _plain_params(4), _normal(2, (2, 8))),
    "custom_vjp": lambda: (custom_fn, {"w": _normal(5, (6, 7))}, _normal(2, (3, 6))),
}


def _recipe(name):
    if name == "linen_mlp":
        return sj.Recipe([sj.NM("*hidden/kernel", 2, 4), sj.Prune("*kernel", 0.7)])
    return sj.Recipe([sj.Prune("*", 0.6)])


@pytest.mark.parametrize("name", sorted(CASES))
def test_empty_recipe_reproduces_fn(name):
    fn, params, x = CASES[name]()
    sfn = sj.sparsify(fn, sj.Recipe([]))
    sparams, sstate = sfn.init(params, x)
    tree_allclose(jax.jit(sfn)(sparams, sstate, x), jax.jit(fn)(params, x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_masked_recipe_equals_oracle(name):
    fn, params, x = CASES[name]()
    sfn = sj.sparsify(fn, _recipe(name))
    sparams, sstate = sfn.init(params, x)
    masks = [m for m in jax.tree.leaves(sstate["masks"])]
    assert masks and all(0 < np.asarray(m).mean() < 1 for m in masks)
    expected = jax.jit(lambda p, s, x: fn(oracle_params(p, s), x))(sparams, sstate, x)
    tree_allclose(jax.jit(sfn)(sparams, sstate, x), expected, rtol=1e-6, atol=1e-6)
    # and the masks really change the output (a no-op rewrite would fail here)
    assert not np.allclose(np.asarray(expected), np.asarray(jax.jit(fn)(params, x)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_grad_matches_oracle(name):
    fn, params, x = CASES[name]()
    sfn = sj.sparsify(fn, _recipe(name))
    sparams, sstate = sfn.init(params, x)
    loss = lambda p: jnp.sum(jnp.sin(sfn(p, sstate, x)))
    oracle = lambda p: jnp.sum(jnp.sin(fn(oracle_params(p, sstate), x)))
    if name == "control_flow":  # a while loop with a traced trip count: forward mode only
        tangent = jax.tree.map(lambda p: _normal(7, p.shape), sparams)
        tree_allclose(jax.jit(lambda p: jax.jvp(loss, (p,), (tangent,)))(sparams),
                      jax.jit(lambda p: jax.jvp(oracle, (p,), (tangent,)))(sparams), rtol=1e-5, atol=1e-5)
        return
    tree_allclose(jax.jit(jax.grad(loss))(sparams), jax.jit(jax.grad(oracle))(sparams), rtol=1e-5,
                  atol=1e-5)


def test_scan_masks_each_layer_separately():
    fn, params, x = CASES["linen_scan"]()
    sfn = sj.sparsify(fn, sj.Recipe([sj.Prune("*layers/up/kernel", 0.75)]))
    sparams, sstate = sfn.init(params, x)
    mask = sstate["masks"]["params"]["layers"]["up"]["kernel"]
    assert mask.shape == (3, 16, 32)
    np.testing.assert_array_equal(mask.sum(axis=(1, 2)), [128, 128, 128])
    row = sfn.report().rows[0]
    assert row.layout == "3 × 16×32" and row.sites == 1
    # FLOPs count the 3 scan iterations: 2 * (2*5 tokens) * 16 * 32 per layer
    assert row.flops_before == 3 * 2 * 10 * 16 * 32


def test_conv_nm_groups_run_over_input_channels():
    fn, params, x = CASES["conv"]()
    sfn = sj.sparsify(fn, sj.Recipe([sj.NM("*conv2/kernel", 1, 4)]))
    sparams, sstate = sfn.init(params, x)
    mask = np.asarray(sstate["masks"]["params"]["conv2"]["kernel"])  # (3, 3, 8, 12)
    groups = mask.reshape(3, 3, 2, 4, 12).sum(axis=3)
    np.testing.assert_array_equal(groups, np.ones_like(groups))
    tree_allclose(sfn(sparams, sstate, x), fn(oracle_params(sparams, sstate), x), atol=1e-6)


def test_densegeneral_layout_and_block_mask():
    fn, params, x = CASES["linen_scan"]()
    sfn = sj.sparsify(fn, sj.Recipe([sj.Block("*head/kernel", 0.5, block=(4, 4))]))
    sparams, sstate = sfn.init(params, x)
    mask = np.asarray(sstate["masks"]["params"]["head"]["kernel"]).reshape(16, 8)
    tiles = mask.reshape(4, 4, 2, 4).transpose(0, 2, 1, 3).reshape(8, 16)
    assert set(tiles.sum(axis=1)) <= {0, 16} and tiles.sum() == 4 * 16
    assert sfn.report().rows[0].layout == "16×8"


def test_nnx_paths_drop_variable_value():
    fn, state, x = CASES["nnx"]()
    sfn = sj.sparsify(fn, sj.Recipe([sj.Prune("second/kernel", 0.5)]))
    sfn.init(state, x)
    assert [r.path for r in sfn.report().rows] == ["second/kernel"]


def test_custom_vjp_is_inlined_and_reported():
    fn, params, x = CASES["custom_vjp"]()
    sfn = sj.sparsify(fn, sj.Recipe([sj.Prune("w", 0.5)]))
    sparams, sstate = sfn.init(params, x)
    sfn(sparams, sstate, x)
    assert any("custom_vjp_call" in n for n in sfn.report().notes)


@jax.custom_vjp
def doubled_grad_lookup(table, ids):
    return jnp.take(table, ids, axis=0)


doubled_grad_lookup.defvjp(
    lambda table, ids: (jnp.take(table, ids, axis=0), (ids, table.shape[0])),
    lambda res, g: (2.0 * jax.nn.one_hot(res[0], res[1], dtype=g.dtype).T @ g, None))


def test_custom_vjp_without_a_site_inside_keeps_its_rule():
    # A tied embedding: the ruled weight is gathered inside a custom_vjp (no site there)
    # and multiplied outside it. The gather's own derivative rule (here: twice the true
    # gradient, so it shows) must survive the rewrite, applied to the masked weight.
    def tied(p, ids):
        h = doubled_grad_lookup(p["emb"], ids)
        return jnp.sum((h @ p["emb"].T) ** 2)

    params = {"emb": _normal(0, (10, 8))}
    ids = jnp.array([1, 1, 3, 7])
    sfn = sj.sparsify(tied, sj.Recipe([sj.Prune("emb", 0.5)]))
    sparams, sstate = sfn.init(params, ids)
    mask = sstate["masks"]["emb"]
    got = jax.jit(jax.grad(lambda p: sfn(p, sstate, ids)))(sparams)["emb"]
    want = jax.jit(lambda p: jax.grad(tied)({"emb": p["emb"] * mask}, ids)["emb"] * mask)(sparams)
    assert 0 < float(jnp.mean(mask)) < 1
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert not any("custom_vjp_call" in n for n in sfn.report().notes)


# ------------------------------------------------------------------- transforms


def _mlp_setup():
    fn, params, x = CASES["linen_mlp"]()
    sfn = sj.sparsify(fn, _recipe("linen_mlp"))
    sparams, sstate = sfn.init(params, x)
    return fn, sfn, sparams, sstate, x


def test_second_call_does_not_retrace():
    fn, sfn, sparams, sstate, x = _mlp_setup()
    assert sfn.trace_count == 1
    sfn(sparams, sstate, x)
    sfn(sparams, sstate, x + 1)
    jax.jit(sfn)(sparams, sstate, x)
    assert (sfn.trace_count, sfn.rewrite_count) == (1, 1)
    sfn(sparams, sstate, jnp.ones((7, 10)))  # a new shape is a new signature
    assert (sfn.trace_count, sfn.rewrite_count) == (2, 2)


def test_vmap_and_checkpoint():
    fn, sfn, sparams, sstate, x = _mlp_setup()
    xs = _normal(9, (3, 4, 10))
    oracle = oracle_params(sparams, sstate)
    tree_allclose(jax.jit(jax.vmap(lambda xb: sfn(sparams, sstate, xb)))(xs),
                  jax.jit(jax.vmap(lambda xb: fn(oracle, xb)))(xs), atol=1e-6)
    loss = jax.checkpoint(lambda p: jnp.sum(sfn(p, sstate, x) ** 2))
    tree_allclose(jax.jit(jax.grad(loss))(sparams),
                  jax.jit(jax.grad(lambda p: jnp.sum(fn(oracle_params(p, sstate), x) ** 2)))(sparams),
                  rtol=1e-5, atol=1e-5)


def test_jit_on_eight_device_mesh():
    assert jax.device_count() >= 8, "tests/conftest.py forces 8 CPU devices"
    fn, sfn, sparams, sstate, _ = _mlp_setup()
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    P = jax.sharding.PartitionSpec
    x = _normal(3, (8, 10))
    x_sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data", None)))
    kernel_sharding = jax.sharding.NamedSharding(mesh, P(None, "model"))
    sparams = jax.tree.map(
        lambda p: jax.device_put(p, kernel_sharding) if p.ndim == 2 and p.shape[1] % 2 == 0 else p,
        sparams)
    step = jax.jit(lambda p, s, x: sfn(p, s, x),
                   out_shardings=jax.sharding.NamedSharding(mesh, P("data", None)))
    out = step(sparams, sstate, x_sharded)
    assert out.sharding.spec == P("data", None)
    tree_allclose(out, jax.jit(lambda p, s, x: fn(oracle_params(p, s), x))(sparams, sstate, x),
                  rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gradient", ["masked", "ste", "srste"])
def test_gradient_modes(gradient):
    params = {"w": _normal(0, (8, 6))}
    x = _normal(1, (5, 8))
    fn = lambda p, x: jnp.tanh(x @ p["w"])
    sfn = sj.sparsify(fn, sj.Prune("w", 0.5, gradient=gradient, srste_decay=0.1))
    sparams, sstate = sfn.init(params, x)
    m = np.asarray(sstate["masks"]["w"], np.float32)
    g = jax.jit(jax.grad(lambda p: jnp.sum(sfn(p, sstate, x))))(sparams)["w"]
    g_masked_w = np.asarray(jax.jit(jax.grad(lambda w: jnp.sum(fn({"w": w}, x))))(params["w"] * m))
    w = np.asarray(params["w"])
    expected = {"masked": g_masked_w * m, "ste": g_masked_w,
                "srste": g_masked_w + 0.1 * (1 - m) * w}[gradient]
    np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)


def test_recompute_masks_under_jit():
    fn, sfn, sparams, sstate, x = _mlp_setup()
    new = jax.jit(lambda p, s, sp: sfn.recompute_masks(p, s, sparsity=sp))(sparams, sstate, 0.9)
    m = new["masks"]["params"]["Dense_0"]["kernel"]
    assert int(m.sum()) == round(0.1 * m.size)
    nm = new["masks"]["params"]["hidden"]["kernel"]   # N:M keeps its 2:4
    np.testing.assert_array_equal(np.asarray(nm).reshape(6, 4, 16).sum(1), 2)
    # magnitude: every kept weight is at least as large as every pruned one
    w = np.abs(np.asarray(sparams["params"]["Dense_0"]["kernel"]))
    assert w[np.asarray(m)].min() >= w[~np.asarray(m)].max()


def test_random_method_and_dense_params():
    params = {"w": jax.random.normal(jax.random.key(0), (16, 16))}
    fn = lambda p, x: x @ p["w"]
    x = jnp.ones((2, 16))
    sfn = sj.sparsify(fn, sj.Prune("w", 0.5, method="random"))
    a = sfn.init(params, x, rng=jax.random.key(1))[1]["masks"]["w"]
    b = sfn.init(params, x, rng=jax.random.key(2))[1]["masks"]["w"]
    assert int(a.sum()) == int(b.sum()) == 128 and not bool(jnp.all(a == b))
    dense = sfn.dense_params(params, {"masks": {"w": a}})
    np.testing.assert_array_equal(dense["w"], params["w"] * a)


def test_report_lists_untouched_parameters():
    fn, sfn, sparams, sstate, x = _mlp_setup()
    text = str(sfn.report())
    assert "params/hidden/kernel" in text and "NM('*hidden/kernel', n=2, m=4)" in text
    assert "params/Dense_0/bias" in text  # untouched, listed
    rows = {r.path: r for r in sfn.report().rows}
    assert rows["params/hidden/kernel"].density == pytest.approx(0.5)
    assert rows["params/Dense_0/kernel"].density == pytest.approx(0.3, abs=1e-3)
