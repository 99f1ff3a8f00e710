"""Activation thresholds (TEAL, CATS, CHESS) and ProSparse's ReLU substitution + L1 output.

Small hand-written programs whose thresholded form is easy to write by hand: the
rewritten function must equal it (per layer inside a scan), calibration must hit the
target sparsity, thresholds must survive an orbax round trip, and bad input must fail in
one line naming the rule.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sparsejax as sj
from sparsejax.optim import prosparse_l1_schedule
from sparsejax.rules import CATS, CHESS, TEAL, ReLUActivation

D, F, L, B, T = 8, 16, 3, 2, 12


def gated_ffn(h, p):
    g = h @ p["gate"]
    return (jax.nn.silu(g) * (h @ p["up"])) @ p["down"]


def scanned(params, x):
    """``L`` residual gated-FFN layers in one lax.scan over stacked weights."""
    def layer(h, p):
        return h + gated_ffn(h, p), None
    return jax.lax.scan(layer, x, params)[0]


@pytest.fixture(scope="module")
def setup():
    k = iter(jax.random.split(jax.random.key(0), 8))
    params = {"gate": jax.random.normal(next(k), (L, D, F)) / np.sqrt(D),
              "up": jax.random.normal(next(k), (L, D, F)) / np.sqrt(D),
              "down": jax.random.normal(next(k), (L, F, D)) / np.sqrt(F)}
    batches = [jax.random.normal(next(k), (B, T, D)) for _ in range(3)]
    return params, batches


def _cut(x, t):
    return jnp.where(jnp.abs(x) > t, x, 0.0)


def _calibrated(rule, params, batches):
    sfn = sj.sparsify(scanned, [rule])
    sp, ss = sfn.init(params, batches[0])
    return sfn, sp, sfn.calibrate(sp, ss, batches)


def test_teal_per_layer_thresholds_match_hand_written_program_and_hit_target(setup):
    params, batches = setup
    sfn, sp, ss = _calibrated(TEAL("*", sparsity=0.4), params, batches)
    th = ss["thresholds"]
    assert len(th) == 3 and all(v.shape == (L, 1) for v in th.values())   # gate, up, down inputs
    names = {p.paths[0].split("/")[-1]: p.name for p, _ in sfn._thresholds}

    def reference(params, x):
        def layer(h, pt):
            p, i = pt
            t = {n: th[names[n]][i, 0] for n in ("gate", "up", "down")}
            g = _cut(h, t["gate"]) @ p["gate"]
            u = _cut(h, t["up"]) @ p["up"]
            return h + _cut(jax.nn.silu(g) * u, t["down"]) @ p["down"], None
        return jax.lax.scan(layer, x, (params, jnp.arange(L)))[0]

    x = jax.random.normal(jax.random.key(7), (B, T, D))
    # (jitted, both: one program each, where op by op every operation was one to compile)
    np.testing.assert_allclose(jax.jit(sfn)(sp, ss, x), jax.jit(reference)(params, x), rtol=1e-5,
                               atol=1e-5)
    # layers see different activations, so their thresholds differ
    assert len({float(v) for v in th[names["down"]][:, 0]}) == L
    for name, info in sfn._threshold_info.items():
        assert info["measured"].shape == (L,)
        np.testing.assert_allclose(info["measured"], 0.4, atol=0.02)
    text = str(sfn.report())
    assert "threshold (input)" in text and "TEAL" in text and "measured - → 60." in text


def test_cats_and_chess_cut_the_gate_activation(setup):
    params, batches = setup
    x = batches[1]
    for rule in (CATS("*", sparsity=0.5), CHESS("*", sparsity=0.5, attention=None)):
        sfn, sp, ss = _calibrated(rule, params, batches)
        (t,) = ss["thresholds"].values()
        assert t.shape == ((L, 1) if isinstance(rule, CATS) else (L, F))

        def reference(params, x, t=t):
            def layer(h, pt):
                p, i = pt
                a = jax.nn.silu(h @ p["gate"])
                return h + (_cut(a, t[i]) * (h @ p["up"])) @ p["down"], None
            return jax.lax.scan(layer, x, (params, jnp.arange(L)))[0]

        # (jitted, both: one program each, where op by op every operation was one to compile)
        np.testing.assert_allclose(jax.jit(sfn)(sp, ss, x), jax.jit(reference)(params, x), rtol=1e-5,
                                   atol=1e-5)
        (info,) = sfn._threshold_info.values()
        np.testing.assert_allclose(info["measured"], 0.5, atol=0.03)
        g = jax.jit(jax.grad(lambda p: jnp.sum(sfn(p, ss, x) ** 2)))(sp)
        assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(g))


def test_chess_channel_thresholds_follow_the_up_branch(setup):
    """CHESS drops |act_i| * E|up_i| <= t: channels whose up branch is larger keep smaller acts."""
    params, batches = setup
    sfn, sp, ss = _calibrated(CHESS("*", sparsity=0.5, attention=None), params, batches)
    (t,) = ss["thresholds"].values()
    # the first layer's input is the batch itself
    e_up = jnp.concatenate([jnp.abs(b @ params["up"][0]).reshape(-1, F) for b in batches]).mean(0)
    product = np.asarray(t[0] * e_up)          # the one per-layer threshold t, per channel
    np.testing.assert_allclose(product, product[0], rtol=1e-4)


def test_sparsity_zero_is_the_dense_program_and_uncalibrated_thresholds_drop_only_zeros(setup):
    params, batches = setup
    dense = scanned(params, batches[0])
    sfn = sj.sparsify(scanned, [TEAL("*", sparsity=0.0)])
    sp, ss = sfn.init(params, batches[0])
    np.testing.assert_array_equal(sfn(sp, ss, batches[0]), dense)     # init: thresholds 0
    ss = sfn.calibrate(sp, ss, batches)
    np.testing.assert_array_equal(sfn(sp, ss, batches[0]), dense)


def test_greedy_allocation_meets_the_global_target(setup):
    params, batches = setup
    sfn = sj.sparsify(scanned, [TEAL("*", sparsity=0.5)])
    sp, ss = sfn.init(params, batches[0])
    ss = sfn.calibrate(sp, ss, batches, global_sparsity=0.5)
    points = {p.name: p for p, _ in sfn._thresholds}
    flops = {n: points[n].flops for n in points}
    targets = {n: v["target"] for n, v in sfn._threshold_info.items()}
    mean = sum(flops[n] * targets[n].mean() for n in targets) / sum(flops.values())
    assert 0.5 <= mean < 0.5 + 0.03
    assert len({round(float(v), 3) for t in targets.values() for v in t}) > 1   # not uniform
    measured = sum(flops[n] * sfn._threshold_info[n]["measured"].mean() for n in targets)
    assert abs(measured / sum(flops.values()) - 0.5) < 0.03


def test_thresholds_round_trip_through_orbax(setup, tmp_path):
    from sparsejax.training.checkpointing import Checkpointer
    params, batches = setup
    sfn, sp, ss = _calibrated(CHESS("*", sparsity=0.3, attention=None), params, batches)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(1, {"sstate": ss})
    ckpt.wait()
    template = {"sstate": jax.tree.map(jnp.zeros_like, ss)}
    restored = ckpt.restore(template).state["sstate"]
    ckpt.close()
    for name, v in ss["thresholds"].items():
        np.testing.assert_array_equal(restored["thresholds"][name], v)
    np.testing.assert_array_equal(sfn(sp, restored, batches[0]), sfn(sp, ss, batches[0]))


def test_relu_substitution_and_the_l1_auxiliary_output(setup):
    params, batches = setup
    x = batches[0]
    for threshold in (0.0, 0.1):
        sfn = sj.sparsify(scanned, [ReLUActivation("*", threshold=threshold)])
        sp, ss = sfn.init(params, x)

        def reference(params, x):
            acts = []

            def layer(h, p):
                g = h @ p["gate"]
                a = jnp.where(g > threshold, g, 0.0)
                return h + (a * (h @ p["up"])) @ p["down"], a
            y, acts = jax.lax.scan(layer, x, params)
            return y, acts

        y_ref, acts = reference(params, x)
        np.testing.assert_allclose(sfn(sp, ss, x), y_ref, rtol=1e-5, atol=1e-5)
        y, aux = jax.jit(sfn.with_aux())(sp, ss, x)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(aux["activation_l1"], jnp.mean(jnp.abs(acts)), rtol=1e-5)
        np.testing.assert_allclose(aux["activation_sparsity"], jnp.mean(acts == 0), rtol=1e-5)
        # the L1 is differentiable: a training loop adds it to its loss
        g = jax.grad(lambda p: sfn.with_aux()(p, ss, x)[1]["activation_l1"])(sp)
        assert float(jnp.abs(g["gate"]).sum()) > 0
        # measure_activations runs the substituted program: per layer, the ReLU's density
        measured = sfn.measure_activations(sp, ss, x)
        assert [m["layer"] for m in measured] == list(range(L))
        np.testing.assert_allclose([m["after"] for m in measured],
                                   np.mean(np.asarray(acts) != 0, axis=(1, 2, 3)), rtol=1e-5)


def test_prosparse_schedule_rises_along_sines_in_stages():
    s = prosparse_l1_schedule([(10, 1.0), (20, 3.0)])
    assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0)
    assert float(s(5)) == pytest.approx(np.sin(np.pi / 4))
    assert float(s(20)) == pytest.approx(1.0 + 2.0 * np.sin(np.pi / 4))
    assert float(s(30)) == pytest.approx(3.0) and float(s(1000)) == pytest.approx(3.0)
    values = [float(s(i)) for i in range(31)]
    assert values == sorted(values)
    with pytest.raises(ValueError, match="stage 1 has factor"):
        prosparse_l1_schedule([(10, 1.0), (5, -1.0)])


def test_thresholded_matmuls_lower_to_the_sparse_input_gemv(setup):
    from sparsejax.kernels import path_choice
    params, batches = setup
    x = batches[0][:1, :1]      # one decode token
    sfn = sj.sparsify(scanned, [TEAL("*", sparsity=0.5)])
    sp, ss = sfn.init(params, x)
    ss = sfn.calibrate(sp, ss, [b[:1, :1] for b in batches])
    low = sfn.lower(ss, interpret=True)
    with path_choice.mode("force:sparse_input"):
        y = low(sp, ss, x)
    np.testing.assert_allclose(y, sfn(sp, ss, x), rtol=1e-5, atol=1e-5)
    paths = {h.site_path(s.key) for h in low._handlers.values() for s in h.sites}
    assert any("sparse-input GEMV" in p for p in paths), paths


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_rule(setup):
    params, batches = setup
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"TEAL\(.*sparsity must be in \[0, 1\)"):
            TEAL("*", sparsity=bad)
    with pytest.raises(ValueError, match=r"CATS\('re:nothing.*'.*selects no gated FFN activation"):
        sj.sparsify(scanned, [CATS("re:nothing.*")]).init(params, batches[0])
    with pytest.raises(ValueError, match=r"TEAL\('nothing'.*selects no linear layer input"):
        sj.sparsify(scanned, [TEAL("nothing")]).init(params, batches[0])
    sfn = sj.sparsify(scanned, [CATS("*", sparsity=0.5)])
    sp, ss = sfn.init(params, batches[0])
    with pytest.raises(ValueError, match=r"CATS\('\*'.*calibration batch 1: shapes \[\(2, 5, 8\)\]"):
        sfn.calibrate(sp, ss, [batches[0], batches[0][:, :5]])
    with pytest.raises(ValueError, match=r"CATS\('\*'.*sstate\['thresholds'\]"):
        sfn(sp, {"masks": ss["masks"], "thresholds": {}}, batches[0])

    def flipped(params, x):     # the activation reverses its channels: not entry by entry
        g = x @ params["gate"][0]
        return (jax.lax.rev(jax.nn.silu(g), (2,)) * (x @ params["up"][0])) @ params["down"][0]

    with pytest.raises(ValueError, match=r"ReLUActivation\('\*'.*computes its activation with "
                                         r"\['rev'\], not entry by entry"):
        sj.sparsify(flipped, [ReLUActivation()]).init(params, batches[0])

    def normalized(params, x):  # the activation normalizes over channels: no elementwise FFN
        g = x @ params["gate"][0]
        a = g / jnp.sum(jnp.abs(g), -1, keepdims=True)
        return (a * (x @ params["up"][0])) @ params["down"][0]

    with pytest.raises(ValueError, match=r"ReLUActivation\('\*'.*selects no ffn site.*entry by entry"):
        sj.sparsify(normalized, [ReLUActivation()]).init(params, batches[0])
    with pytest.raises(ValueError, match=r"ReLUActivation\('\*', threshold=-1"):
        ReLUActivation(threshold=-1)


def test_calibration_of_a_reverse_scan_is_indexed_by_layer():
    """Statistics inside ``lax.scan(reverse=True)`` belong to the layer whose weight the
    iteration reads (the last layer sees the function's input), as the scan's ys are."""
    from sparsejax.compiler import calibration

    def fn(w, x):
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w, reverse=True)[0]

    w = jax.random.normal(jax.random.key(3), (L, D, D))
    x = jax.random.normal(jax.random.key(4), (5, D))
    stats = calibration.calibrate(fn, w, [(x,)])
    (s,) = stats.values()
    np.testing.assert_allclose(s.sum[L - 1], x.sum(0), rtol=1e-5)
    np.testing.assert_allclose(s.sum[L - 2], jnp.tanh(x @ w[L - 1]).sum(0), rtol=1e-4)


def bf16_compute(params, x):
    """``scanned`` computing in bf16 as Flax's ``dtype=bfloat16`` layers do: each weight is
    cast before its matmul, a cast that vanishes (and shifts every later eqn) when the
    params are already bf16."""
    def layer(h, p):
        p = {k: v.astype(jnp.bfloat16) for k, v in p.items()}
        return h + gated_ffn(h, p), None
    return jax.lax.scan(layer, x.astype(jnp.bfloat16), params)[0]


def test_thresholds_serve_a_call_traced_differently_from_init(setup):
    """Init with float32 params, call with bf16 ones: the thresholded eqns sit elsewhere than
    in init's trace; the points are matched by name and the calibrated thresholds apply."""
    params, batches = setup
    sfn = sj.sparsify(bf16_compute, [TEAL("*", sparsity=0.5)])
    sp, ss = sfn.init(params, batches[0])
    ss = sfn.calibrate(sp, ss, batches)
    x = batches[1]
    want = sfn(sp, ss, x).astype(jnp.float32)
    half = jax.tree.map(lambda w: w.astype(jnp.bfloat16), sp)
    got = sfn(half, ss, x).astype(jnp.float32)
    rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert rel < 1e-6                  # the same bf16 computation, the same thresholds
    dense = bf16_compute(half, x).astype(jnp.float32)
    assert float(jnp.linalg.norm(dense - want) / jnp.linalg.norm(want)) > 1e-2   # thresholds cut


def test_a_second_init_replaces_the_first_programs_trace(setup):
    params, batches = setup
    sfn = sj.sparsify(scanned, [TEAL("*", sparsity=0.5)])
    sfn.init(params, batches[0][0])                          # (T, D): another program
    sp, ss = sfn.init(params, batches[0])                    # (B, T, D): the one used below
    ss = sfn.calibrate(sp, ss, batches)
    assert all(v.shape == (L, 1) for v in ss["thresholds"].values())


def test_with_aux_inside_a_while_loop_is_a_clear_error(setup):
    params, batches = setup
    one = jax.tree.map(lambda w: w[0], params)

    def looped(p, x):
        def body(c):
            i, h = c
            return i + 1, h + gated_ffn(h, p)
        return jax.lax.while_loop(lambda c: c[0] < 2, body, (0, x))[1]

    sfn = sj.sparsify(looped, [ReLUActivation("*")])
    sp, ss = sfn.init(one, batches[0])
    assert sfn(sp, ss, batches[0]).shape == batches[0].shape     # the rewrite itself works there
    with pytest.raises(ValueError, match="inside a lax.while_loop body") as e:
        sfn.with_aux()(sp, ss, batches[0])
    assert "\n" not in str(e.value)



def test_sites_equally_sparse_share_one_path_measurement(setup, monkeypatch):
    # Calibrated densities differ in the third decimal from site to site; the path choice
    # rounds them, so one measurement per weight shape serves every equally sparse site.
    from sparsejax.compiler.passes.sparse_input import _density_class
    from sparsejax.kernels import path_choice as pc
    assert _density_class(0.598) == _density_class(0.601) == pytest.approx(0.6)
    assert _density_class(0.0) == pytest.approx(0.05) and _density_class(1.0) == 1.0
    params, batches = setup
    x = batches[0][:1, :1]
    sfn = sj.sparsify(scanned, [TEAL("*", sparsity=0.5)])
    sp, ss = sfn.init(params, x)
    ss = sfn.calibrate(sp, ss, [b[:1, :1] for b in batches])
    for i, info in enumerate(sfn._threshold_info.values()):     # as measured on real data
        info["measured"] = np.asarray(info["measured"]) + 0.003 * (i - 1)
    measured = {n: float(np.mean(v["measured"])) for n, v in sfn._threshold_info.items()}
    assert len(set(measured.values())) == 3, measured      # the sites' densities differ
    seen = []

    def fake_measure(cands, specs, **kw):
        seen.append(tuple(s.shape for s in specs if hasattr(s, "shape")))
        return {c.name: (1.0 if c.name == "xla_dense" else 2.0) for c in cands}

    pc.clear_cache()
    monkeypatch.setattr(pc, "_measuring_pays", lambda: True)
    monkeypatch.setattr(pc, "measure", fake_measure)
    low = sfn.lower(ss, interpret=True)
    jax.make_jaxpr(lambda p, x: low(p, ss, x))(sp, x)
    pc.clear_cache()
    # gate and up share their (D, F) shape; down is (F, D): two measurements, not three.
    assert len(seen) == len(set(seen)) == 2, seen

def test_lowered_sites_measure_every_candidate_while_the_step_is_traced(setup, monkeypatch,
                                                                        fresh_paths):
    # The sites' sample inputs are made while the step is traced; the measurement runs
    # outside that trace. A sample made there with jnp is a tracer, and every candidate,
    # XLA's included, once failed on it (all timed inf) and the kernels were never taken.
    from sparsejax.kernels import path_choice as pc, streaming_choice
    params, batches = setup
    x = batches[0][:1, :1]
    sfn = sj.sparsify(scanned, [TEAL("*", sparsity=0.5)])
    sp, ss = sfn.init(params, x)
    ss = sfn.calibrate(sp, ss, [b[:1, :1] for b in batches])
    monkeypatch.setattr(pc, "_measuring_pays", lambda: True)     # measure on the CPU here
    # Each timed call runs over two input sets instead of the 32 that stream these tiny
    # weights past an H200's L2: the samples are made and the candidates compiled and timed
    # the same way, over a program a sixteenth the size (interpret-mode kernels compile slowly).
    monkeypatch.setattr(streaming_choice, "_copies", lambda spec: 2)
    low = sfn.lower(ss, interpret=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)     # a failed candidate warns
        out = jax.jit(lambda p, x: low(p, ss, x))(sp, x)
    measured = [e for k, e in pc.cache_entries().items() if k.startswith("sparse_input_gemv")]
    assert measured and all(np.isfinite(t) for e in measured for t in e["times_us"].values())
    np.testing.assert_allclose(out, sfn(sp, ss, x), rtol=2e-5, atol=2e-5)
