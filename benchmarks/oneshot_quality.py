"""One-shot pruning quality: magnitude, Wanda, SparseGPT and DSnoT on a dense LM, one command.

    python benchmarks/oneshot_quality.py                    # the recorded CPU run
    python benchmarks/oneshot_quality.py --smoke            # a one-minute check that it runs
    python benchmarks/oneshot_quality.py --d_model 768 --n_layers 8 --d_ff 3072 --steps 4000 \
        --batch_size 64 --seq_len 256                       # a >= 50M-parameter model on a GPU

Trains a dense LM with train.py (its model, its offline corpus: Python's own
source, byte level), then prunes the block weights (``presets.SPARSE_WEIGHTS``:
q, k, v, o, gate, up, down of every layer; embedding and head stay dense) with
each method at 50 / 60 / 70% unstructured, 2:4 and 4:8, through
``sparsejax.oneshot`` with sequential calibration on training-split batches,
and reports held-out perplexity (the validation split train.py evaluates on).
No fine-tuning. "gap closed" is (ppl_magnitude − ppl_method) / (ppl_magnitude −
ppl_dense). DSnoT starts from Wanda's mask; its row is compared with Wanda's.

Writes benchmarks/results/oneshot_quality.{md,json} (or $OUT/) and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import train  # noqa: E402
import sparsejax as sj  # noqa: E402
from sparsejax import data, presets  # noqa: E402
from sparsejax.compiler import calibration  # noqa: E402
from sparsejax.models import transformer  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt", "dsnot")
CONFIGS = [("50%", ("prune", 0.5)), ("60%", ("prune", 0.6)), ("70%", ("prune", 0.7)),
           ("2:4", ("nm", 2, 4)), ("4:8", ("nm", 4, 8))]
GOAL_GAP = 0.70


def recipe_for(config):
    pattern = presets.SPARSE_WEIGHTS["lm"]
    if config[0] == "prune":
        return [sj.Prune(pattern, config[1])]
    return [sj.NM(pattern, config[1], config[2])]


class DenseLM(NamedTuple):
    run: Any
    model: Any
    params: Any
    n_params: int
    calib: list
    evals: list
    perplexity: Callable
    train_seconds: float


def train_dense_lm(args) -> DenseLM:
    """Trains train.py's LM dense (its corpus, its loop) with ``args``' sizes; returns the run,
    its params, calibration batches (training-split positions the run never saw), the
    held-out batches and ``perplexity(params, apply=None)`` on them."""
    workdir = args.workdir or tempfile.mkdtemp(prefix="dense_lm_")
    cfg = train.Config(recipe="dense", steps=args.steps, batch_size=args.batch_size,
                       seq_len=args.seq_len, d_model=args.d_model, n_layers=args.n_layers,
                       n_heads=args.n_heads, d_ff=args.d_ff, learning_rate=args.learning_rate,
                       eval_every=args.steps, checkpoint_every=args.steps, log_every=max(args.steps // 10, 1),
                       eval_batches=args.eval_batches, workdir=workdir)
    run = train.prepare(cfg)
    t0 = time.time()
    trained = train.train_and_evaluate(run)
    train_seconds = time.time() - t0
    params = jax.device_get(trained["sfn"].dense_params(trained["state"].params, trained["state"].sstate))
    model = run.model
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    # Calibration: training-split batches the dense run never saw (positions after its last step).
    calib = [(jnp.asarray(run.train_batches.batch(args.steps + 1000 + i)["inputs"]),)
             for i in range(args.calib_batches)]
    evals = list(run.eval_batches())
    apply = jax.jit(model.apply)

    def perplexity(p, apply_fn=None):
        total, weight = 0.0, 0.0
        for b in evals:
            w = jnp.asarray(b["weights"])
            logits = (apply_fn or apply)(p, jnp.asarray(b["inputs"]))
            loss = transformer.lm_loss(logits, jnp.asarray(b["targets"]), w)
            total += float(loss) * float(jnp.sum(w))
            weight += float(jnp.sum(w))
        return math.exp(total / weight)

    return DenseLM(run, model, params, n_params, calib, evals, perplexity, train_seconds)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d_model", type=int, default=128)
    ap.add_argument("--n_layers", type=int, default=4)
    ap.add_argument("--n_heads", type=int, default=4)
    ap.add_argument("--d_ff", type=int, default=384)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--learning_rate", type=float, default=3e-3)
    ap.add_argument("--calib_batches", type=int, default=4, help="calibration batches of batch_size sequences")
    ap.add_argument("--eval_batches", type=int, default=16)
    ap.add_argument("--workdir", default="", help="where the dense run goes (default: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny and quick: checks the script end to end")
    args = ap.parse_args()
    if args.smoke:
        args.d_model, args.n_layers, args.d_ff, args.steps = 32, 1, 64, 30
        args.calib_batches, args.eval_batches, args.seq_len, args.batch_size = 2, 2, 32, 8
    logging.set_verbosity(logging.WARNING)
    t_start = time.time()
    dense = train_dense_lm(args)
    run, model, params, n_params = dense.run, dense.model, dense.params, dense.n_params
    calib, evals, perplexity = dense.calib, dense.evals, dense.perplexity
    dense_ppl = perplexity(params)
    print(f"dense: {n_params / 1e6:.2f}M parameters, held-out perplexity {dense_ppl:.3f} "
          f"({dense.train_seconds:.0f} s of training)", flush=True)

    program = calibration.trace(model.apply, params, *calib[0])
    results = {}
    for label, config in CONFIGS:
        for method in METHODS:
            t0 = time.time()
            out = sj.oneshot(model.apply, params, calib, recipe_for(config), method=method,
                             observe="all", calibration_program=program)
            seconds = time.time() - t0
            ppl = perplexity(out.params)
            errs = [r.error_after for r in out.report.sites]
            results[(label, method)] = {"ppl": ppl, "seconds": seconds,
                                        "mean_rel_error": float(np.mean(errs)),
                                        "sparsity": float(np.mean([r.sparsity for r in out.report.sites]))}
            print(f"{label:>4} {method:<10} ppl {ppl:8.3f}  mean rel. error {np.mean(errs):.4f}  "
                  f"{seconds:.1f} s", flush=True)

    lines = []
    command = "python benchmarks/oneshot_quality.py" + (" --smoke" if args.smoke else "")
    lines += ["# One-shot pruning quality (no fine-tuning)", "",
              f"Command: `{command}` · device: {jax.devices()[0].device_kind} "
              f"({platform.processor() or platform.machine()}) · JAX {jax.__version__} · "
              f"commit {_commit()} · wall time {(time.time() - t_start) / 60:.1f} min.", "",
              f"Model: train.py's LM, d_model {args.d_model}, {args.n_layers} layers, d_ff {args.d_ff}, "
              f"{n_params / 1e6:.2f}M parameters, trained dense for {args.steps} steps of "
              f"{args.batch_size}×{args.seq_len} tokens on the stdlib corpus (byte level). Pruned: "
              "every q/k/v/o/gate/up/down kernel (embedding and head stay dense). Calibration: "
              f"{args.calib_batches}×{args.batch_size} training-split sequences "
              f"({args.calib_batches * args.batch_size * args.seq_len} tokens), sequential. "
              f"Perplexity on {len(evals)} held-out batches.", "",
              f"Dense perplexity: {dense_ppl:.3f}", "",
              "| sparsity | magnitude | Wanda | SparseGPT | DSnoT (from Wanda) | gap closed: Wanda | gap closed: SparseGPT |",
              "|---|---|---|---|---|---|---|"]
    gaps = {}
    for label, _ in CONFIGS:
        r = {m: results[(label, m)]["ppl"] for m in METHODS}
        span = r["magnitude"] - dense_ppl
        gap = {m: (r["magnitude"] - r[m]) / span if span > 0 else float("nan") for m in ("wanda", "sparsegpt")}
        gaps[label] = gap
        lines.append(f"| {label} | {r['magnitude']:.3f} | {r['wanda']:.3f} | {r['sparsegpt']:.3f} | "
                     f"{r['dsnot']:.3f} | {gap['wanda']:.0%} | {gap['sparsegpt']:.0%} |")
    lines += ["", "Mean relative layer reconstruction error ‖X(W − Ŵ)‖² / ‖XW‖² over the pruned matrices:", "",
              "| sparsity | magnitude | Wanda | SparseGPT | DSnoT |", "|---|---|---|---|---|"]
    for label, _ in CONFIGS:
        lines.append(f"| {label} | " + " | ".join(f"{results[(label, m)]['mean_rel_error']:.4f}"
                                                  for m in METHODS) + " |")
    lines += ["", "Goals (issue 17): at 50% and at 4:8, Wanda and SparseGPT each close >= 70% of the "
              "gap between magnitude and dense; DSnoT better than its starting mask (Wanda) at 70%.", ""]
    for label in ("50%", "4:8"):
        for m, name in (("wanda", "Wanda"), ("sparsegpt", "SparseGPT")):
            ok = gaps[label][m] >= GOAL_GAP
            lines.append(f"- {label}, {name}: gap closed {gaps[label][m]:.0%} (goal >= 70%): "
                         f"{'met' if ok else 'not met'}")
    d70, w70 = results[("70%", "dsnot")]["ppl"], results[("70%", "wanda")]["ppl"]
    lines.append(f"- 70%, DSnoT {d70:.3f} vs Wanda {w70:.3f}: {'met' if d70 < w70 else 'not met'}")
    table = "\n".join(lines) + "\n"

    out_dir = os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results")
    name = "oneshot_quality_smoke" if args.smoke else "oneshot_quality"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name + ".md"), "w") as f:
        f.write(table)
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump({"dense_ppl": dense_ppl, "n_params": n_params, "args": vars(args),
                   "results": {f"{k[0]} {k[1]}": v for k, v in results.items()}}, f, indent=1)
    print(table)


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       text=True).strip()
    except Exception:
        return "unknown"


if __name__ == "__main__":
    main()
