"""The lowering pass: block-structured masked matmuls run the block-sparse kernel
(Pallas interpret mode here) and compute what the masked program computes."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax.kernels import block_sparse as bs
from sparsejax.kernels import path_choice as pc


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(48, name="a")(x))           # 40×48: 5 × 3 blocks of 8×16
        return nn.DenseGeneral((2, 8), name="b")(h)       # 48×16 viewed through a reshape


def _setup(seed):
    model = Net()
    x = jax.random.normal(jax.random.key(seed), (5, 40))
    params = jax.jit(model.init)(jax.random.key(seed + 1), x)   # one program, not one per op
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
    # (jitted: one program each, where op by op every operation was a program to compile)
    chex.assert_trees_all_close(jax.jit(fast)(sparams, sstate, x), jax.jit(sfn)(sparams, sstate, x),
                                rtol=1e-5, atol=1e-5)
    loss = lambda f: (lambda p, x: jnp.sum(jnp.sin(f(p, sstate, x))))
    g_fast = jax.jit(jax.grad(loss(fast), argnums=(0, 1)))(sparams, x)
    g_ref = jax.jit(jax.grad(loss(sfn), argnums=(0, 1)))(sparams, x)
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


def _kernels(fn):
    return {r.path: r.kernel for r in fn.report().rows}


def test_cpu_choice_is_deterministic(fresh_paths):
    sfn, sparams, sstate, x = _setup(seed=7)
    on_cpu = sfn.lower(sstate)          # no kernel on the CPU: XLA's masked dense product
    jaxpr = str(on_cpu.rewritten_jaxpr(sparams, sstate, x))
    assert "pallas_call" not in jaxpr
    assert set(_kernels(on_cpu).values()) == {
        "XLA dense masked matmul (no block-sparse kernel on backend 'cpu')"}
    interpreted = sfn.lower(sstate, interpret=True)
    assert "pallas_call" in str(interpreted.rewritten_jaxpr(sparams, sstate, x))
    assert set(_kernels(interpreted).values()) == {
        "block-sparse kernel (Pallas kernel in interpret mode)"}


@pytest.mark.parametrize("path", ["kernel", "xla_dense", "reference", "xla_blocks"])
def test_each_forced_path_computes_the_masked_answer(fresh_paths, path):
    sfn, sparams, sstate, x = _setup(seed=8)
    with pc.mode(f"force:{path}"):   # the reference is a candidate where no kernel runs
        fast = sfn.lower(sstate, interpret=path != "reference")
        y = jax.jit(fast)(sparams, sstate, x)
        jaxpr = str(fast.rewritten_jaxpr(sparams, sstate, x))
    assert ("pallas_call" in jaxpr) == (path == "kernel")
    label = {"kernel": "block-sparse kernel", "xla_dense": "XLA dense",
             "reference": "block-sparse reference",
             "xla_blocks": "XLA product of the kept blocks"}[path]
    assert all(k.startswith(label) and "(forced)" in k for k in _kernels(fast).values())
    chex.assert_trees_all_close(y, sfn(sparams, sstate, x), rtol=1e-5, atol=1e-5)


def test_kept_blocks_product_is_offered_at_a_few_rows_only_and_differentiates(fresh_paths):
    sfn, sparams, sstate, _ = _setup(seed=9)
    cot = jax.random.normal(jax.random.key(3), (2, 2, 8))
    loss = lambda f: (lambda p, x: jnp.sum(f(p, sstate, x) * cot))
    x = jax.random.normal(jax.random.key(4), (2, 40))
    with pc.mode("force:xla_blocks"):
        fast = sfn.lower(sstate)
        g_fast = jax.grad(loss(fast), argnums=(0, 1))(sparams, x)
    assert all(k.startswith("XLA product of the kept blocks") for k in _kernels(fast).values())
    chex.assert_trees_all_close(g_fast, jax.grad(loss(sfn), argnums=(0, 1))(sparams, x),
                                rtol=1e-5, atol=1e-5)
    # Past MAX_ROWS rows it is no candidate: forcing it falls back to the deterministic path.
    many = jax.random.normal(jax.random.key(5), (bs.MAX_ROWS + 1, 40))
    with pc.mode("force:xla_blocks"):
        fast = sfn.lower(sstate)
        y = fast(sparams, sstate, many)
    assert all(k.startswith("XLA dense masked matmul") for k in _kernels(fast).values())
    chex.assert_trees_all_close(y, sfn(sparams, sstate, many), rtol=1e-5, atol=1e-5)


def test_measured_choice_of_xla_computes_via_xla_and_reports_times(fresh_paths, monkeypatch):
    sfn, sparams, sstate, x = _setup(seed=9)
    seen = []

    def fake_measure(candidates, specs, **kw):
        seen.append(([c.name for c in candidates], [s.shape for s in specs]))
        return {"kernel": 40.0, "xla_dense": 10.0, "xla_blocks": 20.0}

    monkeypatch.setattr(pc, "_measuring_pays", lambda: True)
    monkeypatch.setattr(pc, "measure", fake_measure)
    fast = sfn.lower(sstate, interpret=True)
    assert "pallas_call" not in str(fast.rewritten_jaxpr(sparams, sstate, x))
    assert seen[0] == (["kernel", "xla_dense", "xla_blocks"], [(5, 40), (40, 48)])
    assert set(_kernels(fast).values()) == {"XLA dense masked matmul (10 µs, measured)"}
    chex.assert_trees_all_close(fast(sparams, sstate, x), sfn(sparams, sstate, x), atol=1e-6)
    # Under jax.grad the sites are chosen again, for forward + backward.
    entries = len(pc.cache_entries())
    g = jax.grad(lambda p: jnp.sum(fast(p, sstate, x)))(sparams)
    keys = sorted(pc.cache_entries())
    assert len(keys) == 2 * entries and sum(k.endswith(",fwd+bwd") for k in keys) == entries
    chex.assert_trees_all_close(g, jax.grad(lambda p: jnp.sum(sfn(p, sstate, x)))(sparams),
                                rtol=1e-5, atol=1e-6)


def test_measured_kernel_choice_reports_its_time_against_dense(fresh_paths, monkeypatch):
    sfn, sparams, sstate, x = _setup(seed=10)
    monkeypatch.setattr(pc, "_measuring_pays", lambda: True)
    monkeypatch.setattr(pc, "measure", lambda c, s, **kw: {"kernel": 5.0, "xla_dense": 10.0,
                                                          "xla_blocks": 7.0})
    fast = sfn.lower(sstate, interpret=True)
    assert "pallas_call" in str(fast.rewritten_jaxpr(sparams, sstate, x))
    assert set(_kernels(fast).values()) == {
        "block-sparse kernel (Pallas kernel in interpret mode) (5 µs vs dense 10 µs, 2.00×, measured)"}


def test_candidates_measure_for_real_forward_and_backward(fresh_paths):
    """The functions a site would time compute the site's product (one layer, both passes)."""
    sfn, sparams, sstate, x = _setup(seed=11)
    fast = sfn.lower(sstate, interpret=True)
    handler = fast._handlers["params/a/kernel"]
    w = sparams["params"]["a"]["kernel"]
    want = x @ (w * sstate["masks"]["params"]["a"]["kernel"])
    candidates = handler._candidates(jnp.float32, x.shape[0])
    assert ([c.name for c in candidates if c.unsupported is None]
            == ["kernel", "xla_dense", "xla_blocks"])
    for c in candidates:
        chex.assert_trees_all_close(jax.jit(c.fn)(x, w), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["kernel", "xla_dense"])
def test_packed_unrolled_model_on_each_path(fresh_paths, path):
    """Packed leaves (a reshaped DenseGeneral kernel among them) compute the masked answer on the
    kernel and, scattered back to dense, on XLA."""
    sfn, sparams, sstate, x = _setup(seed=12)
    with pc.mode(f"force:{path}"):
        packed = sfn.lower(sstate, interpret=True, packed=True)
        pparams = packed.pack(sparams)
        y = jax.jit(packed)(pparams, sstate, x)
        g = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(packed(p, sstate, x)))))(pparams)
    assert pparams["params"]["b"]["kernel"].shape == (6, 8, 8)     # 12 blocks of 8×8, half kept
    chex.assert_trees_all_close(y, jax.jit(sfn)(sparams, sstate, x), rtol=1e-5, atol=1e-5)
    # The gradient of a kept block is the masked program's gradient there.
    g_ref = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(sfn(p, sstate, x)))))(sparams)
    handler = packed._handlers["params/b/kernel"]
    chex.assert_trees_all_close(g["params"]["b"]["kernel"],
                                handler.pack_leaf(g_ref["params"]["b"]["kernel"]), rtol=1e-4, atol=1e-5)


def test_differentiation_is_seen_through_vmap_and_not_in_a_plain_call():
    from sparsejax.compiler.passes import base

    seen = []

    def f(x):
        seen.append(base.under_autodiff([x]))
        return jnp.sum(x ** 2)

    ones = jnp.ones(2)
    jax.grad(f)(ones)
    jax.vmap(jax.grad(f))(jnp.ones((3, 2)))
    jax.grad(lambda x: jnp.sum(jax.vmap(f)(x)))(jnp.ones((3, 2)))
    f(ones)
    jax.jit(f)(ones)
    jax.vmap(f)(jnp.ones((3, 2)))
    assert seen == [True, True, True, False, False, False]


def _muls(closed):
    return sum(e.primitive.name == "mul" for e in closed.jaxpr.eqns)


@pytest.mark.parametrize("path", ["kernel", "xla_dense"])
def test_premasked_copy_computes_the_masked_function_without_multiplying_masks(path):
    sfn, sparams, sstate, x = _setup(seed=7)
    fast = sfn.lower(sstate, interpret=True, premasked=True)
    pre = fast.premask(sparams, sstate)
    with pc.mode(f"force:{path}"):
        chex.assert_trees_all_close(jax.jit(fast)(pre, sstate, x), jax.jit(sfn)(sparams, sstate, x),
                                    rtol=1e-5, atol=1e-5)
        # Gradients still reach kept weights only.
        loss = lambda f, p: jnp.sum(jnp.sin(f(p, sstate, x)))
        g = jax.jit(jax.grad(lambda p: loss(fast, p)))(pre)
        g_ref = jax.jit(jax.grad(lambda p: loss(sfn, p)))(sparams)
        chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-5)
        if path == "xla_dense":   # XLA's path is the plain dense product: no mask multiply
            plain = sfn.lower(sstate, interpret=True)
            assert _muls(fast.rewritten_jaxpr(pre, sstate, x)) < _muls(
                plain.rewritten_jaxpr(sparams, sstate, x))


def test_premasked_copy_refuses_weights_outside_the_masks():
    sfn, sparams, sstate, x = _setup(seed=8)
    fast = sfn.lower(sstate, interpret=True, premasked=True)
    with pytest.raises(ValueError, match=r"params/a/kernel: lower\(premasked=True\) needs weights"):
        fast(sparams, sstate, x)
    with pytest.raises(ValueError, match="choose one"):
        sfn.lower(sstate, packed=True, premasked=True)


def test_sites_hand_their_work_to_the_timing(fresh_paths, monkeypatch):
    # The lowering passes the kernel's FLOPs to the path choice; at a compute-bound intensity
    # the candidates are timed over two input sets, otherwise over enough to pass the L2.
    sfn, sparams, sstate, x = _setup(seed=11)
    copies = []
    monkeypatch.setattr(pc, "_measuring_pays", lambda: True)
    monkeypatch.setattr(pc, "measure", lambda c, s, **kw: copies.append(kw["copies"]) or
                        {"kernel": 5.0, "xla_dense": 10.0})
    sfn.lower(sstate, interpret=True).rewritten_jaxpr(sparams, sstate, x)
    assert copies and all(c > 2 for c in copies)          # a tiny site: memory-bound
    pc.clear_cache()
    copies.clear()
    monkeypatch.setattr(pc, "COMPUTE_BOUND_INTENSITY", 1e-3)
    sfn.lower(sstate, interpret=True).rewritten_jaxpr(sparams, sstate, x)
    assert copies and all(c == 2 for c in copies)
