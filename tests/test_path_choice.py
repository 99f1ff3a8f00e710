"""The per-site path choice: deterministic on CPU, forced on request, remembered when measured."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.kernels import device_timing as dtm
from sparsejax.kernels import path_choice as pc


def _candidates():
    dense = lambda x, w: x @ w
    slow = lambda x, w: (x[:, :, None] * w[None]).sum(1)
    return [pc.Candidate("kernel", slow, unsupported="no kernel on cpu"),
            pc.Candidate("einsum", slow, describe="einsum path"),
            pc.Candidate("xla_dense", dense, describe="XLA dense")]


SPECS = [jax.ShapeDtypeStruct((8, 16), jnp.float32), jax.ShapeDtypeStruct((16, 4), jnp.float32)]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("SPARSEJAX_PATH_CACHE", raising=False)
    pc.clear_cache()
    yield
    pc.clear_cache()


def test_cpu_choice_is_the_first_supported_candidate():
    c = pc.choose("op", "sig", _candidates(), SPECS, baseline="xla_dense")
    assert (c.name, c.source, dict(c.times_us)) == ("einsum", "default", {})
    assert c.summary() == "einsum path"


def test_forced_path_wins_and_unsupported_is_never_forced():
    with pc.mode("force:xla_dense"):
        assert pc.choose("op", "sig", _candidates(), SPECS).name == "xla_dense"
    with pc.mode("force:kernel"):   # unsupported here: the deterministic choice instead
        assert pc.choose("op", "sig", _candidates(), SPECS).name == "einsum"


def test_no_supported_candidate_is_a_clear_error():
    with pytest.raises(ValueError, match="op: no candidate path is supported here: kernel: no kernel"):
        pc.choose("op", "sig", _candidates()[:1], SPECS)


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="path choice mode"):
        pc.set_mode("fastest")


def test_user_cache_file_decides_and_measurements_are_written_there(tmp_path, monkeypatch):
    cache = tmp_path / "paths.json"
    cache.write_text(json.dumps({"entries": {"op|sig": {"path": "xla_dense",
                                                        "times_us": {"einsum": 9.0, "xla_dense": 3.0}}}}))
    monkeypatch.setenv("SPARSEJAX_PATH_CACHE", str(cache))
    c = pc.choose("op", "sig", _candidates(), SPECS, baseline="xla_dense")
    assert (c.name, c.source, c.times_us["einsum"]) == ("xla_dense", "cache", 9.0)
    # A recorded path that is not a candidate any more is ignored, not obeyed.
    cache.write_text(json.dumps({"entries": {"op|sig": {"path": "gone"}}}))
    pc.clear_cache()
    assert pc.choose("op", "sig", _candidates(), SPECS).name == "einsum"


def test_measure_runs_eagerly_while_a_program_is_being_traced():
    seen = {}

    def f(x):
        seen.update(pc.measure(_candidates(), SPECS, calls=1, repeats=1))
        return x + 1

    jax.make_jaxpr(f)(jnp.ones(3))
    assert set(seen) == {"einsum", "xla_dense"} and all(t > 0 for t in seen.values())


def test_measure_reports_the_hosts_enqueue_time_per_input_set():
    enqueue = {}
    times = pc.measure(_candidates(), SPECS, calls=2, repeats=1, copies=3, enqueue_us=enqueue)
    assert set(enqueue) == set(times) == {"einsum", "xla_dense"}
    assert all(0 < v < float("inf") for v in enqueue.values())


def test_host_bound_timings_get_rounds():
    # Device time well above the host's enqueue: one round.
    assert pc.rounds_for(enqueue_s=2e-6, seconds=10e-6, copies=16) == 1
    # Host-bound: rounds give the device three times the enqueue...
    assert pc.rounds_for(enqueue_s=9e-6, seconds=10e-6, copies=16) == 3
    # ...within MAX_ROUNDS and MAX_APPLICATIONS.
    assert pc.rounds_for(enqueue_s=1e-2, seconds=1e-3, copies=64) == pc.MAX_APPLICATIONS // 64
    assert pc.rounds_for(enqueue_s=1e-2, seconds=1e-3, copies=20) == pc.MAX_ROUNDS
    # A slow compile (each application is a kernel to lower) allows fewer rounds, two at least.
    assert pc.rounds_for(enqueue_s=1e-2, seconds=1e-3, copies=20, compile_s=20.0) == 3
    assert pc.rounds_for(enqueue_s=1e-2, seconds=1e-3, copies=20, compile_s=100.0) == 2
    # Rounds that cannot be chained (no floating input or output) are not run.
    assert pc.rounds_for(enqueue_s=9e-6, seconds=10e-6, copies=16, chainable=False) == 1


def test_rounds_are_chained_so_xla_can_neither_merge_nor_fuse_them():
    sets = [[jax.random.normal(jax.random.key(c), (1, 64)), jax.random.normal(jax.random.key(9 + c), (64, 32))]
            for c in range(3)]
    # A one-row product is a reduction over the weight: unchained, XLA would merge identical
    # rounds, or fuse two rounds over the same weight into one pass that reads it once.
    run = pc.over_input_sets(lambda x, w: x @ w, [True, True], rounds=4)
    compiled = jax.jit(run).lower(sets, []).compile().as_text()
    assert compiled.count(" dot(") + compiled.count(" reduce(") >= 12
    out = run(sets, [])
    for c in range(3):        # the chain adds zero: each set's product, unchanged
        np.testing.assert_allclose(out[c], sets[c][0] @ sets[c][1], rtol=1e-6)
    # The chain touches the smallest floating input (the activation), not the weight...
    jaxpr = jax.make_jaxpr(run)(sets, [])
    adds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "add"]
    assert len(adds) == 3 * 3 and all(e.outvars[0].aval.shape == (1, 64) for e in adds)
    # ...also where the activation is shared by every input set and only the weights are drawn.
    x = np.asarray(sets[0][0])
    shared_x = pc.over_input_sets(lambda x, w: x @ w, [False, True], rounds=2)
    jaxpr = jax.make_jaxpr(shared_x)([[w] for _, w in sets], [x])
    adds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "add"]
    assert len(adds) == 3 and all(e.outvars[0].aval.shape == (1, 64) for e in adds)
    # Where every floating input is large, a chain would time a pass over a weight: no rounds.
    assert pc._chain_target([jnp.ones((64, 64)), jnp.ones((64, 64))]) is None


def test_every_application_over_the_input_sets_is_one_trace_and_lowering():
    traced = []

    def kernel_like(x, w):
        traced.append(x.shape)     # once per trace: a Pallas kernel lowers once per trace
        return x @ w

    sets = [[jax.random.normal(jax.random.key(c), (2, 16)), jax.random.normal(jax.random.key(5 + c), (16, 256))]
            for c in range(6)]
    run = pc.over_input_sets(kernel_like, [True, True], rounds=3)
    lowered = jax.jit(run).lower(sets, [])
    assert traced == [(2, 16)]
    # XLA inlines the calls: the compiled program holds every application's product.
    compiled = lowered.compile().as_text()
    assert compiled.count(" dot(") + compiled.count(" reduce(") >= 18
    out = run(sets, [])
    for c in range(6):
        np.testing.assert_allclose(out[c], sets[c][0] @ sets[c][1], rtol=1e-6)


def test_a_host_bound_candidate_is_timed_again_over_rounds(monkeypatch):
    traced = []

    def count(x, w):
        traced.append(x.shape)
        return x @ w

    monkeypatch.setattr(pc, "rounds_for",
                        lambda enqueue_s, seconds, copies, chainable, compile_s: 3 if chainable else 1)
    rounds, enqueue = {}, {}
    gemv = [jax.ShapeDtypeStruct((1, 64), jnp.float32), jax.ShapeDtypeStruct((64, 32), jnp.float32)]
    times = pc.measure([pc.Candidate("xla", count)], gemv, calls=1, repeats=1, copies=4,
                       rounds_us=rounds, enqueue_us=enqueue)
    assert rounds == {"xla": 3} and 0 < times["xla"] < float("inf") and enqueue["xla"] > 0
    # Traced once: every application, of one round or three, calls the same jit of it.
    assert traced == [(1, 64)]


def test_a_candidate_that_fails_over_rounds_keeps_its_one_round_time(monkeypatch):
    real = pc.over_input_sets

    def fails_over_rounds(fn, is_array, rounds=1):
        if rounds > 1:            # a program too large to compile, say
            def too_large(*args):
                raise RuntimeError("too large over rounds")
            return too_large
        return real(fn, is_array, rounds)

    monkeypatch.setattr(pc, "over_input_sets", fails_over_rounds)
    monkeypatch.setattr(pc, "rounds_for", lambda enqueue_s, seconds, copies, chainable, compile_s: 2)
    gemv = [jax.ShapeDtypeStruct((1, 64), jnp.float32), jax.ShapeDtypeStruct((64, 32), jnp.float32)]
    rounds = {}
    with pytest.warns(UserWarning, match="failed over 2 rounds"):
        times = pc.measure([pc.Candidate("xla", lambda x, w: x @ w)], gemv, calls=1, repeats=1,
                           copies=4, rounds_us=rounds)
    assert 0 < times["xla"] < float("inf") and rounds == {"xla": 1}


def test_choice_summary_compares_with_the_baseline():
    c = pc.Choice("kernel", "block-sparse kernel", "measured", {"kernel": 20.0, "xla_dense": 50.0},
                  "xla_dense")
    assert c.summary() == "block-sparse kernel (20 µs vs dense 50 µs, 2.50×, measured)"


def test_measured_choice_is_the_fastest_and_is_remembered(monkeypatch, tmp_path):
    monkeypatch.setattr(pc, "_measuring_pays", lambda: True)
    monkeypatch.setattr(pc, "measure", lambda cands, specs, **kw: {"einsum": 5.0, "xla_dense": 2.0})
    monkeypatch.setenv("SPARSEJAX_PATH_CACHE", str(tmp_path / "c.json"))
    first = pc.choose("op", "sig", _candidates(), SPECS, baseline="xla_dense")
    assert (first.name, first.source) == ("xla_dense", "measured")
    monkeypatch.setattr(pc, "measure", lambda *a, **kw: pytest.fail("measured twice"))
    again = pc.choose("op", "sig", _candidates(), SPECS, baseline="xla_dense")
    assert (again.name, again.source) == ("xla_dense", "cache")
    saved = json.loads((tmp_path / "c.json").read_text())["entries"]["op|sig"]
    assert saved == {"path": "xla_dense", "times_us": {"einsum": 5.0, "xla_dense": 2.0}}
    with pc.mode("off"):
        assert pc.choose("op", "sig", _candidates(), SPECS).name == "einsum"


def test_measure_mode_measures_what_a_table_knows_and_then_reuses_it(monkeypatch, tmp_path):
    cache = tmp_path / "paths.json"
    cache.write_text(json.dumps({"entries": {"op|sig": {"path": "einsum"}}}))
    monkeypatch.setenv("SPARSEJAX_PATH_CACHE", str(cache))
    monkeypatch.setattr(pc, "_measuring_pays", lambda: True)
    monkeypatch.setattr(pc, "measure", lambda cands, specs, **kw: {"einsum": 5.0, "xla_dense": 2.0})
    assert pc.choose("op", "sig", _candidates(), SPECS).source == "cache"     # auto: the file
    with pc.mode("measure"):
        fresh = pc.choose("op", "sig", _candidates(), SPECS)
        assert (fresh.name, fresh.source) == ("xla_dense", "measured")
        monkeypatch.setattr(pc, "measure", lambda *a, **kw: pytest.fail("measured twice"))
        assert pc.choose("op", "sig", _candidates(), SPECS).source == "cache"


def test_a_candidate_that_fails_when_measured_is_never_chosen():
    def broken(x, w):
        raise RuntimeError("kernel does not compile")

    cands = [pc.Candidate("kernel", broken), pc.Candidate("xla_dense", lambda x, w: x @ w)]
    with pytest.warns(UserWarning, match="'kernel' failed while measured"):
        times = pc.measure(cands, SPECS, calls=1, repeats=1)
    assert times["kernel"] == float("inf") and times["xla_dense"] > 0


def _primitives(closed) -> list[str]:
    """Every equation's primitive in a jaxpr, called jaxprs (``jit``) looked into at each call."""
    names = []
    for e in closed.jaxpr.eqns:
        names.append(e.primitive.name)
        inner = e.params.get("jaxpr")
        if inner is not None and hasattr(inner, "jaxpr"):
            names += _primitives(inner)
    return names


def _programs_measured(monkeypatch) -> list:
    """The jaxpr of each program ``measure`` compiles from here on, appended as it compiles."""
    programs = []
    real_compile_all = pc._compile_all

    def spy(candidates, wrap, args):
        programs.extend(jax.make_jaxpr(wrap(c.fn))(*args) for c in candidates)
        return real_compile_all(candidates, wrap, args)

    monkeypatch.setattr(pc, "_compile_all", spy)
    return programs


def test_measure_runs_each_candidate_over_several_input_sets(monkeypatch):
    programs = _programs_measured(monkeypatch)
    times = pc.measure([pc.Candidate("xla", lambda x, w: x @ w)], SPECS, calls=1, repeats=1, copies=3)
    (program,) = programs
    assert _primitives(program).count("dot_general") == 3 and times["xla"] > 0
    # Small inputs get many sets (dispatch and L2 would decide otherwise), large ones one.
    assert pc.copies_for(SPECS) == pc.MAX_COPIES
    # A 1024x1024 bf16 decode weight and its row: streamed past the L2, not held in it.
    gemv = [jax.ShapeDtypeStruct((1, 1024), jnp.bfloat16), jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16)]
    assert pc.copies_for(gemv) * 2 * 1024 * 1024 >= 2 * pc.L2_BYTES
    assert pc.copies_for([jax.ShapeDtypeStruct((8192, 8192), jnp.bfloat16)]) == 2
    assert pc.copies_for([jax.ShapeDtypeStruct((16384, 16384), jnp.float32)]) == 1


def test_each_input_set_is_its_own_buffer_not_a_slice(monkeypatch):
    # A slice of one stacked array is a copy XLA materialises before a custom call: a
    # kernel's timing would carry a read and a write of its whole weight.
    programs = _programs_measured(monkeypatch)
    shared = np.ones((4,), np.float32)        # a concrete input, passed to every copy
    times = pc.measure([pc.Candidate("xla", lambda x, w, bias: x @ w + bias)], [*SPECS, shared],
                       calls=1, repeats=1, copies=3)
    assert times["xla"] > 0
    (program,) = programs
    prims = _primitives(program)
    assert prims.count("dot_general") == 3
    prims = set(prims)
    assert "dot_general" in prims and not prims & {"slice", "dynamic_slice", "gather", "squeeze"}
    assert len(program.jaxpr.invars) == 3 * 2 + 1       # x, w per set; the shared input once


def test_a_candidate_that_disagrees_with_the_reference_is_never_chosen():
    # A "kernel" that is wrong on the device (here: drops the last column's sum) and fast:
    # measuring must not pick it, and must say why.
    wrong = lambda x, w: (x @ w).at[:, -1].set(0.0)
    cands = [pc.Candidate("kernel", wrong), pc.Candidate("xla_dense", lambda x, w: x @ w)]
    with pytest.warns(UserWarning, match="'kernel' disagrees with 'xla_dense' on this device"):
        times = pc.measure(cands, SPECS, calls=1, repeats=1, reference="xla_dense")
    assert times["kernel"] == float("inf") and 0 < times["xla_dense"] < float("inf")
    # A candidate that agrees (another summation order) is timed as usual.
    other = lambda x, w: jnp.einsum("mk,kn->mn", x[:, ::-1], w[::-1])
    cands = [pc.Candidate("kernel", other), pc.Candidate("xla_dense", lambda x, w: x @ w)]
    times = pc.measure(cands, SPECS, calls=1, repeats=1, reference="xla_dense")
    assert all(0 < t < float("inf") for t in times.values())


def test_choose_checks_only_when_asked(monkeypatch):
    monkeypatch.setattr(pc, "_measuring_pays", lambda: True)     # measure on the CPU here
    wrong = lambda x, w: 2.0 * (x @ w)
    cands = [pc.Candidate("kernel", wrong), pc.Candidate("xla_dense", lambda x, w: x @ w)]
    with pytest.warns(UserWarning, match="disagrees"):
        c = pc.choose("op", "sig-checked", cands, SPECS, baseline="xla_dense", check=True)
    assert c.name == "xla_dense" and c.times_us["kernel"] == float("inf")
    # Unchecked (candidates that read different forms of their inputs): timed, not compared.
    c = pc.choose("op", "sig-unchecked", cands, SPECS, baseline="xla_dense")
    assert c.times_us["kernel"] < float("inf")


def test_rel_err_skips_integer_leaves_and_flags_nan():
    ok = {"y": jnp.ones(3), "i": jnp.arange(3)}
    assert pc._rel_err(ok, {"y": jnp.ones(3), "i": jnp.zeros(3, jnp.int32)}) == 0.0
    assert pc._rel_err({"y": jnp.full(3, jnp.nan)}, {"y": jnp.ones(3)}) == float("inf")


def test_compute_bound_sites_are_timed_over_two_input_sets():
    big = [jax.ShapeDtypeStruct((8192, 1024), jnp.bfloat16), jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16)]
    streamed = pc.copies_for(big)
    assert streamed > 2                                        # memory-bound default: past the L2
    flops = 2 * 8192 * 1024 * 1024                             # ~480 FLOP per input byte
    assert pc.copies_for(big, flops) == 2
    assert pc.copies_for(big, flops / 100) == streamed          # a GEMV-like intensity: streamed


def test_pallas_candidates_compile_side_by_side():
    # Candidates are compiled in parallel threads: Pallas kernels (interpret mode here) must
    # lower beside each other and beside XLA's product, and agree with it.
    import warnings
    from sparsejax.kernels import sparse_input_gemv as sig
    specs = [jax.ShapeDtypeStruct((2, 64), jnp.float32), jax.ShapeDtypeStruct((64, 128), jnp.float32)]
    cands = [pc.Candidate(f"masked{bk}", lambda x, w, bk=bk: sig.sparse_input_gemv(
                 x, w, impl="masked", bk=bk, bn=64, interpret=True)) for bk in (16, 32)]
    cands += [pc.Candidate("rows", lambda x, w: sig.sparse_input_gemv(
                  x, w, impl="rows", bc=8, span=32, col_splits=2, interpret=True)),
              pc.Candidate("xla_dense", lambda x, w: x @ w)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no candidate may fail or disagree
        times = pc.measure(cands, specs, calls=1, repeats=1, copies=2, reference="xla_dense")
    assert set(times) == {"masked16", "masked32", "rows", "xla_dense"}
    assert all(0 < t < float("inf") for t in times.values())


def test_a_reference_is_timed_as_the_baseline_and_never_chosen(monkeypatch, tmp_path):
    # A factorized site's xla_dense candidate rebuilds the dense matrix from the factors; what
    # the dense program pays is a dot on a stored weight, with its own arguments. That
    # reference is timed beside the candidates and reported as the baseline, never chosen.
    monkeypatch.setattr(pc, "_measuring_pays", lambda: True)
    calls = []

    def fake_measure(cands, specs, **kw):
        calls.append(([c.name for c in cands], [tuple(s.shape) for s in specs]))
        if [c.name for c in cands] == ["dense"]:
            return {"dense": 2.0}
        return {"einsum": 5.0, "xla_dense": 9.0}

    monkeypatch.setattr(pc, "measure", fake_measure)
    monkeypatch.setenv("SPARSEJAX_PATH_CACHE", str(tmp_path / "c.json"))
    ref = pc.Candidate("dense", lambda x, w: x @ w, describe="stored dense weight")
    ref_specs = [SPECS[0], jax.ShapeDtypeStruct((16, 4), jnp.float32)]
    c = pc.choose("op", "sig", _candidates(), SPECS, baseline="xla_dense", reference=ref,
                  reference_specs=ref_specs)
    assert calls == [(["einsum", "xla_dense"], [(8, 16), (16, 4)]), (["dense"], [(8, 16), (16, 4)])]
    assert (c.name, c.baseline) == ("einsum", "dense")      # fastest, yet not a path
    assert c.summary() == "einsum path (5 µs vs dense 2 µs, 0.40×, measured)"
    again = pc.choose("op", "sig", _candidates(), SPECS, baseline="xla_dense", reference=ref,
                      reference_specs=ref_specs)
    assert (again.name, again.source, again.baseline) == ("einsum", "cache", "dense")
    with pc.mode("force:dense"):    # not a candidate: forcing it gives the deterministic choice
        assert pc.choose("op", "sig2", _candidates(), SPECS, reference=ref,
                         reference_specs=ref_specs).name == "einsum"


def test_device_seconds_sums_the_kernels_of_a_call():
    small = jax.jit(lambda a: jnp.tanh(a[:64, :64] @ a[:64, :64]))
    large = jax.jit(lambda a: jnp.tanh(a @ a) @ a)
    a = jax.random.normal(jax.random.key(0), (512, 512))
    t_small = dtm.device_seconds(small, a, calls=3)
    t_large = dtm.device_seconds(large, a, calls=3)
    assert t_small is not None and t_large is not None
    assert t_large.launches >= 1 and t_large.kernel_s > t_small.kernel_s > 0
    assert t_large.seconds == pytest.approx(t_large.kernel_s + dtm.LAUNCH_GAP_S * t_large.launches)


def test_device_seconds_keeps_out_of_a_running_trace(tmp_path):
    jax.profiler.start_trace(str(tmp_path))
    try:
        assert dtm.device_seconds(jax.jit(lambda a: a + 1), jnp.ones(4), calls=1) is None
    finally:
        jax.profiler.stop_trace()


def _host_bound(monkeypatch, device_us):
    """Every wall timing host-bound; the profiler's device time per call from ``device_us``, in
    the order the candidates are timed (µs per application, times the sets and rounds)."""
    monkeypatch.setattr(pc, "enqueue_seconds", lambda fn, *a, **kw: 1.0)
    monkeypatch.setattr(pc, "rounds_for", lambda *a, **kw: 1)
    it = iter(device_us)

    def fake(fn, *args, calls=10, warmup=1):
        jax.block_until_ready(fn(*args))
        us = next(it)
        return None if us is None else dtm.DeviceTime(kernel_s=us * 1e-6 * 3, launches=0)
    monkeypatch.setattr(dtm, "device_seconds", fake)


def test_host_bound_candidates_are_compared_by_their_device_time(monkeypatch):
    _host_bound(monkeypatch, [30.0, 10.0])      # einsum, then xla_dense
    wall = {}
    times = pc.measure(_candidates(), SPECS, calls=1, repeats=1, copies=3, wall_us=wall,
                       device=True)
    assert times == pytest.approx({"einsum": 30.0, "xla_dense": 10.0})
    assert set(wall) == {"einsum", "xla_dense"} and all(0 < v < 1e6 for v in wall.values())
    # Off the accelerator (the default on CPU, where host and device are one) the wall clock
    # stands.
    monkeypatch.setattr(pc, "_measuring_pays", lambda: False)
    _host_bound(monkeypatch, [30.0, 10.0])
    wall = {}
    times = pc.measure(_candidates(), SPECS, calls=1, repeats=1, copies=3, wall_us=wall)
    assert wall == {} and times["einsum"] != pytest.approx(30.0)


def test_without_a_device_time_for_every_candidate_the_wall_clock_stands(monkeypatch):
    _host_bound(monkeypatch, [30.0, None])
    wall = {}
    times = pc.measure(_candidates(), SPECS, calls=1, repeats=1, copies=3, wall_us=wall,
                       device=True)
    assert wall == {} and times["einsum"] != pytest.approx(30.0)


def test_a_choice_timed_by_the_device_says_so_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(pc, "_measuring_pays", lambda: True)

    def measured(cands, specs, wall_us=None, **kw):
        wall_us.update({"einsum": 9.0, "xla_dense": 12.0})
        return {"einsum": 5.0, "xla_dense": 2.0}
    monkeypatch.setattr(pc, "measure", measured)
    monkeypatch.setenv("SPARSEJAX_PATH_CACHE", str(tmp_path / "c.json"))
    first = pc.choose("op", "sig", _candidates(), SPECS, baseline="xla_dense")
    assert (first.name, first.source, first.timed_by) == ("xla_dense", "measured", "device")
    assert first.summary() == "XLA dense (2 µs, measured, device time)"
    saved = json.loads((tmp_path / "c.json").read_text())["entries"]["op|sig"]
    assert saved["timed_by"] == "device" and saved["path"] == "xla_dense"
    # Taken from the cache later, the choice still says how it was timed.
    again = pc.choose("op", "sig", _candidates(), SPECS, baseline="xla_dense")
    assert (again.source, again.timed_by) == ("cache", "device")
