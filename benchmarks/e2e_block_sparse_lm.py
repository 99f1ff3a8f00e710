"""End to end: a Transformer LM with 90% block-sparse FFNs, through sparsify and the lowering pass.

Three versions of the same model, timed in one run (bf16, medians after warm-up):
  dense      the model as written (XLA);
  masked     sparsify with Block(0.9, 128×128) masks on every FFN kernel (XLA multiplies zeros);
  lowered    the same, after ``sfn.lower(sstate)``: FFN matmuls run the block-sparse kernel.
Rows: a decode-shaped forward (batch × 1 token, no KV cache: the FFN weights dominate), a
prefill forward, and a training step (forward + backward).

    python benchmarks/e2e_block_sparse_lm.py
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import jax.numpy as jnp

import sparsejax as sj
from sparsejax.models import transformer
from timing import median_seconds, rel_err

CONFIG = transformer.TransformerConfig(vocab_size=256, d_model=2048, n_layers=4, n_heads=16,
                                       d_ff=8192, dtype="bfloat16", param_dtype="bfloat16")
SMALL = CONFIG.replace(d_model=256, n_heads=4, d_ff=1024, dtype="float32", param_dtype="float32")


def main():
    on_gpu = jax.default_backend() == "gpu"
    cfg = CONFIG if on_gpu else SMALL
    model = transformer.TransformerLM(cfg)
    tokens = jax.random.randint(jax.random.key(0), (16, 1024 if on_gpu else 64), 0, 256)
    params = jax.jit(model.init)(jax.random.key(1), tokens)
    sfn = sj.sparsify(model.apply, sj.Block("re:.*mlp/.*/kernel", 0.9, block=(128, 128)))
    sparams, sstate = sfn.init(params, tokens)
    lowered = sfn.lower(sstate)
    kernels = sorted({r.kernel for r in lowered.report().rows})

    fwd = {"dense": jax.jit(lambda p, s, t: model.apply(p, t)),
           "masked": jax.jit(sfn), "lowered": jax.jit(lowered)}

    def loss(f):
        return lambda p, s, t: jnp.mean(f(p, s, t).astype(jnp.float32) ** 2)

    step = {name: jax.jit(jax.grad(loss(f))) for name, f in
            (("dense", lambda p, s, t: model.apply(p, t)), ("masked", sfn), ("lowered", lowered))}

    err = rel_err(fwd["lowered"](sparams, sstate, tokens), fwd["masked"](sparams, sstate, tokens))
    g_err = rel_err(jax.tree.leaves(step["lowered"](sparams, sstate, tokens))[0],
                    jax.tree.leaves(step["masked"](sparams, sstate, tokens))[0])
    rows = []
    shapes = [("decode forward, batch 8 × 1 token", tokens[:8, :1], fwd),
              (f"prefill forward, batch {tokens.shape[0]} × {tokens.shape[1]}", tokens, fwd),
              (f"train step, batch {tokens.shape[0]} × {tokens.shape[1]}", tokens, step)]
    for label, t, fns in shapes:
        times = {name: median_seconds(fn, sparams, sstate, t, calls=3, repeats=10)
                 for name, fn in fns.items()}
        rows.append((label, times))

    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    lines = [f"\n## {time.strftime('%Y-%m-%d')} on {device}, JAX {jax.__version__}\n",
             f"Command: `python {' '.join(sys.argv)}`\n",
             f"LM d_model {cfg.d_model}, {cfg.n_layers} layers, d_ff {cfg.d_ff}, {cfg.dtype}; every FFN "
             f"kernel Block(0.9, 128×128). Lowered sites: {kernels}. Lowered vs masked: relative "
             f"error {err:.2e} (forward), {g_err:.2e} (first gradient leaf).\n",
             "| what | dense | masked (XLA) | lowered | lowered vs dense |", "|---|---|---|---|---|"]
    for label, t in rows:
        lines.append(f"| {label} | {t['dense'] * 1e3:.3f} ms | {t['masked'] * 1e3:.3f} ms | "
                     f"{t['lowered'] * 1e3:.3f} ms | {t['dense'] / t['lowered']:.2f}× |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = pathlib.Path(__file__).parent / "results" / "e2e_block_sparse_lm.md"
    if not out.exists():
        out.write_text("# A block-sparse LM end to end\n\nProduced by benchmarks/e2e_block_sparse_lm.py.\n")
    with open(out, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
