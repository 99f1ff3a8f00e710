"""One-shot pruning quality: magnitude, Wanda, SparseGPT and DSnoT on a dense LM, one command.

    python benchmarks/oneshot_quality.py --preset cpu        # 0.92M parameters, CPU (~30 min)
    python benchmarks/oneshot_quality.py --smoke             # a one-minute check that it runs
    python benchmarks/oneshot_quality.py --preset smoke-large   # the GPU preset's code path, tiny, CPU
    source benchmarks/device_env.sh && python benchmarks/oneshot_quality.py --large
                                                             # 61M parameters, one H200, < 8 min

Trains a dense LM (train.py's Transformer: RMSNorm, RoPE, SwiGLU; byte vocab)
on train.py's offline corpus (the interpreter's own standard-library source,
byte level; ``--large`` reads the whole stdlib rather than train.py's 4 MB cap,
and the corpus fingerprint is recorded since it depends on the Python
version), then prunes the block weights (``presets.SPARSE_WEIGHTS``: q, k, v,
o, gate, up, down of every layer; embedding and head stay dense) with each
method at 50 / 60 / 70% unstructured, 2:4 and 4:8, through ``sparsejax.oneshot``
with sequential calibration on training-split sequences, and reports held-out
perplexity (train.py's validation split). No fine-tuning. "gap closed" is
(ppl_magnitude − ppl_method) / (ppl_magnitude − ppl_dense). DSnoT starts from
Wanda's mask; its row is compared with Wanda's.

Time: ``--train_s`` bounds the training loop (compile included): the step
count is fixed after a few timed steps so that the cosine schedule ends on
time; ``--budget_s`` bounds the whole script (from process start): a
configuration whose estimated time no longer fits is skipped and marked so.
The configurations run in the order of the issue's goals (50%, 4:8, 70%, 2:4,
60%); the tables are rewritten after every method, so a run cut short still
leaves its results in ``$OUT/oneshot_quality.md`` (.json beside it).

Also reported: how uneven the calibration inputs' channel norms are (max and
99th percentile over median of ‖X_j‖₂, per weight kind, averaged over layers).
Wanda's |W_ij|·‖X_j‖₂ only departs from magnitude's ranking where a few
channels are much louder than the rest (the "outlier features" of large LMs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time

T_PROCESS = time.time()   # the budget counts from here (imports included)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # train.py; the package comes from the install (or device_env.sh)
    sys.path.append(ROOT)

import sparsejax as sj  # noqa: E402
from sparsejax.training import data, presets  # noqa: E402
from sparsejax.compiler import calibration  # noqa: E402
from sparsejax.models import transformer  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt", "dsnot")
CONFIGS = {"50%": ("prune", 0.5), "60%": ("prune", 0.6), "70%": ("prune", 0.7),
           "2:4": ("nm", 2, 4), "4:8": ("nm", 4, 8)}
TABLE_ORDER = ("50%", "60%", "70%", "2:4", "4:8")
RUN_ORDER = ("50%", "4:8", "70%", "2:4", "60%")     # the goals first, in case the budget runs out
GOAL_GAP = 0.70
ABLATIONS = ("wanda per matrix", "magnitude per output")
COMMIT = "unknown"       # the code's commit, read when the run starts
WHOLE_STDLIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Size:
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    seq_len: int
    batch_size: int
    steps: int                 # training steps; 0: as many as fit in train_s
    train_s: float             # wall-time bound of the training loop when steps == 0
    learning_rate: float
    warmup_steps: int
    b2: float
    weight_decay: float
    calib_seqs: int            # calibration sequences of seq_len tokens
    calib_batch: int           # ... per batch
    eval_batches: int          # held-out batches of batch_size × seq_len
    dtype: str
    scan_layers: bool
    max_bytes: int             # corpus cap (train.py: data.STDLIB_MAX_BYTES)
    budget_s: float            # 0: no bound


PRESETS = {
    # The recorded CPU run (train.py's defaults for the optimizer: AdamW, no decay, cosine).
    "cpu": Size(128, 4, 4, 384, 128, 16, 800, 0, 3e-3, 50, 0.999, 0.0, 64, 16, 16, "float32",
                False, data.STDLIB_MAX_BYTES, 0),
    "smoke": Size(32, 1, 2, 64, 32, 8, 30, 0, 3e-3, 5, 0.999, 0.0, 16, 8, 2, "float32",
                  False, data.STDLIB_MAX_BYTES, 0),
    # One H200: 61.3M parameters (d 640, 12 layers, d_ff 1792), bf16 compute, seq 512,
    # 64 × 512 tokens a step for 150 s (compile included), calibration 128 × 512 tokens; sized
    # for < 8 minutes in all (the pruning estimated at ~145 s, budget 480 s from process start).
    "large": Size(640, 12, 10, 1792, 512, 64, 0, 150, 1e-3, 200, 0.95, 0.1, 128, 128, 16,
                  "bfloat16", True, WHOLE_STDLIB, 480),
    # The large preset's code path (time-bounded training, scanned layers, bf16, budget) at toy size.
    "smoke-large": Size(32, 2, 2, 64, 32, 8, 0, 8, 3e-3, 5, 0.95, 0.1, 16, 16, 2, "bfloat16",
                        True, WHOLE_STDLIB, 150),
}


def recipe_for(config):
    pattern = presets.SPARSE_WEIGHTS["lm"]
    if config[0] == "prune":
        return [sj.Prune(pattern, config[1])]
    return [sj.NM(pattern, config[1], config[2])]


def elapsed() -> float:
    return time.time() - T_PROCESS


def say(line: str) -> None:
    print(f"[{elapsed():6.1f} s] {line}", flush=True)


# ----------------------------------------------------------------------------- training


def lr_at(step: int, size: Size, total: int) -> float:
    """Linear warm-up, then cosine to a tenth (optax.warmup_cosine_decay_schedule, as train.py)."""
    warmup = min(size.warmup_steps, max(total - 1, 1))
    if step < warmup:
        return size.learning_rate * step / warmup
    t = min((step - warmup) / max(total - warmup, 1), 1.0)
    return size.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_dense(model, size: Size, corpus, eval_batches) -> tuple[dict, dict]:
    """AdamW on random windows of the training split; returns (params, training info)."""
    batches = data.LMBatches(corpus.train, size.batch_size, size.seq_len, seed=0)
    params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(batches.batch(0)["inputs"]))
    decay_mask = jax.tree.map(lambda x: x.ndim >= 2, params)   # kernels and embeddings, not norms
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(b2=size.b2),
                     optax.add_decayed_weights(size.weight_decay, decay_mask))
    opt_state = tx.init(params)

    def loss_fn(p, inputs, targets):
        return transformer.lm_loss(model.apply(p, inputs), targets)

    def step_fn(p, opt, inputs, targets, lr):
        loss, grads = jax.value_and_grad(loss_fn)(p, inputs, targets)
        updates, opt = tx.update(grads, opt, p)
        p = jax.tree.map(lambda w, u: w - lr * u, p, updates)
        return p, opt, loss

    step_fn = jax.jit(step_fn, donate_argnums=(0, 1))
    monitor = eval_batches[:2]
    t0 = time.time()
    total = size.steps if size.steps else 10 ** 9
    probe = min(10, max(size.warmup_steps // 2, 2))   # steps timed to fix the step count
    pending, log_every, last_log, history = [], 10.0, time.time(), []
    step, probe_start = 0, None
    while step < total:
        b = batches.batch(step)
        params, opt_state, loss = step_fn(params, opt_state, b["inputs"], b["targets"],
                                          jnp.float32(lr_at(step, size, total)))
        pending.append(loss)
        if len(pending) > 4:       # bound how far the host runs ahead of the device
            pending.pop(0).block_until_ready()
        step += 1
        if not size.steps and step == 1 + probe:
            loss.block_until_ready()
            per_step = (time.time() - probe_start) / probe
            left = size.train_s - (time.time() - t0)
            total = max(step + int(left / per_step), step + 1)
            say(f"{per_step * 1e3:.1f} ms a step ({size.batch_size * size.seq_len / per_step:,.0f} "
                f"tokens/s): training for {total} steps")
        if not size.steps and time.time() - t0 > 1.2 * size.train_s + 10:
            say(f"step {step}: training stopped at {time.time() - t0:.0f} s, well past --train_s "
                f"{size.train_s:.0f} s (a slow compile, or steps slower than timed)")
            total = step
        if (step > 1 and time.time() - last_log > log_every) or step == total:
            last_log = time.time()
            val = held_out_loss(model, params, monitor)
            history.append((step, float(loss), val))
            say(f"step {step}/{total if total < 10 ** 9 else '?'}: train loss {float(loss):.4f}, "
                f"held-out loss (2 batches) {val:.4f}, lr {lr_at(step, size, total):.2e}")
        if not size.steps and step == 1:
            loss.block_until_ready()
            say(f"train step compiled and run once: {time.time() - t0:.1f} s")
            held_out_loss(model, params, monitor)        # compile the monitor outside the timing
            probe_start = time.time()
    jax.block_until_ready(params)
    seconds = time.time() - t0
    info = {"steps": step, "seconds": seconds,
            "tokens": step * size.batch_size * size.seq_len, "history": history,
            "epochs": step * size.batch_size * size.seq_len / corpus.train.size}
    return params, info


_eval_apply = {}


def held_out_loss(model, params, batches) -> float:
    fn = _eval_apply.get(id(model))
    if fn is None:
        def fn(p, inputs, targets, weights):
            loss = transformer.lm_loss(model.apply(p, inputs), targets, weights)
            return loss * jnp.sum(weights), jnp.sum(weights)
        fn = _eval_apply[id(model)] = jax.jit(fn)
    total = weight = 0.0
    for b in batches:
        s, w = fn(params, b["inputs"], b["targets"], b["weights"])
        total, weight = total + float(s), weight + float(w)
    return total / weight


def channel_norm_stats(program, params, calib, keys_by_kind) -> dict:
    """Per weight kind: mean over layers of max / median and p99 / median of ‖X_j‖₂."""
    keys = sorted({k for ks in keys_by_kind.values() for k in ks})
    sq = program.collect(params, calib, keys, observer=_channel_sqsum)
    out = {}
    for kind, ks in keys_by_kind.items():
        ratios_max, ratios_p99 = [], []
        for k in ks:
            norms = np.sqrt(np.asarray(sq[k], np.float64)).reshape(-1, np.asarray(sq[k]).shape[-1])
            for row in norms:                    # one row per layer of a scanned stack
                med = max(np.median(row), 1e-30)
                ratios_max.append(row.max() / med)
                ratios_p99.append(np.percentile(row, 99) / med)
        out[kind] = (float(np.mean(ratios_max)), float(np.mean(ratios_p99)))
    return out


def _channel_sqsum(x2):
    x = x2.astype(jnp.float32)
    return (x * x).sum(0)


# ----------------------------------------------------------------------------- the run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--large", action="store_true", help="--preset large (one H200)")
    ap.add_argument("--smoke", action="store_true", help="--preset smoke (tiny, CPU)")
    for f in dataclasses.fields(Size):
        ap.add_argument(f"--{f.name}", type=(lambda s: s.lower() in ("1", "true", "yes"))
                        if f.type in (bool, "bool") else
                        {"int": int, "float": float, "str": str}.get(str(f.type), str),
                        default=None, help=f"override the preset's {f.name}")
    ap.add_argument("--configs", default=",".join(RUN_ORDER), help="comma-separated, in run order")
    args = ap.parse_args()
    preset = "large" if args.large else "smoke" if args.smoke else args.preset
    size = dataclasses.replace(PRESETS[preset], **{f.name: getattr(args, f.name)
                                                  for f in dataclasses.fields(Size)
                                                  if getattr(args, f.name) is not None})
    run_order = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in run_order:
        if c not in CONFIGS:
            raise SystemExit(f"--configs: unknown configuration {c!r}; use some of {list(CONFIGS)}")
    budget = size.budget_s or float("inf")
    global COMMIT
    COMMIT = _commit()
    out_dir = os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results")
    name = "oneshot_quality" if preset in ("cpu", "large") else f"oneshot_quality_{preset}"
    os.makedirs(out_dir, exist_ok=True)
    command = "python benchmarks/oneshot_quality.py " + " ".join(sys.argv[1:])

    say(f"preset {preset}: {size}; devices {jax.devices()}")
    corpus = data.load_stdlib_corpus(max_bytes=size.max_bytes)
    corpus.check_seq_len(size.seq_len)
    say(f"corpus {corpus.describe()}")
    cfg = transformer.TransformerConfig(vocab_size=256, d_model=size.d_model, n_layers=size.n_layers,
                                        n_heads=size.n_heads, d_ff=size.d_ff, dtype=size.dtype,
                                        scan_layers=size.scan_layers)
    model = transformer.TransformerLM(cfg)
    evals = [{k: jnp.asarray(v) for k, v in b.items()} for b in
             data.lm_eval_batches(corpus.valid, size.batch_size, size.seq_len, size.eval_batches)]
    say(f"model: {cfg.num_params() / 1e6:.2f}M parameters; training")
    params, train_info = train_dense(model, size, corpus, evals)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert n_params == cfg.num_params(), (n_params, cfg.num_params())
    dense_ppl = math.exp(held_out_loss(model, params, evals))
    eval_tokens = int(sum(float(jnp.sum(b["weights"])) for b in evals))
    say(f"dense: {n_params / 1e6:.2f}M parameters, held-out perplexity {dense_ppl:.3f} on "
        f"{eval_tokens} tokens; {train_info['steps']} steps, {train_info['epochs']:.1f} epochs, "
        f"{train_info['seconds']:.0f} s")

    # Calibration: training-split windows from a stream the training never drew (seed 1).
    calib_stream = data.LMBatches(corpus.train, size.calib_batch, size.seq_len, seed=1)
    calib = [(jnp.asarray(calib_stream.batch(i)["inputs"]),)
             for i in range(max(size.calib_seqs // size.calib_batch, 1))]
    program = calibration.trace(model.apply, params, *calib[0])
    kinds = {}
    for s in program.sites:
        kind = s.path.split("/")[-2]
        if "layers" in s.path and kind in ("q", "k", "v", "o", "gate", "up", "down"):
            kinds.setdefault(kind, []).append(s.key)
    norm_spread = channel_norm_stats(program, params, calib, kinds)
    say("channel-norm spread (max/median, p99/median): " +
        ", ".join(f"{k} {a:.1f}/{b:.1f}" for k, (a, b) in norm_spread.items()))

    results, skipped, times = {}, [], {}
    meta = dict(preset=preset, command=command, commit=COMMIT, size=dataclasses.asdict(size), n_params=n_params,
                corpus=corpus.describe(), train=train_info, dense_ppl=dense_ppl,
                eval_tokens=eval_tokens, norm_spread=norm_spread, python=platform.python_version(),
                calib_tokens=len(calib) * size.calib_batch * size.seq_len)

    def write():
        table = render(meta, results, skipped)
        with open(os.path.join(out_dir, name + ".md"), "w") as f:
            f.write(table)
        with open(os.path.join(out_dir, name + ".json"), "w") as f:
            json.dump({**meta, "results": {f"{k[0]} {k[1]}": v for k, v in results.items()},
                       "skipped": skipped, "wall_s": elapsed()}, f, indent=1)
        return table

    write()
    for label in run_order:
        for method in METHODS:
            # Estimate: this method's last time (the first, with compiles, for the first one).
            guess = times.get(method, max(times.values(), default=0.0))
            if (label, "magnitude") not in results and method != "magnitude":
                skipped.append(f"{label} {method}")     # no baseline: the gap is undefined
                continue
            if elapsed() + guess + 5 > budget:
                skipped.append(f"{label} {method}")
                say(f"{label} {method}: skipped (budget {budget:.0f} s; {elapsed():.0f} s used, "
                    f"~{guess:.0f} s needed)")
                continue
            t0 = time.time()
            out = sj.oneshot(model.apply, params, calib, recipe_for(CONFIGS[label]), method=method,
                             sequential="layer", observe="all", calibration_program=program)
            jax.block_until_ready(out.params)
            prune_s = time.time() - t0
            ppl = math.exp(held_out_loss(model, out.params, evals))
            times[method] = time.time() - t0
            errs = [r.error_after for r in out.report.sites]
            results[(label, method)] = {"ppl": ppl, "seconds": prune_s,
                                        "mean_rel_error": float(np.mean(errs)),
                                        "sparsity": float(np.mean([r.sparsity for r in out.report.sites])),
                                        "notes": out.report.notes}
            say(f"{label:>4} {method:<10} ppl {ppl:8.3f}  mean rel. error {np.mean(errs):.4f}  "
                f"prune {prune_s:.1f} s ({out.report.passes} calibration passes)")
            write()
    # Ablation, budget permitting: the comparison group (Wanda per matrix, magnitude per output).
    for label in ("50%", "70%", "60%"):
        if label not in run_order:
            continue
        for method, per_output, key in (("wanda", False, "wanda per matrix"),
                                        ("magnitude", True, "magnitude per output")):
            guess = times.get(method, 0.0)
            if elapsed() + guess + 5 > budget:
                say(f"{label} {key}: skipped (budget)")
                continue
            t0 = time.time()
            out = sj.oneshot(model.apply, params, calib, recipe_for(CONFIGS[label]), method=method,
                             per_output=per_output, sequential="layer", observe="all",
                             calibration_program=program)
            ppl = math.exp(held_out_loss(model, out.params, evals))
            errs = [r.error_after for r in out.report.sites]
            results[(label, key)] = {"ppl": ppl, "seconds": time.time() - t0,
                                     "mean_rel_error": float(np.mean(errs)), "notes": []}
            say(f"{label:>4} {key:<20} ppl {ppl:8.3f}  mean rel. error {np.mean(errs):.4f}")
            write()
    print(write())


def render(meta, results, skipped) -> str:
    size = Size(**meta["size"])
    train, corpus = meta["train"], meta["corpus"]
    dense_ppl = meta["dense_ppl"]
    lines = ["# One-shot pruning quality (no fine-tuning)", "",
             f"Command: `{meta['command']}` · device: {jax.devices()[0].device_kind} "
             f"({platform.processor() or platform.machine()}) · JAX {jax.__version__} · Python "
             f"{meta['python']} · commit {meta['commit']} · wall time {elapsed():.0f} s so far.", "",
             f"Model: train.py's LM (RMSNorm, RoPE, SwiGLU, byte vocab), d_model {size.d_model}, "
             f"{size.n_layers} layers, {size.n_heads} heads, d_ff {size.d_ff}, "
             f"{meta['n_params'] / 1e6:.2f}M parameters, {size.dtype} compute. Trained dense for "
             f"{train['steps']} steps of {size.batch_size}×{size.seq_len} tokens "
             f"({train['tokens'] / 1e6:.1f}M tokens, {train['epochs']:.1f} epochs, "
             f"{train['seconds']:.0f} s) with AdamW (peak lr {size.learning_rate:g}, cosine, "
             f"b2 {size.b2}, weight decay {size.weight_decay}). Corpus: {corpus['source']}, "
             f"{corpus['train_tokens']:,} training / {corpus['valid_tokens']:,} held-out bytes, "
             f"fingerprint {corpus['fingerprint']}.", "",
             "Pruned: every q/k/v/o/gate/up/down kernel (embedding and head stay dense). "
             f"Calibration: {meta['calib_tokens']:,} training-split tokens "
             f"({size.calib_seqs}×{size.seq_len}), sequential (each layer on the outputs of "
             "the pruned layers before it). Held-out perplexity on "
             f"{meta['eval_tokens']:,} tokens. Unstructured: magnitude and SparseGPT per matrix, "
             "Wanda and DSnoT per output (as published).", "",
             f"Dense perplexity: {dense_ppl:.3f}", "",
             "| sparsity | magnitude | Wanda | SparseGPT | DSnoT (from Wanda) | gap closed: Wanda | "
             "gap closed: SparseGPT | gap closed: DSnoT |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda x: f"{x:.3f}" if x is not None else "–"
    pct = lambda x: f"{x:.0%}" if x is not None and math.isfinite(x) else "–"
    gaps = {}
    for label in TABLE_ORDER:
        r = {m: results.get((label, m), {}).get("ppl") for m in METHODS}
        if all(v is None for v in r.values()):
            continue
        span = None if r["magnitude"] is None else r["magnitude"] - dense_ppl
        gap = {m: (r["magnitude"] - r[m]) / span if span and span > 0 and r[m] is not None else None
               for m in ("wanda", "sparsegpt", "dsnot")}
        gaps[label] = gap
        lines.append(f"| {label} | {fmt(r['magnitude'])} | {fmt(r['wanda'])} | {fmt(r['sparsegpt'])} | "
                     f"{fmt(r['dsnot'])} | {pct(gap['wanda'])} | {pct(gap['sparsegpt'])} | "
                     f"{pct(gap['dsnot'])} |")
    lines += ["", "Mean relative layer reconstruction error ‖X(W − Ŵ)‖² / ‖XW‖² over the pruned "
              "matrices, and seconds to prune (sequential calibration included):", "",
              "| sparsity | magnitude | Wanda | SparseGPT | DSnoT | s: magnitude | s: Wanda | "
              "s: SparseGPT | s: DSnoT |", "|---|---|---|---|---|---|---|---|---|"]
    for label in TABLE_ORDER:
        rs = [results.get((label, m)) for m in METHODS]
        if all(r is None for r in rs):
            continue
        lines.append(f"| {label} | " + " | ".join(f"{r['mean_rel_error']:.4f}" if r else "–" for r in rs)
                     + " | " + " | ".join(f"{r['seconds']:.1f}" if r else "–" for r in rs) + " |")
    ablation = [(label, [results.get((label, k)) for k in ABLATIONS]) for label in TABLE_ORDER]
    ablation = [(label, rs) for label, rs in ablation if any(rs)]
    if ablation:
        lines += ["", "Comparison group (ablation): held-out perplexity with the other choice of "
                  "where the unstructured sparsity is met:", "",
                  "| sparsity | magnitude per matrix | magnitude per output | Wanda per output | "
                  "Wanda per matrix |", "|---|---|---|---|---|"]
        for label, (w_matrix, m_output) in ablation:
            m, w = (results.get((label, k), {}).get("ppl") for k in ("magnitude", "wanda"))
            lines.append(f"| {label} | {fmt(m)} | {fmt(m_output and m_output['ppl'])} | {fmt(w)} | "
                         f"{fmt(w_matrix and w_matrix['ppl'])} |")
    lines += ["", "Calibration inputs' channel norms ‖X_j‖₂ on the dense model (mean over layers): "
              "max / median and 99th percentile / median:", "",
              "| weights | max / median | p99 / median |", "|---|---|---|"]
    for kind, (a, b) in meta["norm_spread"].items():
        lines.append(f"| {kind} | {a:.1f} | {b:.1f} |")
    lines += ["", "Goals (issue 17): at 50% and at 4:8, Wanda and SparseGPT each close >= 70% of the "
              "gap between magnitude and dense; DSnoT better than its starting mask (Wanda) at 70%.", ""]
    for label in ("50%", "4:8"):
        for m, mname in (("wanda", "Wanda"), ("sparsegpt", "SparseGPT")):
            g = gaps.get(label, {}).get(m)
            if g is None:
                lines.append(f"- {label}, {mname}: " + ("gap undefined (magnitude not worse than "
                             "dense)" if results.get((label, m)) else "not measured"))
                continue
            lines.append(f"- {label}, {mname}: gap closed {g:.0%} (goal >= 70%): "
                         f"{'met' if g >= GOAL_GAP else 'not met'}")
    d70, w70 = (results.get(("70%", m), {}).get("ppl") for m in ("dsnot", "wanda"))
    if d70 is not None and w70 is not None:
        lines.append(f"- 70%, DSnoT {d70:.3f} vs Wanda {w70:.3f}: {'met' if d70 < w70 else 'not met'}")
    else:
        lines.append("- 70%, DSnoT vs Wanda: not measured")
    if skipped:
        lines += ["", f"Skipped (time budget {size.budget_s:.0f} s): " + ", ".join(skipped)]
    notes = sorted({n for r in results.values() for n in r.get("notes", [])})
    if notes:
        lines += ["", "Notes from oneshot: " + "; ".join(notes[:5]) + (" ..." if len(notes) > 5 else "")]
    history = train.get("history") or []
    if len(history) > 12:      # a dozen points, the last included
        history = [history[i * (len(history) - 1) // 11] for i in range(12)]
    if history:
        lines += ["", "Training (step: train loss / held-out loss on 2 batches): " +
                  ", ".join(f"{s}: {a:.3f}/{b:.3f}" for s, a, b in history)]
    return "\n".join(lines) + "\n"


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


if __name__ == "__main__":
    main()
