"""The lowering pass: block-structured masked matmuls run the block-sparse kernel
(Pallas interpret mode here) and compute what the masked program computes."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(48, name="a")(x))           # 40×48: 5 × 3 blocks of 8×16
        return nn.DenseGeneral((2, 8), name="b")(h)       # 48×16 viewed through a reshape


def _setup(seed):
    model = Net()
    x = jax.random.normal(jax.random.key(seed), (5, 40))
    params = model.init(jax.random.key(seed + 1), x)
    sfn = sj.sparsify(model.apply, [sj.Block("*a/kernel", 0.6, block=(8, 16)),
                                    sj.Block("*b/kernel", 0.5, block=(8, 8))])
    sparams, sstate = sfn.init(params, x)
    return sfn, sparams, sstate, x


def _block_mask(kind, k, n, bk, bn, rng):
    kb, nb = -(-k // bk), -(-n // bn)
    if kind == "zeros":
        blocks = np.zeros((kb, nb), bool)
    elif kind == "dense":
        blocks = np.ones((kb, nb), bool)
    elif kind == "one_per_row":
        blocks = np.zeros((kb, nb), bool)
        blocks[np.arange(kb), rng.integers(0, nb, kb)] = True
    else:
        blocks = rng.random((kb, nb)) < 0.4
    return np.kron(blocks, np.ones((bk, bn), bool))[:k, :n]


@pytest.mark.parametrize("kind", ["random", "zeros", "dense", "one_per_row"])
def test_lowered_equals_masked(kind):
    sfn, sparams, sstate, x = _setup(seed=len(kind))
    rng = np.random.default_rng(len(kind))
    masks = jax.tree.map(lambda m: m, sstate["masks"])
    masks["params"]["a"]["kernel"] = jnp.asarray(_block_mask(kind, 40, 48, 8, 16, rng))
    masks["params"]["b"]["kernel"] = jnp.asarray(
        _block_mask(kind, 48, 16, 8, 8, rng)).reshape(48, 2, 8)
    sstate = {"masks": masks}
    fast = sfn.lower(sstate, interpret=True)
    assert all("interpret" in r.kernel for r in fast.report().rows)
    chex.assert_trees_all_close(fast(sparams, sstate, x), sfn(sparams, sstate, x),
                                rtol=1e-5, atol=1e-5)
    loss = lambda f: (lambda p, x: jnp.sum(jnp.sin(f(p, sstate, x))))
    g_fast = jax.grad(loss(fast), argnums=(0, 1))(sparams, x)
    g_ref = jax.grad(loss(sfn), argnums=(0, 1))(sparams, x)
    chex.assert_trees_all_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)


def test_unstructured_masks_stay_on_xla_and_say_why():
    model = Net()
    x = jax.random.normal(jax.random.key(0), (5, 40))
    params = model.init(jax.random.key(1), x)
    sfn = sj.sparsify(model.apply, [sj.Prune("*a/kernel", 0.5), sj.Block("*b/kernel", 0.5, block=(8, 8),
                                                                         gradient="ste")])
    sparams, sstate = sfn.init(params, x)
    fast = sfn.lower(sstate, interpret=True)
    kernels = {r.path: r.kernel for r in fast.report().rows}
    assert kernels["params/a/kernel"].startswith("XLA (mask is not made of whole")
    assert "gradient='ste'" in kernels["params/b/kernel"]
    chex.assert_trees_all_close(fast(sparams, sstate, x), sfn(sparams, sstate, x), atol=1e-6)
