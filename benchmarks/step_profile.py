"""Where the time of a step goes: device kernel time per kind of work, dense vs sparsified LM.

    python benchmarks/step_profile.py                          # GPU: e2e LM, prefill and train step
    python benchmarks/step_profile.py --recipes=block90,monarch4 --measure=train
    python benchmarks/step_profile.py --smoke                  # tiny LM on CPU: checks the script

The e2e benchmark's LM and recipes (``e2e_speed.py``: 24 scanned layers, d_model 1024, flash
attention; ``sparsify`` + ``lower`` as it does). Each (recipe, measure) is warmed up, then
``--steps`` calls are traced with ``jax.profiler``; the device's kernel events are summed per
category and divided by the step count:

* ``Pallas / Mosaic kernels``: custom calls that are neither attention nor a library GEMM
  (the block-sparse, Monarch and GEMV kernels);
* ``GEMM (cuBLAS / CUTLASS)``, ``attention (cuDNN)``: by kernel name;
* ``XLA fusions``: elementwise, reductions, softmax, the loss, AdamW;
* ``copies and other``: everything else (copies, dynamic-update-slice, scatter, gather...).

Besides the sums, the slowest kernels by total time. On CPU the host's XLA ops stand in for
kernels (a check that the script runs, not a measurement). Prints the table last; writes
``$OUT/step_profile.md`` when ``$OUT`` is set.

``trace``, ``summarise`` and ``top_line`` are what ``e2e_speed.py --profile`` and
``multi_gpu_probe.py`` (``PROBE_PROFILE=1``) profile with.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp

sys.path.append(str(pathlib.Path(__file__).resolve().parent))
from timing import median_seconds  # noqa: E402

from sparsejax.kernels import device_timing  # noqa: E402
from sparsejax.models import transformer  # noqa: E402

CATEGORIES = ("Pallas / Mosaic kernels", "GEMM (cuBLAS / CUTLASS)", "attention (cuDNN)",
              "XLA fusions", "copies and other")
_ATTENTION = ("fmha", "flash", "cudnn", "attention", "sdpa")
_GEMM = ("gemm", "xmma", "cutlass", "nvjet", "cublas", "matmul")


def category(kernel: str, hlo_op: str) -> str:
    name = kernel.lower()
    if any(t in name for t in _ATTENTION):
        return "attention (cuDNN)"
    if any(t in name for t in _GEMM) or hlo_op.startswith("dot"):
        return "GEMM (cuBLAS / CUTLASS)"
    if hlo_op.startswith("custom-call") or "pallas" in name or "mosaic" in name:
        return "Pallas / Mosaic kernels"
    if "fusion" in hlo_op or name.startswith(("loop_", "input_", "fusion")):
        return "XLA fusions"
    return "copies and other"


def trace(step, steps: int, warmup: int = 1) -> dict[tuple[str, str], tuple[float, float]]:
    """``(µs, launches)`` per step for each (kernel, hlo op): ``step()`` (no arguments; returns
    what to wait on) is called ``warmup`` times untraced, then ``steps`` times under
    ``jax.profiler`` (:func:`sparsejax.kernels.device_timing.profile_calls`), and the trace's
    totals are divided by ``steps``."""
    events = device_timing.kernel_events(device_timing.profile_calls(step, steps, warmup))
    return {k: (us / steps, n / steps) for k, (us, n) in events.items()}


def kernel_kind(kernel: str) -> str:
    """A kernel's name without its instance number (``loop_transpose_fusion_12`` ->
    ``loop_transpose_fusion``): what a step's kernels are grouped by across programs."""
    return re.sub(r"([._]\d+)+$", "", kernel) or kernel


def summarise(stats: dict[tuple[str, str], tuple[float, float]], top: int = 12) -> dict:
    """A ``trace`` result summed: total kernel µs and launches per step, µs and launches per
    category (every one of ``CATEGORIES``, zero where none ran), ``[µs, launches]`` per
    ``kernel_kind`` (for differences between two programs), and the ``top`` kernels by time
    (kernel, hlo op, category, µs, launches)."""
    cats = {c: 0.0 for c in CATEGORIES}
    cat_launches = {c: 0.0 for c in CATEGORIES}
    kinds: dict[str, list[float]] = {}
    for (kernel, op), (us, n) in stats.items():
        c = category(kernel, op)
        cats[c] += us
        cat_launches[c] += n
        k = kinds.setdefault(kernel_kind(kernel), [0.0, 0.0])
        k[0] += us
        k[1] += n
    slowest = sorted(stats.items(), key=lambda kv: -kv[1][0])[:top]
    return {"total_us": sum(cats.values()), "launches": sum(cat_launches.values()),
            "categories": cats, "category_launches": cat_launches,
            "kinds": dict(sorted(kinds.items(), key=lambda kv: -kv[1][0])),
            "top": [{"kernel": k, "hlo_op": op, "category": category(k, op), "us": us, "launches": n}
                    for (k, op), (us, n) in slowest]}


def top_line(entry: dict, width: int = 60) -> str:
    """One of ``summarise``'s top kernels as text: ``name [hlo op] µs``, and launches when not one."""
    n, op = entry["launches"], entry["hlo_op"]
    return (f"{entry['kernel'][:width]}" + (f" [{op[:30]}]" if op and op != entry["kernel"] else "")
            + f" {entry['us']:.0f}" + (f" (×{n:g})" if n != 1 else ""))


def main():
    import e2e_speed as e2e   # here, not above: e2e_speed imports this module's helpers

    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", default="block90")
    parser.add_argument("--measure", default="prefill,train")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    smoke = args.smoke
    batch, seq = (2, 32) if smoke else (8, 1024)
    cfg = e2e.model_config(smoke, args.layers, True, "fused")
    model = transformer.TransformerLM(cfg)
    tokens = jax.random.randint(jax.random.key(0), (batch, seq), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(1), tokens)
    t0 = time.time()
    lines = [f"## {time.strftime('%Y-%m-%d')}: {jax.devices()[0].device_kind}, JAX {jax.__version__}", "",
             f"Command: `python benchmarks/step_profile.py {' '.join(sys.argv[1:])}`", "",
             f"e2e LM ({cfg.n_layers} scanned layers, d_model {cfg.d_model}, {cfg.attention} "
             f"attention), batch {batch}×{seq}; device kernel time per step (µs), "
             f"{args.steps} traced steps after warm-up; wall = median step time.", ""]
    tops = []
    rows = []
    for name in ["dense", *[r for r in args.recipes.split(",") if r and r != "dense"]]:
        v = e2e.Variant(name, model, cfg, params, tokens, smoke)
        infer_params = v.infer_params if smoke else e2e._cast(v.infer_params, jnp.bfloat16)
        for measure in [m for m in args.measure.split(",") if m]:
            if measure == "prefill":
                fn, fargs = jax.jit(v.infer_fwd), (infer_params, v.sstate, tokens)
            elif measure == "train":
                fn, fargs = e2e.train_runner(v), (v.sstate, tokens)
            else:
                raise SystemExit(f"--measure: {measure!r} is not prefill or train")
            summary = summarise(trace(lambda: fn(*fargs), args.steps), top=args.top)
            wall = median_seconds(fn, *fargs, calls=2, repeats=5)
            per_cat = summary["categories"]
            rows.append((name, measure, 1e6 * wall, per_cat))
            tops += [f"- {name} {measure}: " + "; ".join(top_line(t) for t in summary["top"])]
            print(f"{name} {measure}: wall {1e3 * wall:.2f} ms, kernels "
                  f"{sum(per_cat.values()) / 1e3:.2f} ms ({time.time() - t0:.0f} s)", flush=True)
    lines += ["| recipe | measure | wall µs | kernels µs | " + " | ".join(CATEGORIES) + " |",
              "|---|---|---|---|" + "---|" * len(CATEGORIES)]
    for name, measure, wall_us, per_cat in rows:
        lines.append(f"| {name} | {measure} | {wall_us:.0f} | {sum(per_cat.values()):.0f} | "
                     + " | ".join(f"{per_cat.get(c, 0.0):.0f}" for c in CATEGORIES) + " |")
    lines += ["", "Slowest kernels per step (µs):", ""] + tops
    text = "\n".join(lines) + "\n"
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], "step_profile.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
