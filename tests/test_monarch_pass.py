"""The Monarch / block-diagonal pass: projection at init, factor multiplies at sites."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import sparsejax as sj
from sparsejax import monarch


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(32, name="up")(x)
        return x + nn.Dense(x.shape[-1], name="down")(nn.gelu(h)), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)(name="layers")(x, None)
        return nn.DenseGeneral((2, 5), name="head")(x)


def _setup():
    model = Scanned()
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    return model.apply, model.init(jax.random.key(1), x), x


def _structured(params, path_keys, nblocks, key):
    """Replaces the kernels at ``path_keys`` by exactly Monarch-structured matrices."""
    params = jax.tree.map(lambda a: a, params)
    for i, keys in enumerate(path_keys):
        node = params
        for k in keys[:-1]:
            node = node[k]
        leaf = node[keys[-1]]
        *stack, k_dim, n_dim = leaf.shape
        f = monarch.init_factors(jax.random.fold_in(key, i), k_dim, n_dim, nblocks,
                                 stack_shape=tuple(stack))
        node[keys[-1]] = monarch.to_dense(f, k_dim, n_dim)
    return params


@pytest.fixture
def fake_timing(monkeypatch):
    """Sites measure their paths (on CPU too) with the ``measure`` handed to the returned
    function, from an empty path cache; the cache is emptied again afterwards."""
    from sparsejax.kernels import path_choice as pc

    monkeypatch.delenv("SPARSEJAX_PATH_CACHE", raising=False)
    pc.clear_cache()
    monkeypatch.setattr(pc, "_measuring_pays", lambda: True)
    yield lambda measure: monkeypatch.setattr(pc, "measure", measure)
    pc.clear_cache()


def _monarch_model(pattern="*layers/*/kernel"):
    """The scanned model of ``_setup`` with Monarch(4) on ``pattern``: (sfn, sparams, sstate, x)."""
    fn, params, x = _setup()
    sfn = sj.sparsify(fn, sj.Monarch(pattern, nblocks=4, init="random"))
    sparams, sstate = sfn.init(params, x)
    return sfn, sparams, sstate, x


def test_structured_weights_give_the_same_outputs():
    fn, params, x = _setup()
    params = _structured(params, [("params", "layers", "up", "kernel"),
                                  ("params", "layers", "down", "kernel")], 4, jax.random.key(5))
    sfn = sj.sparsify(fn, sj.Monarch("*layers/*/kernel", nblocks=4))
    sparams, sstate = sfn.init(params, x)
    assert sparams["params"]["layers"]["up"]["kernel"]["w1"].shape[0] == 3  # per layer
    chex.assert_trees_all_close(sfn(sparams, sstate, x), fn(params, x), rtol=2e-5, atol=2e-5)
    # the rewritten program multiplies by the factors: no dense (3, 16, 32) kernel in it
    jaxpr = str(sfn.rewritten_jaxpr(sparams, sstate, x))
    assert "f32[3,16,32]" not in jaxpr and "f32[16,32]" not in jaxpr


def test_projection_beats_random_factors_on_dense_weights():
    fn, params, x = _setup()
    proj = sj.sparsify(fn, sj.Monarch("*layers/up/kernel", nblocks=4))
    rand = sj.sparsify(fn, sj.Monarch("*layers/up/kernel", nblocks=4, init="random"))
    errors = []
    for sfn in (proj, rand):
        sparams, sstate = sfn.init(params, x)
        dense = sfn.dense_params(sparams, sstate)["params"]["layers"]["up"]["kernel"]
        errors.append(float(jnp.linalg.norm(dense - params["params"]["layers"]["up"]["kernel"])))
    assert errors[0] < 0.8 * errors[1]


def test_sparse_to_dense_preserves_outputs():
    fn, params, x = _setup()
    sfn = sj.sparsify(fn, [sj.Monarch("*layers/*/kernel", nblocks=4, init="random"),
                           sj.BlockDiagonal("*head/kernel", nblocks=2)])
    sparams, sstate = sfn.init(params, x, rng=jax.random.key(3))
    dense = sfn.dense_params(sparams, sstate)
    assert jax.tree.structure(dense) == jax.tree.structure(params)
    chex.assert_trees_all_close(fn(dense, x), sfn(sparams, sstate, x), rtol=1e-5, atol=1e-5)


def test_gradients_flow_to_factors_and_match_dense_chain_rule():
    fn, params, x = _setup()
    sfn = sj.sparsify(fn, sj.Monarch("*layers/down/kernel", nblocks=2, init="random"))
    sparams, sstate = sfn.init(params, x)
    loss = lambda p: jnp.sum(jnp.tanh(sfn(p, sstate, x)))
    via_dense = lambda p: jnp.sum(jnp.tanh(fn(sfn.dense_params(p, sstate), x)))
    chex.assert_trees_all_close(jax.grad(loss)(sparams), jax.grad(via_dense)(sparams),
                                rtol=1e-4, atol=1e-5)


def test_report_counts_params_and_flops_saved():
    fn, params, x = _setup()
    sfn = sj.sparsify(fn, sj.Monarch("*layers/*/kernel", nblocks=4))
    sfn.init(params, x)
    rows = {r.path: r for r in sfn.report().rows}
    up = rows["params/layers/up/kernel"]
    assert up.params_before == 3 * 16 * 32
    assert up.params_after == 3 * monarch.param_count(16, 32, 4)
    assert up.flops_after < up.flops_before and "dense fallback" not in up.kernel


def test_nnx_model():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b = nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 8, rngs=rngs)

        def __call__(self, x):
            return self.b(jax.nn.relu(self.a(x)))

    graphdef, state = nnx.split(Net(nnx.Rngs(0)))
    fn = lambda s, x: nnx.merge(graphdef, s)(x)
    x = jax.random.normal(jax.random.key(1), (4, 16))
    sfn = sj.sparsify(fn, sj.Monarch("a/kernel", nblocks=4, init="random"))
    sparams, sstate = sfn.init(state, x)
    chex.assert_trees_all_close(sfn(sparams, sstate, x),
                                fn(sfn.dense_params(sparams, sstate), x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nblocks,match", [(0, "nblocks must be an integer >= 1"),
                                           (17, r"params/layers/up/kernel: Monarch.*min\(K, N\) = 16")])
def test_bad_nblocks(nblocks, match):
    fn, params, x = _setup()
    with pytest.raises(ValueError, match=match):
        sj.sparsify(fn, sj.Monarch("*layers/up/kernel", nblocks=nblocks)).init(params, x)


def test_projection_of_nan_names_the_path():
    fn, params, x = _setup()
    params = jax.tree.map(lambda a: a, params)
    params["params"]["layers"]["up"]["kernel"] = params["params"]["layers"]["up"]["kernel"].at[0, 0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"params/layers/up/kernel.*NaN"):
        sj.sparsify(fn, sj.Monarch("*layers/up/kernel", nblocks=4)).init(params, x)


def test_weight_mixing_axes_is_refused():
    # the weight is reshaped so one leaf axis feeds both K and N: not a matrix layout
    params = {"w": jax.random.normal(jax.random.key(0), (64,))}
    fn = lambda p, x: x @ p["w"].reshape(8, 8)
    with pytest.raises(ValueError, match=r"w: Monarch.*mix the reduction and output"):
        sj.sparsify(fn, sj.Monarch("w", nblocks=2)).init(params, jnp.ones((2, 8)))


@pytest.mark.parametrize("path", ["einsum", "xla_dense", "fused_kernel"])
def test_each_path_of_a_monarch_site_computes_the_same(path, monkeypatch):
    from sparsejax.kernels import path_choice as pc

    monkeypatch.delenv("SPARSEJAX_PATH_CACHE", raising=False)
    pc.clear_cache()
    fn, params, x = _setup()
    sfn = sj.sparsify(fn, sj.Monarch("*layers/*/kernel", nblocks=4, init="random"))
    sparams, sstate = sfn.init(params, x)
    want = fn(sfn.dense_params(sparams, sstate), x)
    with pc.mode(f"force:{path}"):
        y = sfn(sparams, sstate, x)
        jaxpr = str(sfn.rewritten_jaxpr(sparams, sstate, x))
    chex.assert_trees_all_close(y, want, rtol=2e-5, atol=2e-5)
    kernels = {r.path: r.kernel for r in sfn.report().rows}
    if path == "xla_dense":   # the dense matrices are rebuilt from the factors before the scan
        assert "f32[3,16,32]" in jaxpr and kernels["params/layers/up/kernel"] == (
            "dense rebuilt from the factors once before the scan, XLA dot; per layer: "
            "dense from factors, XLA dot (forced)")
    else:   # no fused kernel on the CPU: forcing it gives the deterministic choice, the einsums
        assert "f32[16,32]" not in jaxpr
        assert kernels["params/layers/up/kernel"] == (
            "Monarch einsums (forced)" if path == "einsum" else "Monarch einsums")


def test_monarch_site_takes_the_measured_winner(fake_timing):
    fake_timing(lambda c, s, **kw: {"einsum": 30.0, "xla_dense": 10.0})
    sfn, sparams, sstate, x = _monarch_model()
    assert "f32[3,16,32]" in str(sfn.rewritten_jaxpr(sparams, sstate, x))
    assert {r.path: r.kernel for r in sfn.report().rows}["params/layers/up/kernel"] == (
        "dense rebuilt from the factors once before the scan, XLA dot; per layer: "
        "dense from factors, XLA dot (10 µs, measured)")


def _scan_body_dots(closed) -> list:
    """The operand shapes of every dot_general inside the program's scan bodies."""
    from sparsejax.compiler.interpreter import sub_jaxprs

    found = []

    def walk(jaxpr, inside):
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general" and inside:
                found.append(tuple(tuple(v.aval.shape) for v in e.invars))
            for _, sub in sub_jaxprs(e):
                walk(sub, inside or e.primitive.name == "scan")
    walk(closed.jaxpr, False)
    return found


def test_rebuilt_weights_are_multiplied_out_before_the_scan(fake_timing):
    """Where every site of a stacked Monarch weight in a scan body chose the dense rebuild, the
    rebuild runs once for every layer before the scan (one batched product forward, one
    backward) and the body multiplies by plain weights, as the dense program does; a weight
    whose site chose the einsums keeps them in the body. Values and factor gradients are the
    einsums'."""
    from sparsejax.kernels import path_choice as pc

    # up (16 -> 32) is cheaper rebuilt, down (32 -> 16) through the einsums
    fake_timing(lambda c, specs, **kw: (
        {"einsum": 30.0, "xla_dense": 10.0} if specs[0].shape[-1] == 16
        else {"einsum": 10.0, "xla_dense": 30.0}))
    sfn, sparams, sstate, x = _monarch_model()
    body = _scan_body_dots(sfn.rewritten_jaxpr(sparams, sstate, x))
    assert ((2, 5, 16), (16, 32)) in body                   # up: the dense program's own dot
    assert not any(len(a) == 4 for a, _ in body)            # its rebuild (4-D blocks) is outside
    assert any(len(a) == 3 and a[-1] == 8 for a, _ in body)   # down: its einsums stay inside
    kernels = {r.path: r.kernel for r in sfn.report().rows}
    assert kernels["params/layers/up/kernel"].startswith("dense rebuilt from the factors once")
    assert kernels["params/layers/down/kernel"].startswith("Monarch einsums")

    loss = lambda p: jnp.sum(jnp.sin(sfn(p, sstate, x)))
    y, g = sfn(sparams, sstate, x), jax.grad(loss)(sparams)
    with pc.mode("force:einsum"):
        sfn.invalidate()
        y_ref, g_ref = sfn(sparams, sstate, x), jax.grad(loss)(sparams)
    # the report follows the latest trace: the einsums, nothing hoisted
    assert {r.path: r.kernel for r in sfn.report().rows}["params/layers/up/kernel"] == (
        "Monarch einsums (forced)")
    chex.assert_trees_all_close(y, y_ref, rtol=2e-5, atol=2e-5)
    chex.assert_trees_all_close(g, g_ref, rtol=2e-4, atol=2e-5)


def test_no_second_trace_of_a_scan_where_every_choice_is_the_default():
    """On the CPU with nothing remembered the einsums are the only answer: the scan body is
    traced once (no rebuild to hoist, nothing to ask)."""
    from sparsejax.compiler import interpreter
    from sparsejax.kernels import path_choice as pc

    pc.clear_cache()
    fn, params, x = _setup()
    sfn = sj.sparsify(fn, sj.Monarch("*layers/*/kernel", nblocks=4, init="random"))
    sparams, sstate = sfn.init(params, x)
    calls = []
    real = interpreter.jax.eval_shape
    try:
        interpreter.jax.eval_shape = lambda f, *a: calls.append(1) or real(f, *a)
        sfn.rewritten_jaxpr(sparams, sstate, x)
    finally:
        interpreter.jax.eval_shape = real
    assert calls == []


def test_a_monarch_site_can_take_the_block_sparse_products(fake_timing, monkeypatch):
    # Measured fastest (faked here), a site multiplies by its factors as two block-sparse
    # products; on the CPU the candidate is refused (no kernel) and never measured.
    from sparsejax.compiler.passes import factorized
    from sparsejax.kernels import monarch_block_sparse

    times = {"einsum": 30.0, "xla_dense": 20.0, "block_sparse": 10.0}
    fake_timing(lambda c, s, **kw: {x.name: times[x.name] for x in c if x.name in times})
    sfn, sparams, sstate, x = _monarch_model()
    want = sfn(sparams, sstate, x)
    assert "block-sparse" not in {r.path: r.kernel for r in sfn.report().rows}["params/layers/up/kernel"]
    monkeypatch.setattr(monarch_block_sparse, "SIDES", (4, 2, 1))      # the test model's small factors
    monkeypatch.setattr(factorized.monarch_block_sparse, "supported", lambda *a, **k: None)
    monkeypatch.setattr(factorized, "BLOCK_SPARSE_MIN_TOKENS", 1)     # the test model's 10 tokens
    from sparsejax.kernels import path_choice as pc
    pc.clear_cache()
    sfn, sparams, sstate, x = _monarch_model()
    y = sfn(sparams, sstate, x)
    chex.assert_trees_all_close(y, want, rtol=2e-5, atol=2e-5)
    kernels = {r.path: r.kernel for r in sfn.report().rows}
    assert kernels["params/layers/up/kernel"].startswith(
        "Monarch as two block-sparse products (block-sparse kernel) (10 µs")


def test_block_sparse_monarch_is_no_candidate_at_decode():
    from sparsejax.compiler.passes import factorized
    factors = {"w1": jax.ShapeDtypeStruct((4, 256, 256), jnp.bfloat16),
               "w2": jax.ShapeDtypeStruct((4, 1024, 256), jnp.bfloat16)}
    for tokens in (1, 8, factorized.BLOCK_SPARSE_MIN_TOKENS - 1):
        assert "decode" in factorized.block_sparse_monarch_unsupported((tokens, 1024), factors)
    # at prefill and training sizes the kernel module answers (on the CPU: no kernel here)
    assert "decode" not in factorized.block_sparse_monarch_unsupported((8192, 1024), factors)


def test_fused_kernel_support_is_asked_of_the_kernel_module(monkeypatch):
    # On a GPU the pass asks the kernel module whether the fused kernel applies; on CPU it
    # never reaches that call, so pretend to be on a GPU and check the answer is a reason or None.
    from sparsejax.compiler.passes import factorized
    monkeypatch.setattr(factorized.jax, "default_backend", lambda: "gpu")
    factors = {"w1": jax.ShapeDtypeStruct((4, 32, 32), jnp.bfloat16),
               "w2": jax.ShapeDtypeStruct((4, 32, 32), jnp.bfloat16)}
    why = factorized.fused_monarch_unsupported((64, 128), factors)
    assert why is None or isinstance(why, str)
    f32 = {k: jax.ShapeDtypeStruct(v.shape, jnp.float32) for k, v in factors.items()}
    assert "bfloat16" in factorized.fused_monarch_unsupported((64, 128), f32)
    # decode-size inputs never take it (slower than the einsums there, and a minute to compile)
    for tokens in (1, 8, factorized.FUSED_MIN_TOKENS - 1):
        assert "decode" in factorized.fused_monarch_unsupported((tokens, 128), factors)


def test_a_stacked_weights_dense_rebuild_is_recorded_as_movable(fake_timing):
    """Timed alone the rebuild is paid per call; in a scan it can run once for every layer, so
    the choice recorded for program tuning marks it movable (tried whatever it measured),
    and the tuner's list holds it though the einsums won alone by 3x."""
    from sparsejax.kernels import path_choice as pc
    from sparsejax.kernels import program_tuning

    fake_timing(lambda c, s, **kw: {"einsum": 10.0, "xla_dense": 30.0})
    sfn, sparams, sstate, x = _monarch_model()
    loss = lambda p: jnp.sum(jnp.sin(sfn(p, sstate, x)))
    for program in (lambda: sfn.rewritten_jaxpr(sparams, sstate, x),      # forward
                    lambda: jax.make_jaxpr(jax.grad(loss))(sparams)):       # with its backward
        with pc.recording() as seen:
            program()
        assert seen and all(movable == ("xla_dense",) for _, _, movable in seen.values())
        tries = program_tuning.close_calls(dict(seen), 0.25)
        assert {(was, path) for _, was, path, _, _ in tries} == {("einsum", "xla_dense")}
        assert len(tries) == len(seen)


@pytest.mark.parametrize("tokens", [16, 4096])
def test_the_other_permutation_spelling_is_a_gpu_candidate_computing_the_same(tokens, monkeypatch):
    # The einsums spell the permutation P1 one of two ways, chosen by a rule of thumb; the
    # other is a candidate the device times. Off a GPU it is not offered (deterministic).
    from sparsejax.compiler.passes import factorized
    k = jax.random.split(jax.random.key(tokens), 3)
    factors = {"w1": jax.random.normal(k[0], (4, 8, 8)), "w2": jax.random.normal(k[1], (4, 8, 8))}
    leaves = jax.tree.leaves(factors)
    unflat = lambda f: jax.tree.unflatten(jax.tree.structure(factors), f)
    cand = factorized._other_permutation((tokens, 32), factors, 32, unflat)
    assert cand.unsupported is not None and "GPU" in cand.unsupported
    # 8 p <= tokens makes block-major rows the default; the candidate is the other spelling.
    assert cand.name == ("einsum_transpose" if 8 * 8 <= tokens else "einsum_runs")
    x = jax.random.normal(k[2], (tokens, 32))
    want = x @ monarch.to_dense(factors, 32, 32)
    chex.assert_trees_all_close(cand.fn(x, *leaves), want, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(factorized.jax, "default_backend", lambda: "gpu")
    assert factorized._other_permutation((tokens, 32), factors, 32, unflat).unsupported is None


class MixedPrecisionProjection(nn.Module):
    """Flax mixed precision: float32 params, the kernel cast to bfloat16 before its dot."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(96, dtype=jnp.bfloat16, param_dtype=jnp.float32, name="proj")(x)


def _dot_generals(jaxpr):
    """Every dot_general of an open jaxpr, those of its sub-jaxprs included."""
    from sparsejax.compiler.interpreter import sub_jaxprs
    dots = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            dots.append(eqn)
        for _, sub in sub_jaxprs(eqn):
            dots.extend(_dot_generals(sub))
    return dots


def _operand_dtypes(eqn):
    return [jnp.dtype(v.aval.dtype) for v in eqn.invars]


@pytest.mark.parametrize("path", ["einsum", "xla_dense"])
def test_monarch_site_multiplies_in_the_dtype_the_dense_dot_consumes(path, monkeypatch):
    # A training step holds float32 master params and computes in bf16: the dense dot
    # multiplies the kernel cast to bf16, so the Monarch site must multiply bf16 factors,
    # not promote the bf16 activation and float32 factors to float32 GEMMs.
    from sparsejax.kernels import path_choice as pc

    monkeypatch.delenv("SPARSEJAX_PATH_CACHE", raising=False)
    pc.clear_cache()
    signatures = []
    choose = pc.choose
    monkeypatch.setattr(pc, "choose", lambda op, signature, *a, **kw: (
        signatures.append(signature), choose(op, signature, *a, **kw))[1])
    model = MixedPrecisionProjection()
    x_init = jax.random.normal(jax.random.key(0), (2, 8, 64))
    params = model.init(jax.random.key(1), x_init)
    sfn = sj.sparsify(model.apply, sj.Monarch("*proj/kernel", nblocks=4, init="random"))
    sparams, sstate = sfn.init(params, x_init)
    assert {f.dtype for f in jax.tree.leaves(sparams["params"]["proj"]["kernel"])} == {
        jnp.dtype(jnp.float32)}
    lowered = sfn.lower(sstate)
    x = jax.random.normal(jax.random.key(2), (2, 8, 64))   # fresh inputs, not init's
    bf16 = jnp.dtype(jnp.bfloat16)
    loss = lambda p: jnp.sum(jnp.square(lowered(p, sstate, x).astype(jnp.float32)))

    with pc.mode(f"force:{path}"):
        forward = _dot_generals(jax.make_jaxpr(lambda p: lowered(p, sstate, x))(sparams).jaxpr)
        backward = _dot_generals(jax.make_jaxpr(jax.grad(loss))(sparams).jaxpr)
        y = lowered(sparams, sstate, x)
        unlowered = sfn(sparams, sstate, x)
    assert "dense fallback" not in {r.path: r.kernel for r in lowered.report().rows}[
        "params/proj/kernel"]
    assert signatures and all("dtype=bfloat16" in s for s in signatures), signatures
    # Every dot of the factored product multiplies bf16 by bf16, as the dense program does.
    assert forward and all(_operand_dtypes(e) == [bf16, bf16] for e in forward)
    # The gradient reruns those forward dots; the backward's dots multiply a cotangent by
    # the bf16 factors or activation: none is a float32 x float32 GEMM.
    assert sum(_operand_dtypes(e) == [bf16, bf16] for e in backward) >= len(forward)
    assert all(bf16 in _operand_dtypes(e) for e in backward)

    assert y.dtype == bf16
    chex.assert_trees_all_close(y, unlowered, rtol=jnp.finfo(bf16).eps, atol=jnp.finfo(bf16).eps)
    # The dense program on the Monarch matrix: bf16 rounds W once, the factored product
    # rounds its factors and its intermediate; they agree to a few bf16 roundings.
    dense = model.apply(sfn.dense_params(sparams, sstate), x)
    chex.assert_trees_all_close(y.astype(jnp.float32), dense.astype(jnp.float32),
                                rtol=4 * jnp.finfo(bf16).eps, atol=4 * jnp.finfo(bf16).eps)
    pc.clear_cache()


@pytest.mark.parametrize("differentiate", [False, True])
def test_monarch_site_is_timed_against_the_stored_dense_weight(differentiate, fake_timing):
    # The dense program multiplies by a stored (K, N) weight. The site's xla_dense candidate
    # must pay what it costs in the sparse program (rebuilding that matrix from the factors
    # every call), and the baseline the site is reported against is the stored weight's dot,
    # timed with its own inputs; it is never a path the site takes.
    from sparsejax.compiler.interpreter import sub_jaxprs

    seen = {}

    def fake_measure(cands, specs, **kw):
        for c in cands:
            seen[c.name] = (c.fn, specs)
        return {c.name: {"einsum": 30.0, "xla_dense": 40.0, "dense_weight": 5.0}[c.name]
                for c in cands}

    fake_timing(fake_measure)
    sfn, sparams, sstate, x = _monarch_model("*layers/up/kernel")
    if differentiate:
        jax.grad(lambda p: jnp.sum(sfn(p, sstate, x) ** 2))(sparams)
    else:
        sfn(sparams, sstate, x)
    assert set(seen) == {"einsum", "xla_dense", "dense_weight"}

    def dots(jaxpr):
        return sum((e.primitive.name == "dot_general")
                   + sum(dots(s) for _, s in sub_jaxprs(e)) for e in jaxpr.eqns)

    rebuild_fn, specs = seen["xla_dense"]
    assert [tuple(s.shape) for s in specs] == [(10, 16), (4, 4, 4), (4, 8, 4)]   # x, w1, w2
    # Timed from the factors: the rebuild's product, then the dot (and, differentiated, the
    # backward through the rebuild as well).
    assert dots(jax.make_jaxpr(rebuild_fn)(*specs).jaxpr) == (2 if not differentiate else 6)
    ref_fn, ref_specs = seen["dense_weight"]
    assert [tuple(s.shape) for s in ref_specs] == [(10, 16), (16, 32)]
    assert dots(jax.make_jaxpr(ref_fn)(*ref_specs).jaxpr) == (1 if not differentiate else 3)
    assert {r.path: r.kernel for r in sfn.report().rows}["params/layers/up/kernel"] == (
        "Monarch einsums (30 µs vs dense 5 µs, 0.17×, measured)")


def test_hoisting_beside_a_lowered_block_sparse_site_in_the_same_scan(fake_timing):
    """The scan body's first, shapes-only trace also runs the other sites in it (here a lowered
    block-sparse kernel): nothing of it may leak into the program, whose values and gradients
    are the masked program's."""
    from sparsejax.kernels import path_choice as pc

    fake_timing(lambda c, s, **kw: {
        k.name: {"einsum": 30.0, "xla_dense": 10.0, "kernel": 5.0}.get(k.name, 50.0) for k in c})
    fn, params, x = _setup()
    sfn = sj.sparsify(fn, [sj.Monarch("*layers/up/kernel", nblocks=4, init="random"),
                           sj.Block("*layers/down/kernel", 0.5, block=(8, 8))])
    sparams, sstate = sfn.init(params, x)
    low = sfn.lower(sstate, interpret=True)
    loss = lambda f: lambda p: jnp.sum(jnp.sin(f(p, sstate, x)))
    y, g = jax.jit(low)(sparams, sstate, x), jax.grad(loss(low))(sparams)
    kernels = {r.path: r.kernel for r in low.report().rows}
    assert kernels["params/layers/up/kernel"].startswith("dense rebuilt from the factors once")
    assert kernels["params/layers/down/kernel"].startswith("block-sparse kernel")
    with pc.mode("off"):
        sfn.invalidate()
        chex.assert_trees_all_close(y, sfn(sparams, sstate, x), rtol=1e-4, atol=1e-5)
        chex.assert_trees_all_close(g, jax.grad(loss(sfn))(sparams), rtol=1e-3, atol=1e-5)


def test_premasked_copy_holds_the_dense_product_and_computes_the_same():
    """lower(premasked=True): premask multiplies each Monarch leaf out once and stores the
    product beside its factors; the copy computes what the sparsified function does on
    every path, the stored product's dot is the dense program's own (no rebuild in the
    program), and factors-only params get a one-line error naming premask."""
    from sparsejax.kernels import path_choice as pc

    pc.clear_cache()
    fn, params, x = _setup()
    sfn = sj.sparsify(fn, sj.Monarch("*layers/*/kernel", nblocks=4, init="random"))
    sparams, sstate = sfn.init(params, x)
    low = sfn.lower(sstate, premasked=True)
    stored = low.premask(sparams, sstate)
    up = stored["params"]["layers"]["up"]["kernel"]
    assert up["dense"].shape == (3, 16, 32)
    chex.assert_trees_all_close(up["dense"], sj.monarch.to_dense(sparams["params"]["layers"]["up"]["kernel"],
                                                                 16, 32), rtol=1e-6, atol=1e-6)
    want = sfn(sparams, sstate, x)
    for path in ("einsum", "stored_dense"):
        with pc.mode(f"force:{path}"):
            low.invalidate()
            chex.assert_trees_all_close(low(stored, sstate, x), want, rtol=2e-5, atol=2e-5)
            body = _scan_body_dots(low.rewritten_jaxpr(stored, sstate, x))
        kernels = {r.path: r.kernel for r in low.report().rows}
        if path == "stored_dense":
            assert ((2, 5, 16), (16, 32)) in body and not any(len(a) == 4 for a, _ in body)
            assert kernels["params/layers/up/kernel"] == (
                "stored dense product (premask), XLA dot (forced)")
        else:
            assert any(len(a) == 3 and a[-1] == 4 for a, _ in body)     # the factors' einsums
    # memory: the report counts the stored product beside the factors
    rows = {r.path: r for r in low.report().rows}
    plain = {r.path: r for r in sfn.report().rows}
    assert rows["params/layers/up/kernel"].params_after == (
        plain["params/layers/up/kernel"].params_after + 3 * 16 * 32)
    chex.assert_trees_all_close(low.dense_params(stored, sstate), sfn.dense_params(sparams, sstate))
    with pytest.raises(ValueError, match=r"premasked=True: pass lowered\.premask"):
        low(sparams, sstate, x)
    pc.clear_cache()


def test_a_site_weighs_the_stored_product_by_measurement(fake_timing):
    """Where the stored product's dot measures faster, the site takes it (a signature of its
    own: the candidates differ from the unlowered function's); the unlowered function never
    offers it."""
    from sparsejax.kernels import path_choice as pc

    seen = []

    def measure(cands, specs, **kw):
        seen.append(tuple(c.name for c in cands))
        return {c.name: {"stored_dense": 5.0, "einsum": 10.0}.get(c.name, 30.0) for c in cands}

    fake_timing(measure)
    sfn, sparams, sstate, x = _monarch_model()
    sfn.rewritten_jaxpr(sparams, sstate, x)
    assert seen and all("stored_dense" not in names for names in seen)
    low = sfn.lower(sstate, premasked=True)
    stored = low.premask(sparams, sstate)
    with pc.recording() as rec:
        low.rewritten_jaxpr(stored, sstate, x)
    assert rec and all(k.endswith(",stored_dense,fwd") for k in rec)
    assert {c.name for c, _, _ in rec.values()} == {"stored_dense"}
    assert {r.path: r.kernel for r in low.report().rows}["params/layers/up/kernel"].startswith(
        "stored dense product (premask), XLA dot (5 µs")
