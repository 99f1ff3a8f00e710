"""train.py on one GPU and on all GPUs of the machine: same loss curve, and the speed-up.

    python benchmarks/multi_gpu_train.py            # on a machine with >= 2 GPUs

Runs the same configuration (same global batch, same data order) with
``--mesh=data:1`` and with every device in the data axis (and once with
parameters FSDP-sharded), compares the logged losses step by step, and
reports throughput after the first logged interval (which holds the compile).
Appends the table to benchmarks/results/multi_gpu_train.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))  # train.py; the package comes from the install
import train  # noqa: E402

# Recipes whose masks stay fixed while training (N:M with SR-STE), beside dense: schedules that
# re-sort every weight on most steps of a short run (GMP at frequency 1) measure the mask
# update, which every data-parallel replica repeats, not the training step.
RECIPES = ("dense", "nm24")
CONFIG = dict(model="lm", d_model=1024, n_layers=8, n_heads=16, d_ff=4096,
              seq_len=512, batch_size=64, steps=80, log_every=10, eval_every=1000,
              eval_batches=2, checkpoint_every=1000, dtype="bfloat16", learning_rate=1e-3)


def run(recipe: str, mesh: str) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        result = train.train_and_evaluate(train.Config(**CONFIG, recipe=recipe, mesh=mesh,
                                                       workdir=workdir))
    hist = result["history"]
    tokens = CONFIG["batch_size"] * CONFIG["seq_len"]
    steps = hist[-1]["step"] - hist[0]["step"]
    rate = tokens * steps / (hist[-1]["time"] - hist[0]["time"])
    return {"losses": [h["loss"] for h in hist], "tokens_per_s": rate}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated train.py recipes")
    args = parser.parse_args()
    recipes = [r for r in args.recipes.split(",") if r]
    n = jax.device_count()
    meshes = ["data:1", f"data:{n}"] + ([f"data:{n // 2},fsdp:2"] if n >= 2 else [])
    runs = {}
    for recipe in recipes:
        for mesh in meshes:
            runs[(recipe, mesh)] = run(recipe, mesh)
            print(f"{recipe} {mesh}: {runs[(recipe, mesh)]['tokens_per_s']:.0f} tokens/s", flush=True)
    lines = [f"\n## {time.strftime('%Y-%m-%d')}: {n}× {jax.devices()[0].device_kind}, JAX {jax.__version__}\n",
             f"Command: `python {' '.join(sys.argv)}`\n",
             f"LM d_model {CONFIG['d_model']}, {CONFIG['n_layers']} layers, d_ff {CONFIG['d_ff']}, "
             f"global batch {CONFIG['batch_size']}×{CONFIG['seq_len']} tokens, bf16, "
             f"{CONFIG['steps']} steps; throughput over steps {CONFIG['log_every']}–{CONFIG['steps']}.\n",
             "| recipe | mesh | tokens/s | vs 1 GPU | max relative loss difference vs 1 GPU |",
             "|---|---|---|---|---|"]
    for (recipe, mesh), r in runs.items():
        base = runs[(recipe, "data:1")]
        diff = np.max(np.abs(np.array(r["losses"]) - base["losses"]) / np.abs(base["losses"]))
        lines.append(f"| {recipe} | {mesh} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}× | {diff:.2e} |")
    for recipe in recipes:
        lines.append(f"\nLosses, {recipe}, 1 GPU: " + ", ".join(f"{v:.4f}" for v in runs[(recipe, "data:1")]["losses"]))
    text = "\n".join(lines) + "\n"
    print(text)
    out = pathlib.Path(__file__).parent / "results" / "multi_gpu_train.md"
    if not out.exists():
        out.write_text("# train.py on several GPUs\n\nProduced by benchmarks/multi_gpu_train.py.\n")
    with open(out, "a") as f:
        f.write(text)
    if os.environ.get("OUT"):         # the device machine's folder of files that come back
        (pathlib.Path(os.environ["OUT"]) / out.name).write_text(out.read_text())


if __name__ == "__main__":
    main()
