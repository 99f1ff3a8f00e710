"""Bad input: each a clear error naming the parameter path and the rule."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import sparsejax as sj


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, name="out")(nn.relu(nn.Dense(12, name="hidden")(x)))


@pytest.fixture(scope="module")
def setup():
    model, x = Net(), jax.random.normal(jax.random.key(0), (2, 10))
    return model.apply, model.init(jax.random.key(1), x), x


def test_rule_matching_nothing_lists_close_matches(setup):
    fn, params, x = setup
    with pytest.raises(ValueError, match=r"Prune\('\*hiden/kernel'.*matches no parameter.*"
                                         r"params/hidden/kernel"):
        sj.sparsify(fn, sj.Prune("*hiden/kernel", 0.5)).init(params, x)


def test_rule_matching_only_biases_has_no_site(setup):
    fn, params, x = setup
    with pytest.raises(ValueError, match=r"Prune\('\*/bias'.*no matmul or conv"):
        sj.sparsify(fn, sj.Prune("*/bias", 0.5)).init(params, x)


def test_rule_fully_shadowed_by_an_earlier_rule(setup):
    fn, params, x = setup
    with pytest.raises(ValueError, match=r"NM\('\*hidden\*'.*claimed by an earlier rule"):
        sj.sparsify(fn, [sj.Prune("*kernel", 0.5), sj.NM("*hidden*", 2, 4)]).init(params, x)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, "0.5"])
def test_sparsity_outside_unit_interval(sparsity):
    with pytest.raises(ValueError, match=r"Prune\('w'.*sparsity must be in \[0, 1\)"):
        sj.Prune("w", sparsity)


def test_n_greater_than_m():
    with pytest.raises(ValueError, match=r"NM\('w', n=5, m=4\).*0 < n <= m"):
        sj.NM("w", 5, 4)


def test_m_not_dividing_reduction_axis(setup):
    fn, params, x = setup  # hidden kernel is (10, 12): K = 10
    with pytest.raises(ValueError, match=r"params/hidden/kernel: NM\('\*hidden/kernel', n=2, m=4\)"
                                         r".*size 10, which m=4 does not divide"):
        sj.sparsify(fn, sj.NM("*hidden/kernel", 2, 4)).init(params, x)


def test_block_not_dividing(setup):
    fn, params, x = setup
    with pytest.raises(ValueError, match=r"params/out/kernel: Block.*does not divide.*12×6"):
        sj.sparsify(fn, sj.Block("*out/kernel", 0.5, block=(4, 4))).init(params, x)


def test_bad_gradient_mode():
    with pytest.raises(ValueError, match=r"gradient must be one of"):
        sj.Prune("w", 0.5, gradient="sometimes")


def test_params_at_call_time_must_match_init(setup):
    fn, params, x = setup
    sfn = sj.sparsify(fn, sj.Prune("*kernel", 0.5))
    sparams, sstate = sfn.init(params, x)
    missing = {"params": {"hidden": sparams["params"]["hidden"]}}
    with pytest.raises(ValueError, match=r"missing \['params/out/bias', 'params/out/kernel'\]"):
        sfn(missing, sstate, x)
    wrong = jax.tree.map(lambda p: p, sparams)
    wrong["params"]["out"]["kernel"] = jnp.zeros((12, 7))
    with pytest.raises(ValueError, match=r"params/out/kernel: shape \(12, 7\) differs .* \(12, 6\)"):
        sfn(wrong, sstate, x)


def test_call_before_init_and_bad_state(setup):
    fn, params, x = setup
    sfn = sj.sparsify(fn, sj.Prune("*kernel", 0.5))
    with pytest.raises(RuntimeError, match="init"):
        sfn(params, {"masks": None}, x)
    sparams, sstate = sfn.init(params, x)
    with pytest.raises(TypeError, match="sstate must be the dict returned by init"):
        sfn(sparams, sstate["masks"], x)
    no_mask = jax.tree.map(lambda m: m, sstate["masks"])
    no_mask["params"]["out"]["kernel"] = None
    with pytest.raises(ValueError, match=r"params/out/kernel: sstate\['masks'\] needs a mask"):
        sfn(sparams, {"masks": no_mask}, x)


def test_recipe_rejects_non_rules():
    with pytest.raises(TypeError, match="Recipe takes Rule objects"):
        sj.Recipe(["*kernel"])
