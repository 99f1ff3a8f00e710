"""End to end: does sparsity make a whole LM faster? Prefill, AdamW step and decode vs dense.

    python benchmarks/e2e_speed.py                       # the full table (GPU)
    python benchmarks/e2e_speed.py --recipes=block90 --layouts=scan --measure=prefill,train
    python benchmarks/e2e_speed.py --smoke               # tiny sizes on CPU: checks the script

A GPT-2-medium-width LM (models/transformer.py: d_model 1024, 24 layers, 16 heads, d_ff 4096,
vocab 50304, bf16 compute, flash attention unless ``--attention=explicit``), written with
``nn.scan`` over layers and unrolled. Recipes, all through ``sparsify``: block masks at
90/75/50% on every linear layer but the head, then ``lower`` (the block-sparse kernel or XLA
per site, whichever measured faster); 90% on FFNs only; Monarch (4 blocks, fresh factors) on
every linear layer but the head (prefill and decode through ``lower(premasked=True)``: each
site also weighs the stored dense product). Measured: prefill forward (batch 8 × 1024), the AdamW
training step (same batch), and decoding one token with a 1024-token KV cache at batch 1 and
8. Beside each ratio to dense: the FLOP-ideal ratio (dense model FLOPs over the sparse
model's, from the report's counts) or, for decode, the
bytes-ideal ratio (weight and cache bytes a dense step reads over a packed sparse one's).
Every sparse forward is first checked against its masked (XLA) twin. Prints the table last;
writes $OUT/e2e_speed.md and $OUT/e2e_speed.json when $OUT is set.

``--profile``: after each measure is timed (outside the timed region), ``--profile_steps`` more
calls are traced with ``jax.profiler`` (``step_profile.py``'s ``trace``/``summarise``), and
the tables gain a section: device kernel µs and launches per step, by category
(Pallas/Mosaic kernels, GEMM, attention, XLA fusions, copies and other), each sparse
variant's difference from dense per category (what names a slowdown), and the slowest
kernels. On CPU the host's XLA ops stand in for kernels (checks the script only).

    python benchmarks/e2e_speed.py --layouts=scan --recipes=dense,monarch4 --measure=train --profile
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import optax

sys.path.append(str(pathlib.Path(__file__).resolve().parent))
from step_profile import CATEGORIES, summarise, top_line, trace  # noqa: E402
from timing import median_seconds, rel_err  # noqa: E402

import sparsejax as sj  # noqa: E402
from sparsejax.kernels import path_choice  # noqa: E402
from sparsejax.models import transformer  # noqa: E402

LINEAR = r"re:.*(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel"
FFN = r"re:.*mlp/(gate|up|down)/kernel"
RECIPES = {   # in the order a time budget keeps them
    "block90": lambda: sj.Block(LINEAR, sparsity=0.9, block=(128, 128)),
    # Fresh factors: speed does not depend on their values, and projecting 168 dense
    # matrices (an SVD per block pair) took longer than the device call's whole time limit.
    "monarch4": lambda: sj.Monarch(LINEAR, nblocks=4, init="random"),
    "block75": lambda: sj.Block(LINEAR, sparsity=0.75, block=(128, 128)),
    "block90_ffn": lambda: sj.Block(FFN, sparsity=0.9, block=(128, 128)),
    "block50": lambda: sj.Block(LINEAR, sparsity=0.5, block=(128, 128)),
}
MEASURES = ("prefill", "train", "decode1", "decode8")
INFER = "premasked"   # how prefill and decode hold lowered weights (--infer)
FUSE_SIBLINGS = False  # lower(..., fuse_siblings=...): q/k/v and gate/up as one kernel (--fuse_siblings)
PROFILE_STEPS = 0     # calls traced per measure after its timing; 0: no profile (--profile)
TUNE = False          # after each sparse measure, settle close path choices on the whole step (--tune)
TUNE_BUDGET_S = 120.0  # no tuning trial of one measure starts past this (--tune_budget_s)
PROFILE_TOP = 12      # kernels listed per profile


def model_config(smoke: bool, layers: int, scan: bool, attention: str) -> transformer.TransformerConfig:
    if smoke:
        return transformer.TransformerConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4,
                                             d_ff=256, scan_layers=scan, attention=attention)
    return transformer.TransformerConfig(vocab_size=50304, d_model=1024, n_layers=layers, n_heads=16,
                                         d_ff=4096, scan_layers=scan, dtype="bfloat16",
                                         attention=attention)


def path_summary(report) -> str:
    """How the sites compute, counted: one line however many layers are unrolled."""
    counts = {}
    for r in report.rows:   # fused siblings count as one path whichever siblings they name
        kernel = re.sub(r"\b(fused|fusable) with [^:(]*", r"\1 with siblings", r.kernel)
        counts[kernel] = counts.get(kernel, 0) + 1
    return "; ".join(f"{n}× {k}" for k, n in counts.items())


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if x is not None and jnp.issubdtype(x.dtype, jnp.floating)
                        else x, tree, is_leaf=lambda x: x is None)


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


class Variant:
    """One recipe on one layout: the functions to time, and their ideal ratios."""

    def __init__(self, name, model, cfg, params, prefill_tokens, smoke):
        self.name, self.model, self.cfg = name, model, cfg
        self.profiles = {}   # measure -> step_profile.summarise(...) (--profile), or {"error": ...}
        if name == "dense":
            self.train_fwd = self.infer_fwd = lambda p, s, *a: model.apply(p, *a)
            self.params, self.sstate = params, None
            self.flop_ratio = self.byte_ratio = 1.0
            self.infer_params = params
            self.err = 0.0
            self.paths = {}
            return
        sfn = sj.sparsify(model.apply, RECIPES[name]())
        sparams, sstate = sfn.init(params, prefill_tokens, rng=jax.random.key(4))
        report = sfn.report()
        dense_flops = cfg.flops_per_token(prefill_tokens.shape[1]) * prefill_tokens.size
        self.flop_ratio = dense_flops / (dense_flops - (report.flops_before - report.flops_after))
        # The rewritten linear layers' share of the dense GEMM FLOPs (they and the head are the
        # GEMMs; attention runs in its own kernels), and their own FLOP ratio: --profile's ceiling.
        head_flops = 2 * cfg.d_model * cfg.vocab_size * prefill_tokens.size
        self.linear_gemm_share = report.flops_before / (report.flops_before + head_flops)
        self.linear_ratio = report.flops_before / max(report.flops_after, 1)
        self.params, self.sstate = sparams, sstate
        self.paths = {}   # measure -> how the sites computed it (paths are chosen when traced)
        if name.startswith("block"):
            if INFER == "packed":     # memory ∝ density: only the kept blocks are held
                lowered = sfn.lower(sstate, packed=True, fuse_siblings=FUSE_SIBLINGS)
                self.infer_params = lowered.pack(sparams)
            else:                     # dense pre-masked leaves: XLA's candidate is dense's cost
                lowered = sfn.lower(sstate, premasked=True, fuse_siblings=FUSE_SIBLINGS)
                self.infer_params = lowered.premask(sparams, sstate)
            self.train_fwd = sfn.lower(sstate, fuse_siblings=FUSE_SIBLINGS)
            self.infer_fwd = lowered
            self.report = lowered.report()
        elif INFER == "premasked":
            # Monarch: prefill and decode run the copy whose leaves also hold their dense
            # product, so each site weighs the dense program's own dot (never slower than it).
            lowered = sfn.lower(sstate, premasked=True)
            self.infer_params = lowered.premask(sparams, sstate)
            self.train_fwd, self.infer_fwd = sfn, lowered
            self.report = lowered.report()
        else:
            self.train_fwd = self.infer_fwd = sfn
            self.infer_params = sparams
            self.report = report
        # Bytes a decode step must read: every weight once (kept part only where lowered), the cache.
        dense_w = sum(r.params_before for r in report.rows)
        kept_w = sum(r.params_after for r in report.rows)
        total_w = sum(x.size for x in jax.tree.leaves(params))
        self.byte_ratio = total_w / (total_w - dense_w + kept_w)
        # Both forms a timing uses (training's, and inference's from its own params) against
        # the masked XLA program; the worse error is reported.
        small = prefill_tokens[:2, :64]
        # Each site's first candidate (the kernel where one runs), not a measured choice: a
        # choice made for 128 tokens would cost a measurement no timed call uses (Monarch
        # sites choose their path in the sparsified program itself, not only when lowered).
        with path_choice.mode("off"):
            masked = jax.jit(sfn)(_cast(sparams, jnp.float32), sstate, small)
            self.err = max(
                rel_err(jax.jit(self.train_fwd)(_cast(sparams, jnp.float32), sstate, small), masked),
                rel_err(jax.jit(self.infer_fwd)(_cast(self.infer_params, jnp.float32), sstate,
                                                small), masked))


def train_step(v: Variant):
    """``(step, tx)``: ``step(params, opt_state, sstate, tokens)``, one AdamW step of ``v``, unjitted."""
    tx = optax.adamw(1e-4)
    fwd = v.train_fwd

    def step(params, opt_state, sstate, tokens):
        def loss(p):
            logits = fwd(p, sstate, tokens)
            return transformer.lm_loss(logits[:, :-1], tokens[:, 1:])
        l, g = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, l

    return step, tx


def train_runner(v: Variant, compiler_options: dict | None = None):
    """``run(sstate, tokens) -> loss``: one jitted AdamW step of ``v`` on its own copy of the params."""
    step, tx = train_step(v)
    params = jax.tree.map(jnp.copy, v.params)
    jstep = jax.jit(step, donate_argnums=(0, 1), compiler_options=compiler_options)
    state = [params, tx.init(params)]

    def run(sstate, tokens):
        state[0], state[1], l = jstep(state[0], state[1], sstate, tokens)
        return l

    return run


def _progress(t0, what):
    """A timestamped line per phase: a run cut short by its time limit still says where."""
    print(f"  [{time.time() - t0:6.1f} s] {what}", flush=True)


def _profile(v: Variant, measure: str, step, t0) -> None:
    """Traces ``PROFILE_STEPS`` calls of ``step()`` (warm: just timed) into ``v.profiles``.
    A profiler failure is recorded, not raised: the timings stand without it."""
    if not PROFILE_STEPS:
        return
    try:
        v.profiles[measure] = summarise(trace(step, PROFILE_STEPS, warmup=0), top=PROFILE_TOP)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        v.profiles[measure] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        _progress(t0, f"{v.name} {measure} profile failed: {v.profiles[measure]['error']}")
        return
    p = v.profiles[measure]
    _progress(t0, f"{v.name} {measure} profile: kernels {p['total_us']:.0f} µs/step, "
              f"{p['launches']:.0f} launches; " + ", ".join(
                  f"{c} {us:.0f}" for c, us in p["categories"].items() if us))


def _tune(v: Variant, measure: str, sfn, step, args, out: dict, t0, repeats: int, retime) -> None:
    """``--tune``: the sparse function's close per-site choices settled on the whole ``step``
    (``SparseFunction.tune``). The program with the switches kept is timed again as the
    measure was (``retime(compiler_options)``, a fresh trace compiled with the XLA options
    the tuning kept) and joins the table as ``"<measure> tuned"``; with none kept it is the
    program already timed."""
    if not TUNE or v.name == "dense":
        return
    tuning = sfn.tune(step, *args, repeats=repeats, budget_s=TUNE_BUDGET_S)
    options = tuning.compiler_options
    out[f"{measure} tuned"] = (retime(options or None) if tuning.verdicts or options
                               else out[measure])
    kept = [f"{key.split('|', 1)[1][:70]}: {path}" for key, path in tuning.verdicts.items()]
    kept += [f"XLA {k}={val}" for k, val in options.items()]
    v.paths[f"{measure} tuned"] = "; ".join(kept) or f"no switch kept of {len(tuning.trials)} tried"
    _progress(t0, f"{v.name} {measure} tuned: {tuning.summary()}")


def time_variant(v: Variant, measures, batch, seq, smoke) -> dict:
    cfg, out = v.cfg, {}
    t0 = time.time()
    tokens = jax.random.randint(jax.random.key(2), (batch, seq), 0, cfg.vocab_size)
    calls, repeats = (1, 2) if smoke else (3, 7)
    infer_params = _cast(v.infer_params, jnp.bfloat16) if not smoke else v.infer_params
    # Each measure is timed by one function of its (jitted) step, so a tuned step is timed
    # exactly as the step it replaces (a fresh function: a fresh trace takes the verdicts).
    if "prefill" in measures:
        prefill_seconds = lambda f: median_seconds(f, infer_params, v.sstate, tokens, calls=calls,
                                                   repeats=repeats)
        f = jax.jit(v.infer_fwd)
        out["prefill"] = prefill_seconds(f)
        _progress(t0, f"{v.name} prefill {1e3 * out['prefill']:.2f} ms")
        _profile(v, "prefill", lambda: f(infer_params, v.sstate, tokens), t0)
        v.paths["prefill"] = path_summary(v.infer_fwd.report()) if v.name != "dense" else ""
        _tune(v, "prefill", v.infer_fwd, lambda *a: v.infer_fwd(*a),
              (infer_params, v.sstate, tokens), out, t0, repeats,
              lambda o: prefill_seconds(jax.jit(lambda *a: v.infer_fwd(*a), compiler_options=o)))
    if "train" in measures:
        train_seconds = lambda run: median_seconds(run, v.sstate, tokens, calls=calls,
                                                   repeats=repeats)
        run = train_runner(v)
        out["train"] = train_seconds(run)
        _progress(t0, f"{v.name} train {1e3 * out['train']:.2f} ms")
        _profile(v, "train", lambda: run(v.sstate, tokens), t0)
        del run   # its params and optimizer state
        v.paths["train"] = path_summary(v.train_fwd.report()) if v.name != "dense" else ""
        if TUNE and v.name != "dense":
            step, tx = train_step(v)
            _tune(v, "train", v.train_fwd, step, (v.params, tx.init(v.params), v.sstate, tokens),
                  out, t0, repeats, lambda o: train_seconds(train_runner(v, o)))
    for m in measures:
        if not m.startswith("decode"):
            continue
        b = int(m[len("decode"):])
        cache_len = 64 if smoke else 1024
        cache = transformer.init_cache(cfg, b, cache_len, jnp.bfloat16 if not smoke else jnp.float32)
        tok = jax.random.randint(jax.random.key(3), (b, 1), 0, cfg.vocab_size)
        pos = jnp.int32(cache_len - 1)

        def decode_seconds(f):
            # One form for every decode time: the jitted step returns the logits and the
            # updated cache (a step returning the logits alone timed 0.18 ms less on the H200).
            return median_seconds(lambda p, c: f(p, v.sstate, tok, c, pos)[0], infer_params, cache,
                                  calls=calls * 3, repeats=repeats)

        f = jax.jit(v.infer_fwd)
        out[m] = decode_seconds(f)
        _progress(t0, f"{v.name} {m} {1e3 * out[m]:.3f} ms")
        _profile(v, m, lambda: f(infer_params, v.sstate, tok, cache, pos)[0], t0)
        v.paths[m] = path_summary(v.infer_fwd.report()) if v.name != "dense" else ""
        fwd = v.infer_fwd
        _tune(v, m, fwd, lambda p, s, c: fwd(p, s, tok, c, pos), (infer_params, v.sstate, cache),
              out, t0, repeats,
              lambda o: decode_seconds(jax.jit(lambda *a: fwd(*a), compiler_options=o)))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", default="dense," + ",".join(RECIPES))
    parser.add_argument("--layouts", default="scan,unrolled")
    parser.add_argument("--measure", default=",".join(MEASURES))
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--attention", choices=transformer.ATTENTION, default="fused",
                        help="the LM's attention: fused (flash attention on GPU) or explicit")
    parser.add_argument("--infer", choices=("premasked", "packed"), default="premasked",
                        help="prefill/decode weights: dense pre-masked leaves, or packed kept blocks")
    parser.add_argument("--fuse_siblings", action="store_true",
                        help="lower(..., fuse_siblings=True): sibling sites (q/k/v, gate/up) may "
                             "run as one block-sparse kernel over their concatenated weights")
    parser.add_argument("--profile", action="store_true",
                        help="after timing each measure, trace a few calls with jax.profiler and "
                             "add device kernel time per category (and vs dense) to the tables")
    parser.add_argument("--profile_steps", type=int, default=3, help="calls traced per measure")
    parser.add_argument("--tune", action="store_true",
                        help="after each sparse measure, time the whole step with each close "
                             "per-site path choice switched (SparseFunction.tune) and add "
                             "'<measure> tuned' rows")
    parser.add_argument("--tune_budget_s", type=float, default=120.0,
                        help="per measure: no tuning trial starts past this many seconds")
    parser.add_argument("--budget_s", type=float, default=1e9,
                        help="variants that would start after this many seconds are skipped (listed)")
    args = parser.parse_args()
    smoke = args.smoke
    global INFER, FUSE_SIBLINGS, PROFILE_STEPS, TUNE, TUNE_BUDGET_S
    INFER, FUSE_SIBLINGS, TUNE = args.infer, args.fuse_siblings, args.tune
    TUNE_BUDGET_S = args.tune_budget_s
    PROFILE_STEPS = max(args.profile_steps, 1) if args.profile else 0
    recipes = [r for r in args.recipes.split(",") if r]
    if "dense" not in recipes:
        recipes.insert(0, "dense")
    measures = [m for m in args.measure.split(",") if m]
    batch, seq = (2, 32) if smoke else (8, 1024)
    results, lines_err = {}, []
    t_start = time.time()
    for layout in args.layouts.split(","):
        cfg = model_config(smoke, args.layers, layout == "scan", args.attention)
        model = transformer.TransformerLM(cfg)
        tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, cfg.vocab_size)
        params = jax.jit(model.init)(jax.random.key(1), tokens)
        for name in recipes:
            t0 = time.time()
            if t0 - t_start > args.budget_s:
                lines_err.append(f"- {layout}/{name}: skipped (past --budget_s {args.budget_s:.0f})")
                continue
            try:
                v = Variant(name, model, cfg, params, tokens, smoke)
                _progress(t0, f"{layout}/{name}: sparsified, initialised and checked")
                times = time_variant(v, measures, batch, seq, smoke)
            except Exception as e:  # one failing variant must not lose the others' numbers
                traceback.print_exc()
                lines_err.append(f"- {layout}/{name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
                continue
            results[(layout, name)] = (v, times)
            print(f"{layout} {name}: " + ", ".join(f"{k} {1e3 * t:.3f} ms" for k, t in times.items())
                  + f" (err vs masked {v.err:.1e}; {time.time() - t0:.0f}s)", flush=True)
            for m, paths in v.paths.items():
                print(f"  {m} paths: {paths}", flush=True)
            if os.environ.get("OUT"):   # what was measured so far survives a time limit
                write_table(results, lines_err, cfg, batch, seq, smoke, t_start, final=False)
    print(write_table(results, lines_err, cfg, batch, seq, smoke, t_start))


def profile_section(results) -> tuple[list[str], list[dict]]:
    """``--profile``'s markdown lines and JSON rows: per layout, variant and measure, device
    kernel µs and launches per step by category, a sparse variant's difference from dense in
    the same layout, and the slowest kernels. Nothing when no variant was profiled."""
    rows = []
    for (layout, name), (v, times) in results.items():
        for m, p in v.profiles.items():
            row = {"layout": layout, "recipe": name, "measure": m,
                   "timed_ms": 1e3 * times[m] if m in times else None, **p}
            dense = results.get((layout, "dense"))
            dp = dense[0].profiles.get(m) if dense else None
            if name != "dense" and dp and "error" not in dp and "error" not in p:
                kinds = {k: [p["kinds"].get(k, (0, 0))[0] - dp["kinds"].get(k, (0, 0))[0],
                             p["kinds"].get(k, (0, 0))[1] - dp["kinds"].get(k, (0, 0))[1]]
                         for k in {*p["kinds"], *dp["kinds"]}}
                row["vs_dense"] = {"total_us": p["total_us"] - dp["total_us"],
                                   "launches": p["launches"] - dp["launches"],
                                   "categories": {c: p["categories"][c] - dp["categories"][c]
                                                  for c in CATEGORIES},
                                   # the kernel kinds whose time grew most, then shrank most
                                   "kinds_up": sorted(([k, *d] for k, d in kinds.items() if d[0] >= 0.5),
                                                      key=lambda x: -x[1])[:PROFILE_TOP],
                                   "kinds_down": sorted(([k, *d] for k, d in kinds.items() if d[0] <= -0.5),
                                                        key=lambda x: x[1])[:PROFILE_TOP // 2]}
            rows.append(row)
    if not rows:
        return [], []
    short = {"Pallas / Mosaic kernels": "Pallas/Mosaic", "GEMM (cuBLAS / CUTLASS)": "GEMM",
             "attention (cuDNN)": "attention", "XLA fusions": "XLA fusions",
             "copies and other": "copies/other"}
    head = " | ".join(short.get(c, c) for c in CATEGORIES)
    lines = ["", f"### Device kernel time per step (jax.profiler, {PROFILE_STEPS} traced calls "
             "after timing)", "",
             "µs per step summed over the device's streams (on CPU: the host's XLA ops, a check of "
             "the script only); launches = kernels run per step. Timed ms is the table's median "
             "step: kernel µs well below it means the device waits (launch or host gaps); above "
             "it, streams overlap.", "",
             f"| layout | recipe | measure | timed ms | kernel µs | launches | {head} |",
             "|---|---|---|---|---|---|" + "---|" * len(CATEGORIES)]
    for r in rows:
        timed = f"{r['timed_ms']:.2f}" if r["timed_ms"] is not None else "-"
        if "error" in r:
            lines.append(f"| {r['layout']} | {r['recipe']} | {r['measure']} | {timed} | "
                         f"profile failed: {r['error'][:150]} |")
            continue
        lines.append(f"| {r['layout']} | {r['recipe']} | {r['measure']} | {timed} | "
                     f"{r['total_us']:.0f} | {r['launches']:.0f} | "
                     + " | ".join(f"{r['categories'][c]:.0f}" for c in CATEGORIES) + " |")
    diffs = [r for r in rows if "vs_dense" in r]
    if diffs:
        lines += ["", "Sparse minus dense, per step (positive: the sparse step spends more there):", "",
                  f"| layout | recipe | measure | Δ timed ms | Δ kernel µs | Δ launches | {head} |",
                  "|---|---|---|---|---|---|" + "---|" * len(CATEGORIES)]
        for r in diffs:
            d = r["vs_dense"]
            dense_ms = results[(r["layout"], "dense")][1].get(r["measure"])
            dt = (f"{r['timed_ms'] - 1e3 * dense_ms:+.2f}"
                  if r["timed_ms"] is not None and dense_ms is not None else "-")
            lines.append(f"| {r['layout']} | {r['recipe']} | {r['measure']} | {dt} | "
                         f"{d['total_us']:+.0f} | {d['launches']:+.0f} | "
                         + " | ".join(f"{d['categories'][c]:+.0f}" for c in CATEGORIES) + " |")
        lines += ["", "Kernel kinds (name less its instance number) whose time per step changed "
                  "most vs dense: Δ µs (Δ launches):", ""]
        for r in diffs:
            d = r["vs_dense"]
            lines.append(f"- {r['layout']}/{r['recipe']} {r['measure']}: more: " + (
                "; ".join(f"{k[:60]} {us:+.0f} ({n:+g})" for k, us, n in d["kinds_up"]) or "-")
                + ". less: " + ("; ".join(f"{k[:60]} {us:+.0f} ({n:+g})" for k, us, n in d["kinds_down"])
                                or "-"))
    ceilings = [_ceiling(results, r) for r in diffs if r["measure"] in ("prefill", "train")]
    ceilings = [c for c in ceilings if c is not None]
    if ceilings:
        lines += ["", "What the step allows (Amdahl): the dense step's GEMM time split between the "
                  "rewritten linear layers and the head by their FLOPs; the step if those layers "
                  "cost nothing, and if they ran at their FLOP-ideal fraction of dense's time:", "",
                  "| layout | recipe | measure | dense ms | linear layers' GEMMs ms | ceiling, free | "
                  "ceiling, at FLOP-ideal | measured |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['layout']} | {c['recipe']} | {c['measure']} | {c['dense_ms']:.2f} | "
                  f"{c['linear_ms']:.2f} | {c['free']:.2f}× | {c['at_ideal']:.2f}× | "
                  f"{c['measured']:.2f}× |" for c in ceilings]
        for r, c in zip([r for r in diffs if r["measure"] in ("prefill", "train")], ceilings):
            r["ceiling"] = c
    lines += ["", f"Slowest {PROFILE_TOP} kernels per step (µs; ×launches where not one):", ""]
    lines += [f"- {r['layout']}/{r['recipe']} {r['measure']}: "
              + "; ".join(f"{top_line(t)} ({short.get(t['category'], t['category'])})"
                          for t in r["top"])
              for r in rows if "error" not in r]
    return lines, rows


def _ceiling(results, row) -> dict | None:
    """Amdahl's bound for one profiled sparse measure (see ``profile_section``)."""
    v, times = results[(row["layout"], row["recipe"])]
    dense = results.get((row["layout"], "dense"))
    if dense is None or row["measure"] not in dense[1] or row["measure"] not in times:
        return None
    dp = dense[0].profiles.get(row["measure"])
    if not dp or "error" in dp:
        return None
    dense_ms = 1e3 * dense[1][row["measure"]]
    linear_ms = 1e-3 * dp["categories"]["GEMM (cuBLAS / CUTLASS)"] * v.linear_gemm_share
    rest = max(dense_ms - linear_ms, 1e-9)
    return {"layout": row["layout"], "recipe": row["recipe"], "measure": row["measure"],
            "dense_ms": dense_ms, "linear_ms": linear_ms, "free": dense_ms / rest,
            "at_ideal": dense_ms / (rest + linear_ms / v.linear_ratio),
            "measured": dense[1][row["measure"]] / times[row["measure"]]}


def write_table(results, lines_err, cfg, batch, seq, smoke, t_start, final=True) -> str:
    """The table of every variant measured so far, written to ``$OUT`` (after each variant, so
    a run cut short by its time limit still leaves it) and returned."""
    device = f"{jax.devices()[0].device_kind}"
    lines = [f"## {time.strftime('%Y-%m-%d')}: {device}, JAX {jax.__version__}", "",
             f"Command: `python benchmarks/{pathlib.Path(__file__).name} {' '.join(sys.argv[1:])}`", "",
             f"LM d_model {cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, d_ff {cfg.d_ff}, "
             f"vocab {cfg.vocab_size}, {cfg.dtype}, {cfg.attention} attention; prefill/train batch {batch}×{seq}; decode one "
             f"token, KV cache {64 if smoke else 1024}. Ratios are dense time / sparse time in the "
             "same run; ideal = FLOP-ideal (prefill, train) or bytes-ideal (decode)."
             + (" Sibling sites (q/k/v, gate/up) may fuse into one kernel (--fuse_siblings)."
                if FUSE_SIBLINGS else ""), "",
             "| layout | recipe | measure | dense ms | sparse ms | vs dense | ideal | of ideal | paths |",
             "|---|---|---|---|---|---|---|---|---|"]
    table = []
    for (layout, name), (v, times) in results.items():
        if name == "dense":
            continue
        dense = results.get((layout, "dense"))
        for m, t in times.items():
            base = m.removesuffix(" tuned")       # a tuned step against the same dense time
            if dense is None or base not in dense[1]:
                continue
            td = dense[1][base]
            ideal = v.byte_ratio if m.startswith("decode") else v.flop_ratio
            ratio = td / t
            table.append({"layout": layout, "recipe": name, "measure": m, "dense_ms": 1e3 * td,
                          "sparse_ms": 1e3 * t, "speedup": ratio, "ideal": ideal,
                          "err_vs_masked": v.err, "paths": v.paths.get(m, "")})
            lines.append(f"| {layout} | {name} | {m} | {1e3 * td:.2f} | {1e3 * t:.2f} | {ratio:.2f}× | "
                         f"{ideal:.2f}× | {ratio / ideal:.2f} | {v.paths.get(m, '')[:200]} |")
    profile_lines, profiles = profile_section(results)
    lines += profile_lines
    if lines_err:
        lines += ["", "Failed variants:"] + lines_err
    wall = "Total wall time" if final else "Run in progress; wall time so far"
    lines += ["", f"{wall} {time.time() - t_start:.0f} s."]
    text = "\n".join(lines) + "\n"
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], "e2e_speed.md").write_text(text)
        pathlib.Path(os.environ["OUT"], "e2e_speed.json").write_text(json.dumps(
            {"device": device, "jax": jax.__version__, "rows": table,
             **({"profiles": profiles} if profiles else {})}, indent=1))
        # What the sites measured, in the form of a shipped table (sparsejax/kernels/path_tables/).
        path_choice.write_table(pathlib.Path(os.environ["OUT"], f"path_table_{path_choice.device_key()}.json"))
    return text


if __name__ == "__main__":
    main()
