"""What sparsify itself costs: step time against hand-masking, and trace + rewrite time.

1. Step time (forward + backward, jitted) of a Transformer LM with every kernel
   masked at 90% through ``sparsify``, against the same model masked by hand
   (``apply(params * mask)``). Both programs are the same math; the ratio shows
   what the rewrite adds (goal: <= 1.03).
2. Trace + rewrite time of a 24-layer Transformer (layers unrolled: the worst
   case for a Python walk), against ``jax.make_jaxpr`` alone.

    python benchmarks/sparsify_overhead.py            # GPU sizes on a GPU, small on CPU
    python benchmarks/sparsify_overhead.py --small    # CPU-sized

Prints a table and appends it, with the command, device and JAX version, to
benchmarks/results/sparsify_overhead.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import sparsejax as sj
from sparsejax.compiler.sites import find_weight_sites
from timing import median_seconds


class Layer(nn.Module):
    heads: int
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        h = nn.RMSNorm(dtype=self.dtype)(x)
        x = x + nn.MultiHeadDotProductAttention(self.heads, dtype=self.dtype, name="attn")(
            h, h, mask=nn.make_causal_mask(h[..., 0]))
        h = nn.RMSNorm(dtype=self.dtype)(x)
        gate = nn.Dense(4 * x.shape[-1], dtype=self.dtype, name="gate")(h)
        up = nn.Dense(4 * x.shape[-1], dtype=self.dtype, name="up")(h)
        return x + nn.Dense(x.shape[-1], dtype=self.dtype, name="down")(nn.silu(gate) * up)


class LM(nn.Module):
    vocab: int
    d_model: int
    layers: int
    heads: int
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d_model, dtype=self.dtype)(tokens)
        for i in range(self.layers):
            x = Layer(self.heads, self.dtype, name=f"layer_{i}")(x)
        return nn.Dense(self.vocab, dtype=self.dtype, name="head")(nn.RMSNorm(dtype=self.dtype)(x))


def step_time(cfg):
    model = LM(cfg.vocab, cfg.d_model, cfg.layers, cfg.heads)
    tokens = jax.random.randint(jax.random.key(0), (cfg.batch, cfg.seq), 0, cfg.vocab)
    params = model.init(jax.random.key(1), tokens)
    sfn = sj.sparsify(model.apply, sj.Prune("*kernel", sparsity=0.9))
    sparams, sstate = sfn.init(params, tokens)

    def loss_sparsified(p, s, t):
        logits = sfn(p, s, t).astype(jnp.float32)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    def loss_by_hand(p, s, t):
        masked = jax.tree.map(lambda w, m: w if m is None else w * m.astype(w.dtype), p, s["masks"])
        logits = model.apply(masked, t).astype(jnp.float32)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grad_s = jax.jit(jax.value_and_grad(loss_sparsified))
    grad_h = jax.jit(jax.value_and_grad(loss_by_hand))
    (ls, _), (lh, _) = grad_s(sparams, sstate, tokens), grad_h(sparams, sstate, tokens)
    np.testing.assert_allclose(float(ls), float(lh), rtol=2e-2)
    rows = []
    for rep in range(2):  # interleaved twice: the spread between repeats is the noise
        t_h = median_seconds(grad_h, sparams, sstate, tokens, calls=1, repeats=20)
        t_s = median_seconds(grad_s, sparams, sstate, tokens, calls=1, repeats=20)
        rows.append((rep, t_h, t_s))
    return rows


def trace_time(cfg):
    model = LM(cfg.vocab, cfg.d_model, cfg.trace_layers, cfg.heads, dtype=jnp.float32)
    tokens = jnp.zeros((1, 16), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(1), tokens)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype) + 0.01, params)
    out = {}
    t0 = time.perf_counter()
    closed = jax.make_jaxpr(model.apply)(params, tokens)
    out["jax.make_jaxpr"] = time.perf_counter() - t0
    paths = sj.paths.leaf_paths(params)
    t0 = time.perf_counter()
    find_weight_sites(closed, paths, len(paths))
    out["site analysis walk alone"] = time.perf_counter() - t0
    sfn = sj.sparsify(model.apply, sj.Prune("*kernel", sparsity=0.9))
    t0 = time.perf_counter()
    sparams, sstate = sfn.init(params, tokens)
    jax.block_until_ready(sstate)
    out["sparsify init (trace, sites, masks)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sfn.rewritten_jaxpr(sparams, sstate, tokens)
    out["first call: rewrite"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    sfn.rewritten_jaxpr(sparams, sstate, tokens)
    out["second call: cached rewrite, replayed"] = time.perf_counter() - t0
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="CPU-sized step benchmark")
    parser.add_argument("--skip-step", action="store_true")
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu" and not args.small
    cfg = argparse.Namespace(
        vocab=32768 if on_gpu else 512, d_model=1024 if on_gpu else 128,
        layers=8 if on_gpu else 2, heads=16 if on_gpu else 4, batch=16 if on_gpu else 4,
        seq=512 if on_gpu else 64, trace_layers=24)
    device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    lines = [f"\n## {time.strftime('%Y-%m-%d')} on {device}, JAX {jax.__version__}\n",
             f"Command: `python {' '.join(sys.argv)}`\n"]
    if not args.skip_step:
        rows = step_time(cfg)
        lines += [f"Step time, forward+backward, LM d_model={cfg.d_model}, {cfg.layers} layers, "
                  f"batch {cfg.batch}×{cfg.seq}, bf16, every kernel 90% masked (medians of 20):\n",
                  "| repeat | masked by hand | sparsify | ratio |", "|---|---|---|---|"]
        lines += [f"| {r} | {h * 1e3:.3f} ms | {s * 1e3:.3f} ms | {s / h:.3f} |" for r, h, s in rows]
    trace = trace_time(cfg)
    lines += [f"\nTrace and rewrite, {cfg.trace_layers}-layer LM (layers unrolled), d_model={cfg.d_model}:\n",
              "| stage | seconds | vs make_jaxpr |", "|---|---|---|"]
    base = trace["jax.make_jaxpr"]
    lines += [f"| {k} | {v:.3f} | {v / base:.2f}× |" for k, v in trace.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    out = os.path.join(os.path.dirname(__file__), "results", "sparsify_overhead.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if not os.path.exists(out):
        with open(out, "w") as f:
            f.write("# sparsify overhead\n\nProduced by benchmarks/sparsify_overhead.py.\n")
    with open(out, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
