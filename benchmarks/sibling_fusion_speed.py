"""Sibling fusion: q/k/v and gate/up as one block-sparse kernel vs one kernel per site vs dense.

    python benchmarks/sibling_fusion_speed.py                  # GPU (H200: about 2-3 min)
    python benchmarks/sibling_fusion_speed.py --smoke          # tiny shapes, Pallas interpret mode, CPU

A stack of scanned layers with the LM's linear layers at GPT-2-medium width (d_model 1024,
d_ff 4096; attention itself left out: fusion does not touch it): per layer q, k, v from one
input, ``x + (tanh(q) * sigmoid(k) + v) @ o``, then a gated FFN whose gate and up read one
input. Every weight gets ``Block(sparsity, (128, 128))``; the program is lowered three ways
and each timed forward and forward + backward (dX and every dW) against dense XLA in the same
run, bf16, 8192 tokens:

* ``unfused``: ``lower(sstate)``, every site the kernel (``path_choice.mode("force:kernel")``);
* ``fused``: ``lower(sstate, fuse_siblings=True)``, q/k/v and gate/up each one kernel over the
  concatenated weights (the group's first path), o and down the kernel;
* ``auto``: ``lower(sstate, fuse_siblings=True)`` with measured path choices (what a user gets).

Each is first checked against the masked XLA program. Prints the table last; writes
$OUT/sibling_fusion_speed.md when $OUT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

sys.path.append(str(pathlib.Path(__file__).resolve().parent))
from timing import median_seconds, rel_err  # noqa: E402

import sparsejax as sj  # noqa: E402
from sparsejax.kernels import path_choice  # noqa: E402


def layer(x, p):
    q, k, v = x @ p["q"], x @ p["k"], x @ p["v"]
    h = x + ((jnp.tanh(q) * jax.nn.sigmoid(k) + v) @ p["o"]).astype(x.dtype)
    return h + ((jax.nn.silu(h @ p["gate"]) * (h @ p["up"])) @ p["down"]).astype(x.dtype)


def stack(params, x):
    return jax.lax.scan(lambda h, p: (layer(h, p), None), x, params)[0]


def make_params(layers, d, f, dtype):
    shapes = {"q": (d, d), "k": (d, d), "v": (d, d), "o": (d, d), "gate": (d, f), "up": (d, f),
              "down": (f, d)}
    keys = jax.random.split(jax.random.key(0), len(shapes))
    return {n: (jax.random.normal(k, (layers, *s)) / s[0] ** 0.5).astype(dtype)
            for (n, s), k in zip(shapes.items(), keys)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--sparsities", default="0.9,0.75")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--budget_s", type=float, default=1e9,
                        help="sparsities that would start after this many seconds are skipped")
    args = parser.parse_args()
    smoke = args.smoke
    d, f, block = (64, 128, (16, 16)) if smoke else (1024, 4096, (128, 128))
    layers, tokens = (2, 64) if smoke else (args.layers, args.tokens)
    dtype = jnp.float32 if smoke else jnp.bfloat16
    calls, repeats = (1, 2) if smoke else (5, 7)
    params = make_params(layers, d, f, dtype)
    x = jax.random.normal(jax.random.key(1), (tokens, d), dtype)
    loss = lambda fn: (lambda p, s, x: jnp.sum(fn(p, s, x).astype(jnp.float32) ** 2))
    rows, t_start = [], time.time()

    dense_f = jax.jit(lambda p, s, x: stack(p, x))
    dense_b = jax.jit(jax.grad(loss(lambda p, s, x: stack(p, x)), argnums=(0, 2)))
    dense = {"fwd": median_seconds(dense_f, params, None, x, calls=calls, repeats=repeats),
             "fwd+bwd": median_seconds(dense_b, params, None, x, calls=calls, repeats=repeats)}
    print(f"dense: fwd {1e3 * dense['fwd']:.3f} ms, fwd+bwd {1e3 * dense['fwd+bwd']:.3f} ms", flush=True)

    for sparsity in map(float, args.sparsities.split(",")):
        if time.time() - t_start > args.budget_s:
            rows.append(f"| {sparsity} | skipped (past --budget_s) | | | | | | | |")
            continue
        sfn = sj.sparsify(stack, [sj.Block("*", sparsity, block=block)])
        sparams, sstate = sfn.init(params, x, rng=jax.random.key(2))
        masked = jax.jit(sfn)(sparams, sstate, x)
        times, errs = {}, {}
        for name, fuse, mode in [("unfused", False, "force:kernel"), ("fused", True, "force:kernel"),
                                 ("auto", True, None)]:
            t0 = time.time()
            fast = sfn.lower(sstate, interpret=smoke, fuse_siblings=fuse)
            with path_choice.mode(mode) if mode else contextlib.nullcontext():
                fwd = jax.jit(fast)
                bwd = jax.jit(jax.grad(loss(fast), argnums=(0, 2)))
                errs[name] = rel_err(fwd(sparams, sstate, x), masked)
                times[name] = {
                    "fwd": median_seconds(fwd, sparams, sstate, x, calls=calls, repeats=repeats),
                    "fwd+bwd": median_seconds(bwd, sparams, sstate, x, calls=calls, repeats=repeats)}
            paths = sorted({r.kernel for r in fast.report().rows})
            print(f"sparsity {sparsity} {name}: fwd {1e3 * times[name]['fwd']:.3f} ms, fwd+bwd "
                  f"{1e3 * times[name]['fwd+bwd']:.3f} ms (err vs masked {errs[name]:.1e}; "
                  f"{time.time() - t0:.0f}s)\n  paths: {'; '.join(paths)}", flush=True)
        for m in ("fwd", "fwd+bwd"):
            td, tu, tf, ta = dense[m], times["unfused"][m], times["fused"][m], times["auto"][m]
            rows.append(f"| {sparsity} | {m} | {1e3 * td:.2f} | {1e3 * tu:.2f} | {1e3 * tf:.2f} | "
                        f"{1e3 * ta:.2f} | {td / tu:.2f}× | {td / tf:.2f}× | {td / ta:.2f}× | "
                        f"{tu / tf:.2f}× | {max(errs.values()):.1e} |")
    lines = [f"## {time.strftime('%Y-%m-%d')}: {jax.devices()[0].device_kind}, JAX {jax.__version__}",
             "", f"Command: `python benchmarks/{pathlib.Path(__file__).name} {' '.join(sys.argv[1:])}`",
             "", f"{layers} scanned layers, d_model {d}, d_ff {f}, {tokens} tokens, "
             f"{jnp.dtype(dtype).name}, block {block}; per layer q/k/v/o and gate/up/down. "
             "Times for the whole stack; ratios are dense time / lowered time (same run).", "",
             "| sparsity | measure | dense ms | unfused ms | fused ms | auto ms | unfused vs dense "
             "| fused vs dense | auto vs dense | fused vs unfused | worst err vs masked |",
             "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "",
             f"Total wall time {time.time() - t_start:.0f} s."]
    text = "\n".join(lines) + "\n"
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], "sibling_fusion_speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
