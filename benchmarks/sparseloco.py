"""DDP vs DiLoCo vs SparseLoCo (1% and 3%) across CPU processes: held-out loss and bytes sent.

    python benchmarks/sparseloco.py                    # 4 processes × 1 CPU device, ~20 min on 2 cores
    python benchmarks/sparseloco.py --smoke            # 2 processes, a few steps: checks it runs

Every row is train.py on the same small LM (Python's own source, byte level), the same
global batch, steps, inner AdamW and schedule (so equal total tokens), launched as N
processes that talk through JAX's CPU collectives (gloo):
  DDP        --outer=none: the gradient is all-reduced every step (the mesh spans the processes);
  DiLoCo     --outer=diloco: H inner steps per replica, float32 pseudo-gradients, outer
             Nesterov SGD (lr 0.7, momentum 0.9);
  SparseLoCo --outer=sparseloco: top-k per 4096-entry chunk at 1% / 3% with 2-bit values,
             error feedback (β 0.95), outer SGD (lr 1).
Bytes are those each worker's outer loop measured on the message arrays it handed to the
all-gather (train.py's outer_steps.jsonl); DDP's are the float32 gradient per step (what
the all-reduce carries for each worker), the figure the outer loop logs beside its own.
Held-out loss is train.py's final eval on the validation split. Writes the table to
benchmarks/results/sparseloco.md (or --out; also $OUT/sparseloco.md when $OUT is set) and
prints it last.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))   # train.py; the package comes from the install

from sparsejax.distributed import launch  # noqa: E402

MODEL = dict(model="lm", data="stdlib", recipe="dense", d_model=64, n_layers=2, n_heads=4, d_ff=192,
             seq_len=64, batch_size=32, learning_rate=3e-3, warmup_steps=50, lr_schedule="cosine",
             eval_batches=16, log_every=50, checkpoint_every=100000, dtype="float32")
SMOKE = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, seq_len=32, batch_size=8, warmup_steps=2,
             eval_batches=2, log_every=5)
ROWS = [("DDP (AdamW every step)", dict(outer="none")),
        ("DiLoCo", dict(outer="diloco")),
        ("SparseLoCo 1%", dict(outer="sparseloco", outer_density=0.01)),
        ("SparseLoCo 3%", dict(outer="sparseloco", outer_density=0.03))]


def run_row(flags: dict, processes: int, workdir: str, timeout_s: float) -> dict:
    command = [sys.executable, str(ROOT / "train.py")] + [f"--{k}={v}" for k, v in flags.items()] \
        + [f"--workdir={workdir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    status, outputs = launch.launch(command, processes, devices_per_process=1, timeout_s=timeout_s,
                                    env=env, capture=True)
    wall = time.perf_counter() - start
    if status != 0:
        tail = "\n".join(outputs[0].splitlines()[-15:])
        raise RuntimeError(f"train.py failed (status {status}) for {flags}:\n{tail}")
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [r for r in records if r["split"] == "eval"]
    outer_path = os.path.join(workdir, "outer_steps.jsonl")
    outer = [json.loads(line) for line in open(outer_path)] if os.path.exists(outer_path) else []
    return {"eval_loss": evals[-1]["loss"], "eval_curve": [(r["step"], r["loss"]) for r in evals],
            "outer": outer, "wall_s": wall}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="2 processes, a few steps")
    parser.add_argument("--processes", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--inner_steps", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sparseloco.md"))
    args = parser.parse_args()
    processes = args.processes or (2 if args.smoke else 4)
    steps = args.steps or (20 if args.smoke else 1000)
    inner_steps = args.inner_steps or (5 if args.smoke else 50)
    base = {**MODEL, **(SMOKE if args.smoke else {}), "steps": steps, "inner_steps": inner_steps,
            "eval_every": max(steps // 4 // inner_steps, 1) * inner_steps}
    if args.smoke:
        base["outer_chunk"] = 256

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for i, (name, extra) in enumerate(ROWS):
            results[name] = run_row({**base, **extra}, processes, os.path.join(scratch, str(i)),
                                    timeout_s=600 if args.smoke else 1200)
            r = results[name]
            print(f"{name}: held-out loss {r['eval_loss']:.4f}, {r['wall_s']:.0f} s", flush=True)

    diloco = results["DiLoCo"]
    diloco_bytes = sum(o["sent_bytes"] for o in diloco["outer"])
    ddp_bytes = sum(o["ddp_bytes"] for o in diloco["outer"])      # the gradient, every step
    gradient_bytes = ddp_bytes // steps
    lines = [
        f"\n## {time.strftime('%Y-%m-%d')}: {processes} CPU processes × 1 device{' (smoke)' if args.smoke else ''}\n",
        f"Command: `python benchmarks/sparseloco.py {' '.join(sys.argv[1:])}`\n",
        f"Device: CPU ({platform.machine()}, {os.cpu_count()} cores shared with other jobs), "
        f"{processes} processes × 1 device over JAX's CPU collectives (gloo), JAX {jax.__version__}.\n",
        f"LM d_model {base['d_model']}, {base['n_layers']} layers, d_ff {base['d_ff']}, byte-level "
        f"Python source, global batch {base['batch_size']}×{base['seq_len']} tokens, {steps} steps for "
        f"every row (equal total tokens), AdamW lr {base['learning_rate']} cosine, H = {inner_steps} "
        f"inner steps; float32 gradient {gradient_bytes} bytes. Bytes are per worker over the whole "
        f"run: measured message arrays for DiLoCo/SparseLoCo, the float32 gradient per step for DDP.\n",
        "| method | held-out loss | vs DiLoCo | bytes sent per worker | DiLoCo bytes / these | "
        "DDP bytes / these | per outer step (indices + values + levels) | wall s |",
        "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        sent = ddp_bytes if not r["outer"] else sum(o["sent_bytes"] for o in r["outer"])
        parts = (" + ".join(f"{v}" for v in r["outer"][0]["sent_parts"].values()) if r["outer"]
                 else f"{gradient_bytes} every step")
        lines.append(f"| {name} | {r['eval_loss']:.4f} | {r['eval_loss'] / diloco['eval_loss'] - 1:+.2%} | "
                     f"{sent} | {diloco_bytes / sent:.1f}× | {ddp_bytes / sent:.1f}× | {parts} | "
                     f"{r['wall_s']:.0f} |")
    lines.append("")
    for name in ("SparseLoCo 1%", "SparseLoCo 3%"):
        r = results[name]
        sent = sum(o["sent_bytes"] for o in r["outer"])
        within = r["eval_loss"] <= 1.02 * diloco["eval_loss"]
        small = sent * 50 <= diloco_bytes
        lines.append(f"Goal, {name}: within 2% of DiLoCo's held-out loss at <= 1/50 of its bytes: "
                     f"**{within and small}** (loss {r['eval_loss']:.4f} vs {diloco['eval_loss']:.4f}, "
                     f"{r['eval_loss'] / diloco['eval_loss'] - 1:+.2%}; bytes 1/{diloco_bytes / sent:.0f})")
    lines.append("\nHeld-out loss during training (step: loss):\n")
    for name, r in results.items():
        lines.append(f"- {name}: " + ", ".join(f"{s}: {v:.4f}" for s, v in r["eval_curve"]))
    text = "\n".join(lines) + "\n"

    out = pathlib.Path(args.out)
    if not out.exists():
        out.write_text("# SparseLoCo vs DiLoCo vs DDP across CPU processes\n\n"
                       "Produced by benchmarks/sparseloco.py.\n")
    with open(out, "a") as f:
        f.write(text)
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], "sparseloco.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
