"""Lowering scanned layers (per-layer block tables as device arrays), packed params, and the
precision of the lowered program's gradients (Pallas interpret mode on CPU)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax.training import checkpointing
from sparsejax.kernels import block_sparse
from sparsejax.kernels import path_choice as pc

from kernel_testing import rel_error

LAYERS = 3


class Layer(nn.Module):
    dtype: str = "float32"

    @nn.compact
    def __call__(self, h, _):
        up = nn.relu(nn.Dense(48, dtype=self.dtype, name="a")(h))     # 40×48: 5 × 3 blocks of 8×16
        return h + nn.Dense(40, dtype=self.dtype, name="b")(up), None  # 48×40: 6 × 5 blocks of 8×8


class Stack(nn.Module):
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x):
        layers = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=LAYERS)
        return layers(self.dtype, name="layers")(x, None)[0]


def _layer_masks(k, n, bk, bn, rng):
    """Per-layer block masks of different densities: random, empty, full."""
    kb, nb = -(-k // bk), -(-n // bn)
    blocks = np.stack([rng.random((kb, nb)) < 0.45, np.zeros((kb, nb), bool), np.ones((kb, nb), bool)])
    return np.stack([np.kron(b, np.ones((bk, bn), bool))[:k, :n] for b in blocks])


@pytest.fixture(scope="module")
def stack():
    model = Stack()
    x = jax.random.normal(jax.random.key(0), (5, 40))
    params = model.init(jax.random.key(1), x)
    sfn = sj.sparsify(model.apply, [sj.Block("*a/kernel", 0.6, block=(8, 16)),
                                    sj.Block("*b/kernel", 0.5, block=(8, 8))])
    sparams, init_state = sfn.init(params, x)
    sstate = jax.tree.map(lambda m: m, init_state)
    rng = np.random.default_rng(3)
    masks = sstate["masks"]
    masks["params"]["layers"]["a"]["kernel"] = jnp.asarray(_layer_masks(40, 48, 8, 16, rng))
    masks["params"]["layers"]["b"]["kernel"] = jnp.asarray(_layer_masks(48, 40, 8, 8, rng)[::-1])
    return sfn, sparams, {"masks": masks}, x, init_state


def _loss(f, sstate):
    return lambda p, x: jnp.sum(jnp.sin(f(p, sstate, x)))


def test_scanned_layers_lower_with_per_layer_tables(stack):
    sfn, sparams, sstate, x, _ = stack
    fast = sfn.lower(sstate, interpret=True)
    jaxpr = str(fast.rewritten_jaxpr(sparams, sstate, x))
    assert "pallas_call" in jaxpr and "scan" in jaxpr
    chex.assert_trees_all_close(jax.jit(fast)(sparams, sstate, x), sfn(sparams, sstate, x),
                                rtol=1e-5, atol=1e-5)
    g_fast = jax.jit(jax.grad(_loss(fast, sstate), argnums=(0, 1)))(sparams, x)
    g_ref = jax.jit(jax.grad(_loss(sfn, sstate), argnums=(0, 1)))(sparams, x)
    chex.assert_trees_all_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)
    # Gradients reach kept blocks only: the empty layer's kernel gets none.
    assert not np.any(np.asarray(g_fast[0]["params"]["layers"]["a"]["kernel"][1]))
    kernels = {r.path: r.kernel for r in fast.report().rows}
    assert all(k.startswith("block-sparse kernel (Pallas kernel in interpret mode)")
               for k in kernels.values()), kernels


def test_scanned_layers_take_the_kept_blocks_product_with_per_layer_tables(stack):
    sfn, sparams, sstate, x, _ = stack
    with pc.mode("force:xla_blocks"):        # 5 rows: a few-row site, where it is offered
        fast = sfn.lower(sstate)
        y = jax.jit(fast)(sparams, sstate, x)
        g_fast = jax.jit(jax.grad(_loss(fast, sstate), argnums=(0, 1)))(sparams, x)
        packed = sfn.lower(sstate, packed=True)
        y_packed = jax.jit(packed)(packed.pack(sparams), sstate, x)
    assert all(r.kernel.startswith("XLA product of the kept blocks") for r in fast.report().rows)
    want = sfn(sparams, sstate, x)
    chex.assert_trees_all_close(y, want, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(y_packed, want, rtol=1e-5, atol=1e-5)
    g_ref = jax.jit(jax.grad(_loss(sfn, sstate), argnums=(0, 1)))(sparams, x)
    chex.assert_trees_all_close(g_fast, g_ref, rtol=1e-4, atol=1e-5)
    assert not np.any(np.asarray(g_fast[0]["params"]["layers"]["a"]["kernel"][1]))


def test_pack_stacked_matches_dense_and_tables_travel_through_a_scan():
    rng = np.random.default_rng(0)
    mask = _layer_masks(40, 48, 8, 16, rng)
    w = jax.random.normal(jax.random.key(4), (LAYERS, 40, 48))
    x = jax.random.normal(jax.random.key(5), (LAYERS, 7, 40))
    packed = block_sparse.pack_stacked(w, mask, (8, 16))
    assert packed.blocks.shape == (LAYERS, 15, 8, 16) and packed.tables.max_per_col == 5
    np.testing.assert_array_equal(np.asarray(packed.to_dense()), np.asarray(w * mask))

    def run(w):
        p = block_sparse.pack_stacked(w, mask, (8, 16))
        return jax.lax.scan(lambda c, a: (c, block_sparse.block_sparse_matmul(
            a[1], a[0], interpret=True, poison=True)), 0, (p, x))[1]

    ref = lambda w: jnp.einsum("lmk,lkn->lmn", x, w * mask)
    chex.assert_trees_all_close(jax.jit(run)(w), ref(w), rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda w: jnp.sum(jnp.cos(run(w)))))(w)
    chex.assert_trees_all_close(g, jax.grad(lambda w: jnp.sum(jnp.cos(ref(w))))(w), rtol=1e-4, atol=1e-5)
    # Padded slots (the sparse layer holds fewer blocks than the capacity) get no gradient.
    assert not np.any(np.asarray(g) * ~mask)


def test_packed_model_holds_kept_blocks_computes_and_round_trips_through_orbax(stack, tmp_path):
    sfn, sparams, _, x, sstate = stack     # the rule's own masks: 40% / 50% of blocks per layer
    packed_fn = sfn.lower(sstate, interpret=True, packed=True)
    pparams = packed_fn.pack(sparams)
    for name, block, keep in (("a", (8, 16), 0.4), ("b", (8, 8), 0.5)):
        leaf = pparams["params"]["layers"][name]["kernel"]
        dense = sparams["params"]["layers"][name]["kernel"]
        masks = np.asarray(sstate["masks"]["params"]["layers"][name]["kernel"])
        kept = masks.reshape(LAYERS, -1).sum(1) // (block[0] * block[1])
        assert leaf.shape == (LAYERS, kept.max(), *block)     # capacity: the densest layer
        assert leaf.nbytes == pytest.approx(keep * dense.nbytes, rel=0.05)
    # Masks of packed leaves are not needed any more.
    no_masks = {"masks": jax.tree.map(lambda m: None, sstate["masks"])}
    y = jax.jit(packed_fn)(pparams, no_masks, x)
    assert "pallas_call" in str(packed_fn.rewritten_jaxpr(pparams, no_masks, x))
    chex.assert_trees_all_close(y, sfn(sparams, sstate, x), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(packed_fn.dense_params(pparams, no_masks),
                                sfn.dense_params(sparams, sstate), atol=0)
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, pparams)
        ckpt.wait()
        restored = ckpt.restore(jax.tree.map(jnp.zeros_like, pparams)).state
    chex.assert_trees_all_close(jax.jit(packed_fn)(restored, no_masks, x), y, atol=0)
    with pytest.raises(ValueError, match="lower\\(sstate, packed=True\\)"):
        sfn.lower(sstate, interpret=True).pack(sparams)


def test_lowered_bf16_gradients_are_as_close_to_float32_as_xla_bf16(stack):
    """The gap between the lowered and the masked bf16 LM's gradients (1.2e-2 measured on a
    GPU) is rounding, not a defect: per leaf, the lowered bf16 gradient is within bf16
    precision of the float32 masked gradient and no further from it than XLA's bf16 one.
    (In float32 the two programs agree to 1e-4: the scanned-layers test above.
    benchmarks/lowering_check.py checks the same on a GPT-style LM.)"""
    sfn, sparams, sstate, x, _ = stack
    rules = [sj.Block("*a/kernel", 0.6, block=(8, 16)), sj.Block("*b/kernel", 0.5, block=(8, 8))]
    bf16 = sj.sparsify(Stack("bfloat16").apply, rules)
    bf16.init(sparams, x)
    grad = lambda f: jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(f(p, sstate, x)))))(sparams)
    ref, xla, low = grad(sfn), grad(bf16), grad(bf16.lower(sstate, interpret=True))
    for path, g_low, g_xla, r in zip(sj.paths.leaf_paths(ref), jax.tree.leaves(low),
                                     jax.tree.leaves(xla), jax.tree.leaves(ref)):
        e_low, e_xla = rel_error(g_low, r), rel_error(g_xla, r)
        assert e_low < 2e-2, (path, e_low)
        assert e_low < 1.5 * e_xla + 1e-3, (path, e_low, e_xla)
