"""Lowering to the decode kernels through sparsify (interpret mode): N:M sites to the
compressed N:M GEMV, Spark FFN sites to the sparse-input / sparse-output GEMVs."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

from sparsejax import sparsify
from sparsejax.kernels import sparse_output_gemv as sog
from sparsejax.rules import NM, SparkTopK

from kernel_testing import assert_matches_reference, rel_error


def _paths(lowered):
    return {p: [h.site_path(s.key) for s in h.sites] for p, h in lowered._handlers.items()}


def test_nm_sites_take_the_compressed_kernel_and_match_the_masked_program():
    params = {"w": jax.random.normal(jax.random.key(0), (32, 24)),
              "v": jax.random.normal(jax.random.key(1), (24, 8))}
    fn = lambda p, x: jnp.tanh(x @ p["w"]) @ p["v"]
    x = jax.random.normal(jax.random.key(2), (1, 32))
    sfn = sparsify(fn, [NM("w", n=2, m=4), NM("v", n=1, m=4, gradient="ste")])
    sp, ss = sfn.init(params, x)
    from sparsejax.kernels import path_choice

    # The deterministic choice (a GPU would measure, and XLA wins at 1 x 32 there): the kernel.
    with path_choice.mode("off"):
        low = sfn.lower(ss, interpret=True)
        assert rel_error(low(sp, ss, x), sfn(sp, ss, x)) < 1e-5
        paths = _paths(low)
    assert paths["w"] == ["compressed 2:4 GEMV (Pallas)"]
    assert "gradient='ste'" in paths["v"][0]          # STE needs gradients at pruned weights: XLA


def _ffn_params(d=32, d_ff=64, up_major=True):
    ks = jax.random.split(jax.random.key(0), 3)
    up_shape = (d_ff, d) if up_major else (d, d_ff)
    return {"ffn": {"gate": jax.random.normal(ks[0], up_shape) / d ** 0.5,
                    "up": jax.random.normal(ks[1], up_shape) / d ** 0.5,
                    "down": jax.random.normal(ks[2], (d_ff, d)) / d_ff ** 0.5}}


def _ffn_output_major(p, x):
    f = p["ffn"]
    g = jnp.einsum("bd,fd->bf", x, f["gate"])
    u = jnp.einsum("bd,fd->bf", x, f["up"])
    return (jax.nn.silu(g) * u) @ f["down"]


def _ffn_flax_layout(p, x):
    f = p["ffn"]
    return (jax.nn.gelu(x @ f["gate"]) * (x @ f["up"])) @ f["down"]


def test_spark_ffn_sites_take_the_sparse_gemvs_and_match():
    from sparsejax.kernels import path_choice

    x = jax.random.normal(jax.random.key(3), (2, 32))
    sfn = sparsify(_ffn_output_major, [SparkTopK("*", site="ffn", k_frac=0.25)])
    sp, ss = sfn.init(_ffn_params(), x)
    # The deterministic choice (a GPU would measure, and XLA wins at 2 x 32 there): the kernels.
    with path_choice.mode("off"):
        low = sfn.lower(ss, interpret=True)
        assert rel_error(low(sp, ss, x), sfn(sp, ss, x)) < 1e-5
        paths = _paths(low)
    assert paths["ffn/up"] == ["sparse-output GEMV (Pallas)"]
    assert paths["ffn/down"] == ["sparse-input GEMV (Pallas, masked bk64 bn256)"]
    assert paths["ffn/gate"][0].startswith("XLA dense")          # unmeasured: XLA's own product
    with path_choice.mode("off"):
        prims = [e.primitive.name for e in low.rewritten_jaxpr(sp, ss, x).jaxpr.eqns]
    assert prims.count("pallas_call") == 2


@pytest.mark.parametrize("path", ["sparse_input_split", "sparse_input_rows", "xla_dense", "xla_pad2",
                                  "row_gemv"])
def test_every_down_candidate_matches_when_forced(path):
    from sparsejax.kernels import path_choice

    x = jax.random.normal(jax.random.key(9), (1, 32))
    sfn = sparsify(_ffn_output_major, [SparkTopK("*", site="ffn", k_frac=0.25)])
    sp, ss = sfn.init(_ffn_params(d_ff=512), x)
    with path_choice.mode(f"force:{path}"):
        low = sfn.lower(ss, interpret=True)
        out = low(sp, ss, x)
        paths = _paths(low)
        prims = [e.primitive.name for e in low.rewritten_jaxpr(sp, ss, x).jaxpr.eqns]
    assert rel_error(out, sfn(sp, ss, x)) < 1e-5
    if path == "xla_dense":      # every site keeps the program's own dot: no kernel, no extra ops
        assert "pallas_call" not in prims and prims.count("transpose") == 0
    want = {"xla_dense": "XLA dense", "xla_pad2": "XLA dense, the row padded to two",
            "sparse_input_split": "sparse-input GEMV (Pallas, masked bk64 bn256, 4 steps, partial sums)",
            "sparse_input_rows": "sparse-input GEMV (Pallas, rows bc16 span128"}
    if path == "row_gemv":       # the output-major gate on the row-streaming kernel, every output live
        assert paths["ffn/gate"][0].startswith("row-streaming GEMV (Pallas, every output)")
    else:
        assert paths["ffn/down"][0].startswith(want[path])


@pytest.mark.parametrize("path,site,label", [
    ("sparse_input_mma", "ffn/down", "sparse-input GEMV (Pallas, masked bk64 bn256, tensor cores"),
    ("sparse_output_mma", "ffn/up", "sparse-output GEMV (Pallas, tensor cores)")])
def test_tensor_core_candidates_match_at_several_tokens_and_refuse_one(path, site, label):
    from sparsejax.kernels import path_choice

    sfn = sparsify(_ffn_output_major, [SparkTopK("*", site="ffn", k_frac=0.25)])
    x = jax.random.normal(jax.random.key(19), (3, 32))
    sp, ss = sfn.init(_ffn_params(d_ff=512), x)
    with path_choice.mode(f"force:{path}"):
        low = sfn.lower(ss, interpret=True)
        out = low(sp, ss, x)
        assert _paths(low)[site][0].startswith(label)
        one = x[:1]
        low1 = sfn.lower(ss, interpret=True)
        out1 = low1(sp, ss, one)
        assert not _paths(low1)[site][0].startswith(label)     # one row: not a candidate
    assert rel_error(out, sfn(sp, ss, x)) < 1e-5
    assert rel_error(out1, sfn(sp, ss, one)) < 1e-5


def test_flax_layout_up_stays_dense_with_reason_down_is_sparse():
    x = jax.random.normal(jax.random.key(4), (2, 32))
    sfn = sparsify(_ffn_flax_layout, [SparkTopK("*", site="ffn", k_frac=0.25)])
    sp, ss = sfn.init(_ffn_params(up_major=False), x)
    from sparsejax.kernels import path_choice

    with path_choice.mode("off"):     # the deterministic choice (a GPU would measure)
        low = sfn.lower(ss, interpret=True)
        assert rel_error(low(sp, ss, x), sfn(sp, ss, x)) < 1e-5
        paths = _paths(low)
    assert "not contiguous" in paths["ffn/up"][0]
    assert paths["ffn/down"] == ["sparse-input GEMV (Pallas, masked bk64 bn256)"]
    assert paths["ffn/gate"][0].startswith("XLA dense")


def _proj_then_ffn(p, x):
    return _ffn_output_major(p, x) @ p["proj"]


@pytest.mark.parametrize("path,label", [(None, "XLA dense"),
                                        ("stream_gemv", "streaming GEMV"), ("xla_pad2", "XLA dense, the row")])
def test_unruled_dense_weights_take_their_measured_path_and_match(path, label):
    from sparsejax.kernels import path_choice

    params = dict(_ffn_params(), proj=jax.random.normal(jax.random.key(13), (32, 32)) / 6)
    x = jax.random.normal(jax.random.key(14), (1, 32))
    sfn = sparsify(_proj_then_ffn, [SparkTopK("*", site="ffn", k_frac=0.25)])
    sp, ss = sfn.init(params, x)
    with path_choice.mode(f"force:{path}" if path else "off"):
        low = sfn.lower(ss, interpret=True)
        out = low(sp, ss, x)
        paths = _paths(low)
    assert rel_error(out, sfn(sp, ss, x)) < 1e-5
    assert paths["proj"][0].startswith(label) and (path or paths["proj"][0] == label)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="asserts what a CPU does")
def test_without_interpret_on_cpu_every_site_stays_dense():
    x = jax.random.normal(jax.random.key(5), (2, 32))
    sfn = sparsify(_ffn_output_major, [SparkTopK("*", site="ffn", k_frac=0.25)])
    sp, ss = sfn.init(_ffn_params(), x)
    low = sfn.lower(ss)
    assert rel_error(low(sp, ss, x), sfn(sp, ss, x)) < 1e-6
    assert _paths(low)["ffn/down"] == ["XLA dense"]


def test_sparse_output_gemv_writes_live_outputs_and_zeros():
    x = jax.random.normal(jax.random.key(6), (3, 40))
    w_t = jax.random.normal(jax.random.key(7), (37, 40))
    live = jax.random.bernoulli(jax.random.key(8), 0.3, (37,))
    ref = sog.sparse_output_gemv_reference(x, w_t, live)
    y = sog.sparse_output_gemv(x, w_t, live, impl="masked", interpret=True, poison=True, bj=8, bk=16)
    assert_matches_reference(y, ref, 1e-5)
    assert bool(jnp.all(jnp.where(live, True, y == 0)))
    with pytest.raises(ValueError, match="live"):
        sog.sparse_output_gemv(x, w_t, live[:5])


@pytest.mark.parametrize("batch", [2, 4])
def test_sparse_output_gemv_unpadded_writes_the_result_dtype_directly(batch):
    # Rows a power of two and N a multiple of bj: the kernel's own output is the result.
    x = jax.random.normal(jax.random.key(30 + batch), (batch, 48)).astype(jnp.bfloat16)
    w_t = jax.random.normal(jax.random.key(31), (64, 48)).astype(jnp.bfloat16)
    live = jax.random.bernoulli(jax.random.key(32), 0.3, (64,)).astype(jnp.int32)
    ref = sog.sparse_output_gemv_reference(x, w_t, live)
    y = sog.sparse_output_gemv(x, w_t, live, impl="masked", interpret=True, poison=True, bj=16, bk=16)
    assert y.dtype == jnp.bfloat16 and y.shape == (batch, 64)
    assert_matches_reference(y, ref, 1e-2)
    assert bool(jnp.all(jnp.where(live != 0, True, y == 0)))
    prims = [e.primitive.name for e in jax.make_jaxpr(functools.partial(
        sog.sparse_output_gemv, impl="masked", interpret=True, bj=16, bk=16))(x, w_t, live).eqns]
    assert "slice" not in prims and "convert_element_type" not in prims


@pytest.mark.parametrize("batch", [2, 5, 8])
def test_sparse_output_gemv_on_the_tensor_cores_writes_live_outputs_and_zeros(batch):
    x = jax.random.normal(jax.random.key(20 + batch), (batch, 40))
    w_t = jax.random.normal(jax.random.key(30 + batch), (37, 40))
    live = jax.random.bernoulli(jax.random.key(40 + batch), 0.4, (37,))
    ref = sog.sparse_output_gemv_reference(x, w_t, live)
    y = sog.sparse_output_gemv(x, w_t, live, impl="masked", mma=True, interpret=True, poison=True,
                               bj=16, bk=16)
    assert y.shape == ref.shape
    assert_matches_reference(y, ref, 1e-5)
    assert bool(jnp.all(jnp.where(live, True, y == 0)))
    with pytest.raises(ValueError, match="mma=True needs bj, bk >= 16"):
        sog.sparse_output_gemv(x, w_t, live, impl="masked", mma=True, interpret=True, bj=8, bk=16)


def test_streaming_choice_times_every_candidate_over_copies(monkeypatch):
    from sparsejax.kernels import streaming_choice as decode_choice
    from sparsejax.kernels import path_choice

    monkeypatch.setattr(path_choice, "_measuring_pays", lambda: True)
    path_choice.clear_cache()
    seen = []

    def slow(x, w):
        seen.append(w.shape)
        return jnp.tanh(x @ w) @ w.T @ w

    cands = [path_choice.Candidate("slow", slow), path_choice.Candidate("fast", lambda x, w: x @ w)]
    specs = [jax.ShapeDtypeStruct((2, 16), jnp.float32), jax.ShapeDtypeStruct((16, 16), jnp.float32)]
    choice = decode_choice.choose_streaming("test_op", "sig", cands, specs, weight_args=(1,))
    assert choice.source == "measured" and set(choice.times_us) == {"slow", "fast"}
    assert seen and all(s == (16, 16) for s in seen)          # each call reads one copy
    assert path_choice.cache_entries()["test_op|sig|streamed"]["path"] == choice.name
    path_choice.clear_cache()


def test_frozen_packed_nm_weights_give_the_same_answer():
    from sparsejax.compiler.passes import nm_lowering

    params = {"w": jax.random.normal(jax.random.key(0), (32, 24))}
    x = jax.random.normal(jax.random.key(1), (1, 32))
    sfn = sparsify(lambda p, x: x @ p["w"], [NM("w", n=2, m=4)])
    sp, ss = sfn.init(params, x)
    low = sfn.lower(ss, interpret=True)
    nm_lowering.freeze_packed(low, sp, ss)
    assert low._handlers["w"].packed is not None
    assert rel_error(low(sp, ss, x), sfn(sp, ss, x)) < 1e-5


def test_a_kernel_must_beat_xla_by_the_margin_to_be_taken():
    from sparsejax.compiler.passes import sparse_input as si
    from sparsejax.kernels import path_choice

    cands = [path_choice.Candidate(n, None) for n in ("sparse_input", "xla_dense", "xla_pad2")]
    close = path_choice.Choice("sparse_input", "k", "measured",
                               {"sparse_input": 19.5, "xla_dense": 22.0, "xla_pad2": 20.0}, "xla_dense")
    assert si._with_margin(close, cands).name == "xla_pad2"       # 19.5 > 0.95 * 20 - 1.5
    clear = dataclasses.replace(close, times_us={"sparse_input": 10.0, "xla_dense": 22.0, "xla_pad2": 20.0})
    assert si._with_margin(clear, cands).name == "sparse_input"
    unmeasured = dataclasses.replace(close, times_us={})
    assert si._with_margin(unmeasured, cands).name == "sparse_input"


def _dense_decode(p, x):
    h = jnp.tanh(x @ p["w_in"])
    return h @ p["w_out"] + jnp.einsum("bd,nd->bn", x, p["w_t"])


@pytest.mark.parametrize("path,label", [("stream_gemv", "streaming GEMV"), ("row_gemv", "row-streaming GEMV"),
                                        ("xla_pad2", "XLA dense, the row padded to two")])
def test_dense_gemv_gives_a_model_with_no_rule_the_measured_gemv_paths(path, label):
    from sparsejax.kernels import path_choice

    ks = jax.random.split(jax.random.key(21), 4)
    params = {"w_in": jax.random.normal(ks[0], (40, 72)) / 6, "w_out": jax.random.normal(ks[1], (72, 24)) / 8,
              "w_t": jax.random.normal(ks[2], (24, 40)) / 6}
    x = jax.random.normal(ks[3], (1, 40))
    sfn = sparsify(_dense_decode, [])
    sp, ss = sfn.init(params, x)
    assert _paths(sfn.lower(ss, interpret=True)) == {}        # no activation rule: nothing to choose
    with path_choice.mode(f"force:{path}"):
        low = sfn.lower(ss, interpret=True, dense_gemv=True)
        out = low(sp, ss, x)
        paths = _paths(low)
        prims = [e.primitive.name for e in low.rewritten_jaxpr(sp, ss, x).jaxpr.eqns]
    assert rel_error(out, _dense_decode(params, x)) < 1e-5
    assert set(paths) == {"w_in", "w_out", "w_t"}
    # a forced kernel exists for one layout only: (K, N) weights stream rows, (N, K) weights rows of outputs
    taken = [p for site_paths in paths.values() for p in site_paths if p.startswith(label)]
    assert taken, paths
    if path != "xla_pad2":
        assert "pallas_call" in prims
    report = str(low.report())
    assert "weights no rule touched, on a chosen path (3):" in report and label in report
    # Differentiated, every site computes XLA's product (the kernels have no backward pass)
    with path_choice.mode(f"force:{path}"):
        grads = jax.grad(lambda p: low(p, ss, x).sum())(sp)
    want = jax.grad(lambda p: _dense_decode(p, x).sum())(params)
    for k in params:
        assert rel_error(grads[k], want[k]) < 1e-5, k
    with pytest.raises(ValueError, match="dense_gemv must be a bool"):
        sfn.lower(ss, interpret=True, dense_gemv="yes")


def test_up_sites_read_their_live_mask_from_the_spark_hook_not_a_second_top_k(monkeypatch):
    from sparsejax import topk
    from sparsejax.kernels import path_choice

    modes = []
    original = topk.statistical_topk

    def counting(x, *args, **kwargs):
        modes.append(kwargs.get("mode"))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(topk, "statistical_topk", counting)
    x = jax.random.normal(jax.random.key(3), (3, 32))
    sfn = sparsify(_ffn_output_major, [SparkTopK("*", site="ffn", k_frac=0.25)])
    sp, ss = sfn.init(_ffn_params(), x)
    with path_choice.mode("off"):
        low = sfn.lower(ss, interpret=True)
        modes.clear()
        out = low(sp, ss, x)
        assert _paths(low)["ffn/up"] == ["sparse-output GEMV (Pallas)"]
    assert modes and "mask" not in modes           # the hook's top-k only: no second one
    assert rel_error(out, sfn(sp, ss, x)) < 1e-5
