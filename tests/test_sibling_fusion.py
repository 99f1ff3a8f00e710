"""Sibling fusion (``lower(..., fuse_siblings=True)``): block-sparse sites that multiply the same
activation (q/k/v, gate/up) run as one kernel over their concatenated weights and compute
what the masked program computes, values and every member's gradient (Pallas interpret mode)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax.kernels import path_choice as pc
from sparsejax.models import transformer

from kernel_testing import rel_error

D, F, LAYERS = 16, 32, 3
ATTN_FFN = r"re:(q|k|v|o|gate|up|down)"


def _block(x, p):
    """One layer: attention-like q/k/v siblings, then a gated FFN's gate/up siblings."""
    q, k, v = x @ p["q"], x @ p["k"], x @ p["v"]
    h = x + (jnp.tanh(q) * jax.nn.sigmoid(k) + v) @ p["o"]
    return h + (jax.nn.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]


def _shapes():
    return {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D), "gate": (D, F), "up": (D, F),
            "down": (F, D)}


# Inputs drawn by numpy; the programs (masked, lowered, and their gradients) run jitted: one
# program each, where op by op every operation at every new shape was a program to compile.
def _normal(rng, shape, scale=1.0):
    return jnp.asarray((scale * rng.standard_normal(shape)).astype(np.float32))


def _params(stack=()):
    rng = np.random.default_rng(0)
    return {n: _normal(rng, (*stack, *s), 0.2) for n, s in _shapes().items()}


def unrolled(params, x):
    return _block(_block(x, params), params)


def scanned(params, x):
    return jax.lax.scan(lambda h, p: (_block(h, p), None), x, params)[0]


X = _normal(np.random.default_rng(1), (5, D))


def _pallas_calls(fn, sparams, sstate):
    with pc.mode("force:kernel"):
        return str(fn.rewritten_jaxpr(sparams, sstate, X)).count("pallas_call")


def _kernels(fn):
    return {r.path.rsplit("/", 1)[-1]: r.kernel for r in fn.report().rows}


def _check_against_masked(sfn, fast, sparams, sstate):
    loss = lambda f: (lambda p: jnp.sum(jnp.sin(f(p, sstate, X))))
    with pc.mode("force:kernel"):
        y = jax.jit(fast)(sparams, sstate, X)
        g = jax.jit(jax.grad(loss(fast)))(sparams)
    chex.assert_trees_all_close(y, jax.jit(sfn)(sparams, sstate, X), rtol=1e-5, atol=1e-5)
    # A dW for each member: the masked program's to float32 precision (the norm of the
    # difference, as the kernel tests measure it), and exactly zero outside the kept blocks.
    g_ref = jax.jit(jax.grad(loss(sfn)))(sparams)
    for name in g:
        assert rel_error(g[name], g_ref[name]) < 1e-5, name
        assert not np.any(np.asarray(g[name])[~np.asarray(sstate["masks"][name], bool)]), name


def test_unrolled_siblings_run_as_one_kernel_and_match_the_masked_program(fresh_paths):
    sfn = sj.sparsify(unrolled, [sj.Block(ATTN_FFN, 0.5, block=(8, 8))])
    sparams, sstate = sfn.init(_params(), X, rng=jax.random.key(2))
    fast = sfn.lower(sstate, interpret=True, fuse_siblings=True)
    assert _kernels(fast)["k"] == "fusable with q, v (path chosen when traced)"
    # Per layer: q/k/v one kernel, gate/up one, o and down one each (7 without fusion).
    assert _pallas_calls(fast, sparams, sstate) == 2 * 4
    assert _pallas_calls(sfn.lower(sstate, interpret=True), sparams, sstate) == 2 * 7
    _check_against_masked(sfn, fast, sparams, sstate)
    kernels = _kernels(fast)
    assert kernels["q"].startswith("fused with k, v: one block-sparse kernel over the "
                                   "concatenated 16×48 weights"), kernels
    assert kernels["up"].startswith("fused with gate: one block-sparse kernel over the "
                                    "concatenated 16×64 weights"), kernels
    assert not kernels["o"].startswith("fused")
    # XLA's product of the concatenated masked weights, the group's third path, computes it too.
    with pc.mode("force:xla_dense"):   # a fresh copy: rewrites are cached per signature
        fast = sfn.lower(sstate, interpret=True, fuse_siblings=True)
        y = jax.jit(fast)(sparams, sstate, X)
        g = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(fast(p, sstate, X)))))(sparams)
        assert "pallas_call" not in str(fast.rewritten_jaxpr(sparams, sstate, X))
    assert _kernels(fast)["v"].startswith("fused with q, k: XLA dense matmul of the concatenated "
                                          "masked weights")
    chex.assert_trees_all_close(y, jax.jit(sfn)(sparams, sstate, X), rtol=1e-5, atol=1e-5)
    g_ref = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(sfn(p, sstate, X)))))(sparams)
    assert all(rel_error(g[n], g_ref[n]) < 1e-5 for n in g)


def _layer_masks(k, n, block, rng, kinds):
    """Per-layer element masks made of whole blocks: random, empty or full, as ``kinds`` says."""
    kb, nb = -(-k // block[0]), -(-n // block[1])
    blocks = [{"random": rng.random((kb, nb)) < 0.4, "empty": np.zeros((kb, nb), bool),
               "full": np.ones((kb, nb), bool)}[kind] for kind in kinds]
    return jnp.asarray(np.stack([np.kron(b, np.ones(block, bool))[:k, :n] for b in blocks]))


def test_scanned_siblings_fuse_with_per_layer_tables(fresh_paths):
    sfn = sj.sparsify(scanned, [sj.Block(ATTN_FFN, 0.5, block=(8, 8))])
    sparams, sstate = sfn.init(_params((LAYERS,)), X, rng=jax.random.key(3))
    rng = np.random.default_rng(0)
    # Members' layers differ in kept-block counts (an empty and a full layer), so the fused
    # per-layer tables pad and their slots come from different places in each layer.
    kinds = {"q": ("random", "empty", "full"), "k": ("full", "random", "empty"),
             "v": ("empty", "full", "random"), "gate": ("random", "random", "empty"),
             "up": ("full", "empty", "random")}
    masks = dict(sstate["masks"])
    for name, ks in kinds.items():
        masks[name] = _layer_masks(*_shapes()[name], (8, 8), rng, ks)
    sstate = {"masks": masks}
    fast = sfn.lower(sstate, interpret=True, fuse_siblings=True)
    assert _pallas_calls(fast, sparams, sstate) == 4
    _check_against_masked(sfn, fast, sparams, sstate)
    assert _kernels(fast)["gate"].startswith("fused with up: one block-sparse kernel")


@pytest.mark.parametrize("form", ["packed", "premasked"])
def test_packed_and_premasked_siblings_fuse(fresh_paths, form):
    sfn = sj.sparsify(scanned, [sj.Block(ATTN_FFN, 0.5, block=(8, 8))])
    sparams, sstate = sfn.init(_params((LAYERS,)), X, rng=jax.random.key(4))
    fast = sfn.lower(sstate, interpret=True, fuse_siblings=True, **{form: True})
    params = fast.pack(sparams) if form == "packed" else fast.premask(sparams, sstate)
    with pc.mode("force:kernel"):
        y = jax.jit(fast)(params, sstate, X)
        assert str(fast.rewritten_jaxpr(params, sstate, X)).count("pallas_call") == 4
    chex.assert_trees_all_close(y, jax.jit(sfn)(sparams, sstate, X), rtol=1e-5, atol=1e-5)


def test_lm_with_scanned_layers_finds_qkv_and_gate_up(fresh_paths):
    """The benchmark's model (nn.scan over layers, bf16 compute: Flax casts each kernel just
    before its dot, after the first sibling's dot) groups q/k/v and gate/up."""
    cfg = transformer.TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64,
                                        scan_layers=True, dtype="bfloat16")
    model = transformer.TransformerLM(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 8)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(1), tokens)
    sfn = sj.sparsify(model.apply, [sj.Block(r"re:.*(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel",
                                             0.5, block=(8, 8))])
    sparams, sstate = sfn.init(params, tokens, rng=jax.random.key(2))
    fast = sfn.lower(sstate, interpret=True, fuse_siblings=True)
    with pc.mode("force:kernel"):
        jaxpr = str(fast.rewritten_jaxpr(sparams, sstate, tokens))
        y = jax.jit(fast)(sparams, sstate, tokens)
    assert jaxpr.count("pallas_call") == 4           # q/k/v, o, gate/up, down
    kernels = {r.path: r.kernel for r in fast.report().rows}
    assert kernels["params/layers/attn/v/kernel"].startswith(
        "fused with params/layers/attn/q/kernel, params/layers/attn/k/kernel: one block-sparse")
    assert kernels["params/layers/mlp/gate/kernel"].startswith(
        "fused with params/layers/mlp/up/kernel: one block-sparse")
    want = jax.jit(sfn)(sparams, sstate, tokens)
    assert float(jnp.max(jnp.abs(y - want))) < 0.05 * float(jnp.max(jnp.abs(want)))  # bf16


def _three(params, x):
    return jnp.tanh(x @ params["q"]) + (x @ params["k"]) * ((2.0 * x) @ params["v"])


def test_what_is_not_fused(fresh_paths):
    params = {n: _normal(np.random.default_rng(i), (D, D), 0.3) for i, n in enumerate("qkv")}
    # Another block shape: q and k are not siblings; v reads another input.
    sfn = sj.sparsify(_three, [sj.Block("q", 0.5, block=(8, 8)), sj.Block("re:(k|v)", 0.5,
                                                                          block=(8, 16))])
    sparams, sstate = sfn.init(params, X, rng=jax.random.key(5))
    fast = sfn.lower(sstate, interpret=True, fuse_siblings=True)
    assert not any("fus" in k for k in _kernels(fast).values()), _kernels(fast)
    assert _pallas_calls(fast, sparams, sstate) == 3
    # A member whose rule is not lowered (unstructured mask) stays on XLA; the others fuse.
    three = lambda p, x: _three(p, x) + x @ p["o"]
    params["o"] = params["q"]
    sfn = sj.sparsify(three, [sj.Block("re:(q|k|v)", 0.5, block=(8, 8)), sj.Prune("o", 0.5)])
    sparams, sstate = sfn.init(params, X, rng=jax.random.key(6))
    fast = sfn.lower(sstate, interpret=True, fuse_siblings=True)
    assert _pallas_calls(fast, sparams, sstate) == 2          # q/k fused, v alone; o on XLA
    kernels = _kernels(fast)
    assert kernels["q"].startswith("fused with k:") and kernels["o"].startswith("XLA (mask is not")
    assert not kernels["v"].startswith("fused")
    with pc.mode("force:kernel"):
        chex.assert_trees_all_close(jax.jit(fast)(sparams, sstate, X), jax.jit(sfn)(sparams, sstate, X),
                                    rtol=1e-5, atol=1e-5)


def test_group_candidates_agree_and_a_measured_loss_keeps_sites_apart(fresh_paths, monkeypatch):
    sfn = sj.sparsify(unrolled, [sj.Block(ATTN_FFN, 0.5, block=(8, 8))])
    sparams, sstate = sfn.init(_params(), X, rng=jax.random.key(7))
    fast = sfn.lower(sstate, interpret=True, fuse_siblings=True)
    from sparsejax.compiler.passes import sibling_fusion
    traced = next(iter(fast._traces.values()))
    groups = sibling_fusion.find_groups(fast._handlers, traced)
    assert sorted(tuple(p.rsplit("/", 1)[-1] for p in g.paths) for g in groups) == [
        ("gate", "up"), ("gate", "up"), ("q", "k", "v"), ("q", "k", "v")]
    # Every candidate of a group computes each member's masked product from dense weights.
    group = next(g for g in groups if len(g.members) == 3)
    ws = [sparams[n] for n in "qkv"]
    want = [X @ (w * sstate["masks"][n]) for w, n in zip(ws, "qkv")]
    for c in group._candidates(X.shape[0], jnp.float32):
        chex.assert_trees_all_close(jax.jit(c.fn)(X, *ws), want, rtol=1e-5, atol=1e-5)
    # Where fusion measures slower, each member takes its own path.
    monkeypatch.setattr(pc, "_measuring_pays", lambda: True)
    group_times = {"fused_kernel": 9.0, "separate": 5.0, "xla_dense": 8.0}
    site_times = {"kernel": 1.0, "xla_dense": 2.0, "xla_blocks": 3.0}
    monkeypatch.setattr(pc, "measure", lambda cands, specs, **kw: {
        c.name: (group_times if len(specs) > 2 else site_times)[c.name]
        for c in cands if c.unsupported is None})
    assert str(fast.rewritten_jaxpr(sparams, sstate, X)).count("pallas_call") == 2 * 7
    kernels = _kernels(fast)
    assert kernels["k"].startswith("block-sparse kernel (Pallas kernel in interpret mode) (1 µs vs "
                                   "dense 2 µs, 2.00×, "), kernels
    assert ("; not fused with q, v: each sibling on its own path (5 µs vs dense 8 µs, 1.60×, "
            "measured)") in kernels["k"], kernels
    chex.assert_trees_all_close(jax.jit(fast)(sparams, sstate, X), jax.jit(sfn)(sparams, sstate, X),
                                rtol=1e-5, atol=1e-5)
