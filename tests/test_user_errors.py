"""What a new user runs into: recipe files, scalar types, container types, random masks, lowering."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict

import sparsejax as sj
from sparsejax.training import presets


# ----------------------------------------------------------------------------- JSON recipes


@pytest.mark.parametrize("spec,message", [
    ({"rule": [{"rule": "Prune", "pattern": "*kernel"}]}, r"unknown top-level key\(s\) \['rule'\] \(did you mean 'rules'\?\)"),
    ({}, "no \"rules\" list"),
    ({"rules": []}, "must be a non-empty list"),
    ([{"rule": "Prune", "pattern": "*kernel"}], "top level must be an object"),
    ({"rules": [{"rule": "Prune", "pattern": "*kernel", "sparsty": 0.9}]},
     r"rules\[0\] \(Prune\): unknown field 'sparsty' \(did you mean 'sparsity'\?\)"),
    ({"rules": ["Prune"]}, r"rules\[0\] must be an object"),
    ({"rules": [{"rule": "Prune", "pattern": "*kernel", "sparsity": 2}]}, r"rules\[0\]: .*sparsity"),
])
def test_bad_recipe_file_is_one_line(tmp_path, spec, message):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=message) as err:
        presets.get(str(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_good_recipe_file_builds_its_rules(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"rules": [{"rule": "Block", "pattern": "*k", "block": [2, 4]}]}))
    (rule,) = presets.get(str(path)).recipe("lm")
    assert rule == sj.Block("*k", block=(2, 4))


# ----------------------------------------------------------------------------- scalar types


@pytest.mark.parametrize("make,expected", [
    (lambda: sj.Prune("*", np.float32(0.5)), sj.Prune("*", 0.5)),
    (lambda: sj.Prune("*", jnp.float32(0.25)), sj.Prune("*", 0.25)),
    (lambda: sj.NM("*", np.int64(2), np.int64(4)), sj.NM("*", 2, 4)),
    (lambda: sj.Block("*", np.float64(0.5), block=(np.int32(2), jnp.int32(4))),
     sj.Block("*", 0.5, block=(2, 4))),
    (lambda: sj.Monarch("*", np.int32(4)), sj.Monarch("*", 4)),
    (lambda: sj.SparkTopK(k=np.int64(3)), sj.SparkTopK(k=3)),
])
def test_numpy_and_jax_scalars_are_accepted_in_rules(make, expected):
    rule = make()
    assert rule == expected and rule.describe() == expected.describe()


def test_scalar_rule_builds_the_same_masks():
    params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
    fn = lambda p, x: x @ p["w"]
    x = jnp.ones((2, 8))
    a = sj.sparsify(fn, sj.NM("w", np.int64(2), np.int64(4))).init(params, x)[1]
    b = sj.sparsify(fn, sj.NM("w", 2, 4)).init(params, x)[1]
    np.testing.assert_array_equal(a["masks"]["w"], b["masks"]["w"])


def test_non_integer_nm_is_still_refused():
    with pytest.raises(ValueError, match="integers"):
        sj.NM("*", 2.5, 4)


# ----------------------------------------------------------------------------- FrozenDict vs dict


def _linen_mlp():
    import flax.linen as nn
    model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4)])
    x = jax.random.normal(jax.random.key(1), (3, 8))
    return model, model.init(jax.random.key(0), x), x


@pytest.mark.parametrize("init_as,call_as", [(dict, FrozenDict), (FrozenDict, dict)])
def test_frozendict_and_dict_are_the_same_params(init_as, call_as):
    model, variables, x = _linen_mlp()
    variables = jax.tree_util.tree_map(lambda v: v, dict(variables))
    to = lambda c, t: FrozenDict(t) if c is FrozenDict else \
        jax.tree_util.tree_map(lambda v: v, FrozenDict(t).unfreeze())
    sfn = sj.sparsify(model.apply, sj.Prune("*kernel", 0.5))
    sparams, sstate = sfn.init(to(init_as, variables), x)
    want = sfn(sparams, sstate, x)
    other_params = to(call_as, sparams)
    assert jax.tree_util.tree_structure(other_params) != jax.tree_util.tree_structure(sparams)
    np.testing.assert_array_equal(sfn(other_params, sstate, x), want)
    # masks in the other container type too
    other_state = {"masks": to(call_as, sstate["masks"])}
    np.testing.assert_array_equal(sfn(other_params, other_state, x), want)
    dense = sfn.dense_params(other_params, other_state)
    np.testing.assert_allclose(model.apply(dense, x), want, rtol=1e-6, atol=1e-6)


def test_a_really_different_tree_still_names_what_differs():
    model, variables, x = _linen_mlp()
    sfn = sj.sparsify(model.apply, sj.Prune("*kernel", 0.5))
    sparams, sstate = sfn.init(variables, x)
    wrong = {"params": {"layers_0": sparams["params"]["layers_0"]}}
    with pytest.raises(ValueError, match=r"missing \['params/layers_2/bias'"):
        sfn(wrong, sstate, x)


# ----------------------------------------------------------------------------- random masks


def test_random_prune_requires_a_key():
    params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
    fn = lambda p, x: x @ p["w"]
    sfn = sj.sparsify(fn, sj.Prune("w", 0.5, method="random"))
    with pytest.raises(ValueError, match=r"method='random'.*rng=jax.random.key"):
        sfn.init(params, jnp.ones((2, 8)))
    sparams, sstate = sfn.init(params, jnp.ones((2, 8)), rng=jax.random.key(3))
    with pytest.raises(ValueError, match="rng="):
        sfn.recompute_masks(sparams, sstate)
    sfn.recompute_masks(sparams, sstate, rng=jax.random.key(4))


def test_magnitude_prune_needs_no_key():
    params = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
    sfn = sj.sparsify(lambda p, x: x @ p["w"], sj.Prune("w", 0.5))
    sfn.init(params, jnp.ones((2, 8)))


# ----------------------------------------------------------------------------- lower()


def _block_setup():
    params = {"w": jax.random.normal(jax.random.key(0), (16, 16))}
    fn = lambda p, x: jnp.tanh(x @ p["w"])
    x = jax.random.normal(jax.random.key(1), (4, 16))
    sfn = sj.sparsify(fn, sj.Block("w", 0.5, block=(8, 8)))
    sparams, sstate = sfn.init(params, x)
    return sfn, sparams, sstate, x


def test_lowered_function_refuses_masks_it_was_not_built_with():
    sfn, sparams, sstate, x = _block_setup()
    fast = sfn.lower(sstate, interpret=True)
    np.testing.assert_allclose(fast(sparams, sstate, x), sfn(sparams, sstate, x), rtol=1e-5,
                               atol=1e-5)
    # an equal copy of the masks passes (the fingerprint, not the object, is compared)
    same = {"masks": jax.tree.map(jnp.array, sstate["masks"])}
    np.testing.assert_allclose(fast(sparams, same, x), sfn(sparams, same, x), rtol=1e-5,
                               atol=1e-5)
    changed = {"masks": {"w": ~sstate["masks"]["w"]}}
    with pytest.raises(ValueError, match=r"^w: sstate\['masks'\] differs .* sfn.lower\(sstate\) again"):
        fast(sparams, changed, x)
    relowered = sfn.lower(changed, interpret=True)
    np.testing.assert_allclose(relowered(sparams, changed, x), sfn(sparams, changed, x),
                               rtol=1e-5, atol=1e-5)
