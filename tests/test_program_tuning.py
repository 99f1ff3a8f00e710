"""Program-level tuning: close per-site path choices settled by timing the whole program.

Per-site times are faked (the CPU has nothing to measure); the program's "time" is a function
of which paths its sites really took, read off the retraced program, so what is tested is the
mechanism: the close calls found, each retrace taking the override, the verdicts kept and
obeyed later, and distant calls and losing switches left alone."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import sparsejax as sj
from sparsejax.kernels import path_choice as pc
from sparsejax.kernels import program_tuning


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(48, name="a")(x))
        return nn.Dense(24, name="b")(h)


def _setup(seed=3):
    model = Net()
    x = jax.random.normal(jax.random.key(seed), (5, 40))
    params = model.init(jax.random.key(seed + 1), x)
    sfn = sj.sparsify(model.apply, [sj.Block("*a/kernel", 0.6, block=(8, 16)),
                                    sj.Block("*b/kernel", 0.5, block=(8, 8))])
    sparams, sstate = sfn.init(params, x)
    return sfn, sparams, sstate, x


def _kernels_in(step, args) -> int:
    # A new function each time: JAX caches a function's trace by its identity.
    return str(jax.make_jaxpr(lambda *a: step(*a))(*args)).count("pallas_call")


def _fake_sites(monkeypatch, times):
    monkeypatch.setattr(pc, "_measuring_pays", lambda: True)
    # A path the test gives no time (the kept blocks' product in XLA ops at these few-row
    # sites) measures far slower than the rest: never a close call.
    monkeypatch.setattr(pc, "measure", lambda cands, specs, **kw: {c.name: times.get(c.name, 1e3)
                                                                   for c in cands})


def test_close_calls_are_the_runner_ups_within_the_margin():
    near = pc.Choice("xla_dense", "XLA", "measured", {"kernel": 11.0, "xla_dense": 10.0})
    far = pc.Choice("xla_dense", "XLA", "measured", {"kernel": 20.0, "xla_dense": 10.0})
    unmeasured = pc.Choice("kernel", "kernel", "default", {})
    # a time of a path that is not a supported candidate here is no runner-up
    other = pc.Choice("kernel", "kernel", "measured", {"kernel": 10.0, "gone": 10.5})
    recorded = {"a": (near, ("kernel", "xla_dense")), "b": (far, ("kernel", "xla_dense")),
                "c": (unmeasured, ("kernel", "xla_dense")), "d": (other, ("kernel",))}
    assert program_tuning.close_calls(recorded, 0.25) == [("a", "xla_dense", "kernel", 10.0, 11.0)]
    assert [c[0] for c in program_tuning.close_calls(recorded, 1.5)] == ["a", "b"]


def test_every_alternative_within_the_margin_is_a_close_call_not_only_the_runner_up():
    # The einsums won alone; the fused kernel (3rd) is within 25% and may compose better in
    # the program (its output layout fused into the next op), so it is tried too; dense is not.
    choice = pc.Choice("einsum", "E", "measured",
                       {"einsum": 10.0, "einsum_transpose": 10.5, "fused_kernel": 11.5, "xla_dense": 14.0})
    names = ("einsum", "einsum_transpose", "fused_kernel", "xla_dense")
    assert program_tuning.close_calls({"a": (choice, names)}, 0.25) == [
        ("a", "einsum", "einsum_transpose", 10.0, 10.5), ("a", "einsum", "fused_kernel", 10.0, 11.5)]


def test_a_movable_path_is_tried_whatever_it_measured_alone():
    # "a": the einsums won alone by 40%, but the dense rebuild can leave the loop: tried.
    # "b": the movable path is the chosen one: nothing to try. "c": the runner-up is close and
    # is also the movable path: tried once.
    a = pc.Choice("einsum", "E", "measured", {"einsum": 10.0, "fused": 30.0, "xla_dense": 14.0})
    b = pc.Choice("xla_dense", "X", "measured", {"einsum": 30.0, "xla_dense": 10.0})
    c = pc.Choice("einsum", "E", "measured", {"einsum": 10.0, "xla_dense": 11.0})
    names = ("einsum", "fused", "xla_dense")
    recorded = {"a": (a, names, ("xla_dense",)), "b": (b, names, ("xla_dense",)),
                "c": (c, names, ("xla_dense",))}
    assert program_tuning.close_calls(recorded, 0.25) == [("c", "einsum", "xla_dense", 10.0, 11.0),
                                                          ("a", "einsum", "xla_dense", 10.0, 14.0)]
    assert program_tuning.close_calls({"a": (a, names, ())}, 0.25) == []


def test_a_switch_that_speeds_the_program_up_is_kept_and_then_obeyed(fresh_paths, monkeypatch):
    sfn, sparams, sstate, x = _setup()
    _fake_sites(monkeypatch, {"kernel": 11.0, "xla_dense": 10.0})      # alone, XLA by 10%
    fast = sfn.lower(sstate, interpret=True)
    step = lambda p, s, x: jnp.sum(fast(p, s, x) ** 2)
    args = (sparams, sstate, x)
    assert _kernels_in(step, args) == 0
    # The program is faster the more sites run the kernel (as in the decode step on the GPU).
    timer = lambda f, a: 1.0 - 0.1 * _kernels_in(f, a)
    tuning = fast.tune(step, *args, timer=timer)
    assert tuning.base_s == 1.0 and tuning.final_s == pytest.approx(0.8)
    assert [t.kept for t in tuning.trials] == [True, True]
    assert set(tuning.verdicts.values()) == {"kernel"} and len(tuning.verdicts) == 2
    assert "kept" in tuning.summary()
    # Later traces take the verdicts from the cache, with no override in force.
    monkeypatch.setattr(pc, "measure", lambda *a, **kw: pytest.fail("measured again"))
    assert _kernels_in(step, args) == 2
    assert all(r.kernel.startswith("block-sparse kernel") and r.kernel.endswith("program)")
               for r in fast.report().rows), fast.report().rows
    chex.assert_trees_all_close(fast(*args), sfn(*args), rtol=1e-5, atol=1e-5)
    entry = pc.cache_entries()[next(iter(tuning.verdicts))]
    assert entry["path"] == "kernel" and set(entry["program_us"]) == {"xla_dense", "kernel"}


def test_a_switch_that_slows_the_program_is_not_kept(fresh_paths, monkeypatch):
    sfn, sparams, sstate, x = _setup(seed=5)
    _fake_sites(monkeypatch, {"kernel": 11.0, "xla_dense": 10.0})
    fast = sfn.lower(sstate, interpret=True)
    step = lambda p, s, x: fast(p, s, x)
    args = (sparams, sstate, x)
    tuning = fast.tune(step, *args, timer=lambda f, a: 1.0 + 0.1 * _kernels_in(f, a))
    assert tuning.verdicts == {} and [t.kept for t in tuning.trials] == [False, False]
    assert tuning.final_s == tuning.base_s == 1.0
    assert _kernels_in(step, args) == 0          # the per-site choices stand


def test_distant_calls_are_not_retimed_and_a_gain_must_beat_the_noise(fresh_paths, monkeypatch):
    sfn, sparams, sstate, x = _setup(seed=6)
    _fake_sites(monkeypatch, {"kernel": 20.0, "xla_dense": 10.0})      # alone, XLA by 2x
    fast = sfn.lower(sstate, interpret=True)
    step = lambda p, s, x: fast(p, s, x)
    calls = []
    timer = lambda f, a: calls.append(1) or 1.0
    tuning = fast.tune(step, sparams, sstate, x, timer=timer)
    assert tuning.trials == () and len(calls) == 1
    pc.clear_cache()
    _fake_sites(monkeypatch, {"kernel": 11.0, "xla_dense": 10.0})
    # 0.5% faster with the kernel: below min_gain (1%), timing noise
    tuning = fast.tune(step, sparams, sstate, x,
                       timer=lambda f, a: 1.0 - 0.005 * _kernels_in(f, a))
    assert len(tuning.trials) == 2 and tuning.verdicts == {}


def test_a_gain_that_the_timings_drift_gave_is_not_kept(fresh_paths, monkeypatch):
    sfn, sparams, sstate, x = _setup(seed=7)
    _fake_sites(monkeypatch, {"kernel": 11.0, "xla_dense": 10.0})
    fast = sfn.lower(sstate, interpret=True)
    step = lambda p, s, x: fast(p, s, x)
    # Every timing 5% faster than the one before, whatever the program runs (each traces it, so
    # its sites choose): the first switch beats the first time, but not the program without it
    # timed again after it.
    times = iter(0.95 ** i for i in range(100))
    tuning = fast.tune(step, sparams, sstate, x, timer=lambda f, a: (_kernels_in(f, a), next(times))[1])
    assert tuning.verdicts == {} and [t.kept for t in tuning.trials] == [False, False]
    first = tuning.trials[0]
    assert first.program_s == pytest.approx(0.95) and first.incumbent_s == pytest.approx(0.95 ** 2)
    assert "timed again" in tuning.summary()
    assert _kernels_in(step, (sparams, sstate, x)) == 0          # the per-site choices stand


def test_no_trial_starts_past_the_budget(fresh_paths, monkeypatch):
    sfn, sparams, sstate, x = _setup(seed=9)
    _fake_sites(monkeypatch, {"kernel": 11.0, "xla_dense": 10.0})
    fast = sfn.lower(sstate, interpret=True)
    tuning = fast.tune(lambda p, s, x: fast(p, s, x), sparams, sstate, x, budget_s=0.0,
                       timer=lambda f, a: 1.0 - 0.1 * _kernels_in(f, a))
    assert tuning.trials == () and tuning.verdicts == {} and tuning.final_s == tuning.base_s


def test_a_jitted_step_is_unwrapped_so_each_trial_retraces(fresh_paths, monkeypatch):
    sfn, sparams, sstate, x = _setup(seed=8)
    _fake_sites(monkeypatch, {"kernel": 11.0, "xla_dense": 10.0})
    fast = sfn.lower(sstate, interpret=True)
    step = jax.jit(lambda p, s, x: fast(p, s, x))
    tuning = fast.tune(step, sparams, sstate, x, timer=lambda f, a: 1.0 - 0.1 * _kernels_in(f, a))
    assert len(tuning.verdicts) == 2


def test_overrides_outrank_caches_but_not_forcing(fresh_paths):
    cands = [pc.Candidate("kernel", lambda x: x + 1), pc.Candidate("xla_dense", lambda x: x + 1)]
    specs = [jax.ShapeDtypeStruct((4,), jnp.float32)]
    with pc.overriding({"op|sig": "xla_dense"}):
        assert (pc.choose("op", "sig", cands, specs).name, pc.choose("op", "sig", cands, specs).source) \
            == ("xla_dense", "program")
        with pc.mode("force:kernel"):
            assert pc.choose("op", "sig", cands, specs).name == "kernel"
    assert pc.choose("op", "sig", cands, specs).name == "kernel"       # the override is gone
    with pc.overriding({"op|sig": "gone"}):                               # not a candidate: ignored
        assert pc.choose("op", "sig", cands, specs).name == "kernel"


def test_fallbacks_are_the_sites_off_their_baseline():
    on_kernel = pc.Choice("kernel", "kernel", "measured", {"kernel": 5.0, "xla_dense": 10.0}, "xla_dense")
    on_xla = pc.Choice("xla_dense", "XLA", "measured", {"kernel": 15.0, "xla_dense": 10.0}, "xla_dense")
    # A factorized site's baseline is the dense program's product, no path it can take.
    factorized = pc.Choice("einsum", "einsums", "measured", {"einsum": 5.0, "xla_dense": 9.0},
                           "dense_reference")
    no_fallback = pc.Choice("einsum", "einsums", "measured", {"einsum": 5.0}, "dense_reference")
    recorded = {"a": (on_kernel, ("kernel", "xla_dense")), "b": (on_xla, ("kernel", "xla_dense")),
                "c": (factorized, ("einsum", "xla_dense"), ()), "d": (no_fallback, ("einsum",), ())}
    assert program_tuning.fallbacks(recorded) == {"a": "xla_dense", "c": "xla_dense"}


def test_sites_that_win_alone_and_lose_together_fall_back_to_xla_together(fresh_paths, monkeypatch):
    sfn, sparams, sstate, x = _setup(seed=11)
    _fake_sites(monkeypatch, {"kernel": 5.0, "xla_dense": 10.0})       # alone, the kernel by 2x
    fast = sfn.lower(sstate, interpret=True)
    step = lambda p, s, x: fast(p, s, x)
    args = (sparams, sstate, x)
    assert _kernels_in(step, args) == 2
    # Together the two kernels cost the program more than XLA at both sites; one alone pays.
    program = {0: 1.0, 1: 0.9, 2: 1.2}
    tuning = fast.tune(step, *args, timer=lambda f, a: program[_kernels_in(f, a)])
    first = tuning.trials[0]
    assert (first.key, first.kept, first.program_s) == (program_tuning.EVERY_SITE, True, 1.0)
    assert first.site_us == (10.0, 20.0)
    # Then each site is tried back on its own choice: the first pays and is kept, the second not.
    assert [(t.was, t.path, t.kept) for t in tuning.trials[1:]] == [
        ("xla_dense", "kernel", True), ("xla_dense", "kernel", False)]
    assert tuning.final_s == pytest.approx(0.9) and sorted(tuning.verdicts.values()) == ["kernel", "xla_dense"]
    # Later traces take the verdicts, with no override in force.
    monkeypatch.setattr(pc, "measure", lambda *a, **kw: pytest.fail("measured again"))
    assert _kernels_in(step, args) == 1
    chex.assert_trees_all_close(fast(*args), sfn(*args), rtol=1e-5, atol=1e-5)


def test_the_fallback_program_is_not_kept_where_the_per_site_choices_are_faster(fresh_paths,
                                                                                monkeypatch):
    sfn, sparams, sstate, x = _setup(seed=12)
    _fake_sites(monkeypatch, {"kernel": 5.0, "xla_dense": 10.0})
    fast = sfn.lower(sstate, interpret=True)
    step = lambda p, s, x: fast(p, s, x)
    tuning = fast.tune(step, sparams, sstate, x, timer=lambda f, a: 1.0 - 0.1 * _kernels_in(f, a))
    assert [(t.key, t.kept) for t in tuning.trials] == [(program_tuning.EVERY_SITE, False)]
    assert tuning.verdicts == {} and tuning.final_s == tuning.base_s == pytest.approx(0.8)
    assert _kernels_in(step, (sparams, sstate, x)) == 2


def test_one_site_off_its_fallback_is_tried_once_under_its_own_key(fresh_paths, monkeypatch):
    model = Net()
    x = jax.random.normal(jax.random.key(13), (5, 40))
    sfn = sj.sparsify(model.apply, [sj.Block("*a/kernel", 0.6, block=(8, 16))])
    sparams, sstate = sfn.init(model.init(jax.random.key(14), x), x)
    # Alone the kernel wins by 10%, so XLA is also a close call: the same switch as the
    # fallback trial, which must not be timed twice.
    _fake_sites(monkeypatch, {"kernel": 9.0, "xla_dense": 10.0})
    fast = sfn.lower(sstate, interpret=True)
    step = lambda p, s, x: fast(p, s, x)
    tuning = fast.tune(step, sparams, sstate, x, timer=lambda f, a: 1.0 - 0.1 * _kernels_in(f, a))
    (trial,) = tuning.trials
    assert trial.key.startswith("block_sparse_matmul|") and (trial.was, trial.path) == ("kernel", "xla_dense")
    assert not trial.kept and trial.site_us == (9.0, 10.0) and tuning.verdicts == {}
    assert _kernels_in(step, (sparams, sstate, x)) == 1


def _options_timer(with_options: float, calls: list):
    def timer(f, a, compiler_options=None):
        calls.append(compiler_options)
        return with_options if compiler_options else 1.0
    return timer


def test_compiler_options_that_speed_the_program_up_are_returned(fresh_paths, monkeypatch):
    sfn, sparams, sstate, x = _setup(seed=15)
    _fake_sites(monkeypatch, {"kernel": 20.0, "xla_dense": 10.0})      # no close call, none off XLA
    fast = sfn.lower(sstate, interpret=True)
    step = lambda p, s, x: fast(p, s, x)
    options = {"xla_gpu_enable_triton_gemm": False}
    calls = []
    tuning = fast.tune(step, sparams, sstate, x, timer=_options_timer(0.8, calls),
                       compiler_trials=[options])
    assert tuning.compiler_options == options and tuning.final_s == pytest.approx(0.8)
    (trial,) = tuning.trials
    assert (trial.key, trial.kept, trial.incumbent_s) == (program_tuning.COMPILER_OPTIONS, True, 1.0)
    # the base program, the trial, and the program without the options timed again after it
    assert calls == [None, options, None]
    assert "compiler_options={'xla_gpu_enable_triton_gemm': False}" in tuning.summary()
    # The options compile the step on this backend too, to the same result.
    with_options = jax.jit(step, compiler_options=tuning.compiler_options)
    chex.assert_trees_all_close(with_options(sparams, sstate, x), step(sparams, sstate, x))


def test_compiler_options_that_do_not_pay_are_dropped(fresh_paths, monkeypatch):
    sfn, sparams, sstate, x = _setup(seed=16)
    _fake_sites(monkeypatch, {"kernel": 20.0, "xla_dense": 10.0})
    fast = sfn.lower(sstate, interpret=True)
    calls = []
    tuning = fast.tune(lambda p, s, x: fast(p, s, x), sparams, sstate, x,
                       timer=_options_timer(0.995, calls),      # within the noise (min_gain 1%)
                       compiler_trials=[{"xla_gpu_enable_triton_gemm": False}])
    assert tuning.compiler_options == {} and [t.kept for t in tuning.trials] == [False]
    assert tuning.final_s == tuning.base_s == 1.0 and "compiler_options=" not in tuning.summary()


def test_trials_after_kept_compiler_options_compile_under_them(fresh_paths, monkeypatch):
    sfn, sparams, sstate, x = _setup(seed=17)
    _fake_sites(monkeypatch, {"kernel": 11.0, "xla_dense": 10.0})      # two close calls
    fast = sfn.lower(sstate, interpret=True)
    options = {"xla_gpu_enable_triton_gemm": False}
    calls = []

    def timer(f, a, compiler_options=None):
        calls.append(compiler_options)
        return (0.8 if compiler_options else 1.0) - 0.05 * _kernels_in(f, a)

    tuning = fast.tune(lambda p, s, x: fast(p, s, x), sparams, sstate, x, timer=timer,
                       compiler_trials=[options])
    # the options first (one trial, before the close calls), then each switch under them
    assert [t.key for t in tuning.trials][0] == program_tuning.COMPILER_OPTIONS
    assert calls[:3] == [None, options, None] and all(c == options for c in calls[3:])
    assert [t.kept for t in tuning.trials] == [True, True, True]
    assert tuning.compiler_options == options and tuning.final_s == pytest.approx(0.7)
