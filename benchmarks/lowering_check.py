"""GPU check of the lowering pass: scanned and unrolled LMs, forward and gradients, packed memory.

A GPT-style LM (bf16 compute, float32 params) with ``Block(0.9, 128×128)`` on every FFN
kernel, written once with ``nn.scan`` over layers and once unrolled. For each:

* correctness, with every eligible site forced onto the block-sparse kernel
  (``path_choice.mode("force:kernel")``): the lowered program's logits and its
  gradients per leaf against the masked dense program computed in float32
  (relative Frobenius error), beside XLA's bf16 masked program against the same
  reference. Pass: every leaf within bf16 precision (< 2e-2) and no further from
  float32 than XLA's bf16 (≤ 1.5× + 1e-3).
* the paths the sites choose when left to measure (``auto``), from ``report()``.
* forward time (median after warm-up): dense XLA, masked (XLA), lowered (auto),
  packed (auto), all in the same run.
* the packed model (``lower(sstate, packed=True)`` + ``pack``): bytes of the FFN
  kernels held, against the dense ones, and its logits against the lowered model's.

    source benchmarks/device_env.sh && python benchmarks/lowering_check.py
    python benchmarks/lowering_check.py --smoke      # CPU, Pallas interpret mode, tiny LM

Writes the table to $OUT/lowering_check.md when $OUT is set and prints it last.
Budget: < 90 s on an H200.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import sparsejax as sj
from sparsejax.kernels import path_choice
from sparsejax.models import transformer
from timing import median_seconds, rel_err

GPU = transformer.TransformerConfig(vocab_size=8192, d_model=1024, n_layers=2, n_heads=8,
                                    d_ff=4096, dtype="bfloat16")
SMOKE = transformer.TransformerConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, d_ff=128,
                                      dtype="bfloat16")


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def grads(f, sparams, sstate, tokens):
    loss = lambda p: transformer.lm_loss(f(p, sstate, tokens), tokens)
    return jax.jit(jax.grad(loss))(sparams)


def check_model(cfg, tokens, block, interpret, lines):
    name = "scanned" if cfg.scan_layers else "unrolled"
    model = transformer.TransformerLM(cfg)
    params = jax.jit(model.init)(jax.random.key(1), tokens)
    rule = sj.Block("re:.*mlp/.*/kernel", 0.9, block=block)
    bf16 = sj.sparsify(model.apply, rule)
    f32 = sj.sparsify(transformer.TransformerLM(cfg.replace(dtype="float32")).apply, rule)
    sparams, sstate = bf16.init(params, tokens)
    f32.init(params, tokens)
    rows = []

    # Correctness on the kernel path, forward and per-leaf gradients.
    with path_choice.mode("force:kernel"):
        lowered = bf16.lower(sstate, interpret=interpret)
        y_low = jax.jit(lowered)(sparams, sstate, tokens)
        g_low = grads(lowered, sparams, sstate, tokens)
        forced = sorted({r.kernel for r in lowered.report().rows})
    y_ref, g_ref = jax.jit(f32)(sparams, sstate, tokens), grads(f32, sparams, sstate, tokens)
    y_xla, g_xla = jax.jit(bf16)(sparams, sstate, tokens), grads(bf16, sparams, sstate, tokens)
    e_fwd = rel_err(y_low, y_ref), rel_err(y_xla, y_ref)
    worst, ok = (0.0, 0.0, ""), True
    for path, a, b, r in zip(sj.paths.leaf_paths(g_ref), jax.tree.leaves(g_low),
                             jax.tree.leaves(g_xla), jax.tree.leaves(g_ref)):
        e_low, e_xla = rel_err(a, r), rel_err(b, r)
        ok &= e_low < 2e-2 and e_low <= 1.5 * e_xla + 1e-3
        if e_low >= worst[0]:
            worst = (e_low, e_xla, path)
    ok &= e_fwd[0] < 2e-2 and e_fwd[0] <= 1.5 * e_fwd[1] + 1e-3
    lines.append(f"{name}: kernel sites {forced}")
    rows.append((name, "forward logits vs f32 masked (lowered / XLA bf16)",
                 f"{e_fwd[0]:.2e} / {e_fwd[1]:.2e}", "PASS" if e_fwd[0] < 2e-2 else "FAIL"))
    rows.append((name, f"worst gradient leaf vs f32 masked ({worst[2]})",
                 f"{worst[0]:.2e} / {worst[1]:.2e}", "PASS" if ok else "FAIL"))

    # Paths chosen by measurement (deterministic on CPU), and forward times.
    auto = bf16.lower(sstate, interpret=interpret)
    grads(auto, sparams, sstate, tokens)                     # chooses for forward + backward
    packed = bf16.lower(sstate, interpret=interpret, packed=True)
    pparams = packed.pack(sparams)
    no_masks = {"masks": jax.tree.map(lambda m: None, sstate["masks"])}
    fwd = {"dense": jax.jit(lambda p, s, t: model.apply(p, t)), "masked": jax.jit(bf16),
           "lowered": jax.jit(auto)}
    times = {k: median_seconds(f, sparams, sstate, tokens, calls=3, repeats=5, warmup=2)
             for k, f in fwd.items()}
    times["packed"] = median_seconds(jax.jit(packed), pparams, no_masks, tokens, calls=3,
                                     repeats=5, warmup=2)
    for r in auto.report().rows:
        lines.append(f"{name} {r.path}: {r.kernel}")
    rows.append((name, "forward ms: dense / masked / lowered / packed",
                 " / ".join(f"{times[k] * 1e3:.2f}" for k in ("dense", "masked", "lowered", "packed")),
                 f"lowered {times['dense'] / times['lowered']:.2f}× dense"))

    # Packed model: memory of the FFN kernels, and the same logits.
    ffn = lambda tree: sum(x.nbytes for p, x in zip(sj.paths.leaf_paths(tree), jax.tree.leaves(tree))
                           if "mlp" in p and p.endswith("kernel"))
    e_packed = rel_err(jax.jit(packed)(pparams, no_masks, tokens), jax.jit(auto)(sparams, sstate, tokens))
    rows.append((name, "packed FFN kernel bytes (packed / dense)",
                 f"{_mib(ffn(pparams))} / {_mib(ffn(sparams))} "
                 f"({ffn(pparams) / ffn(sparams):.3f})",
                 "PASS" if e_packed < 1e-2 and ffn(pparams) < 0.15 * ffn(sparams) else "FAIL"))
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny LM, Pallas interpret mode (CPU)")
    args = parser.parse_args()
    smoke = args.smoke or jax.default_backend() != "gpu"
    cfg, block = (SMOKE, (16, 16)) if smoke else (GPU, (128, 128))
    tokens = jax.random.randint(jax.random.key(0), (2, 32) if smoke else (4, 1024), 0, cfg.vocab_size)
    start = time.perf_counter()
    lines, rows = [], []
    for scan in (True, False):
        try:
            rows += check_model(cfg.replace(scan_layers=scan), tokens, block, smoke, lines)
        except Exception as e:   # one failing model must not hide the other's figures
            traceback.print_exc()
            rows.append(("scanned" if scan else "unrolled", "check raised", type(e).__name__,
                         f"FAIL: {str(e).splitlines()[0][:120]}"))
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    text = "\n".join([
        f"## Lowering check, {time.strftime('%Y-%m-%d')} on {device}, JAX {jax.__version__}", "",
        f"Command: `python benchmarks/{' '.join([pathlib.Path(sys.argv[0]).name, *sys.argv[1:]])}`", "",
        f"LM d_model {cfg.d_model}, {cfg.n_layers} layers, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, "
        f"bf16 compute, tokens {tokens.shape[0]}×{tokens.shape[1]}; Block(0.9, {block[0]}×{block[1]}) "
        f"on every FFN kernel. Wall time {time.perf_counter() - start:.0f} s.", "",
        *[f"- {line}" for line in lines], "",
        "| model | what | value | verdict |", "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]]) + "\n"
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], "lowering_check.md").write_text(text)
    print(text)
    if any(r[3].startswith("FAIL") for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
