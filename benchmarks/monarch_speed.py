"""Monarch multiply speed vs dense ``x @ W`` (bf16): fused Pallas kernel and two XLA einsums.

Run on a GPU:

    PYTHONUNBUFFERED=1 python benchmarks/monarch_speed.py

For every shape it first checks correctness (fresh random inputs; the kernel's
output poisoned with NaN before it runs; forward and gradients against the
float32 reference by relative Frobenius error), then times forward and
forward+backward (a VJP with a random cotangent, gradients for x and the weights)
as medians over repeated batches after warm-up, with dense measured in the same
run. Prints a table last and writes benchmarks/results/monarch_speed.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

from sparsejax import monarch
from sparsejax.kernels import monarch_matmul as mk
from timing import median_seconds, rel_err

SHAPES = [  # (tokens, K, N, nblocks)
    (8192, 4096, 16384, 4),
    (8192, 16384, 4096, 4),
    (8192, 4096, 16384, 16),
    (8192, 16384, 4096, 16),
    (16384, 768, 3072, 4),
]
GOALS = {4: (2.9, 2.7), 16: (10.0, 8.0), "small": (1.5, None)}


def timed(fn, *args):
    return median_seconds(fn, *args, calls=5, repeats=20, warmup=2)


def fwd_bwd(matmul):
    def run(x, params, ct):
        y, vjp = jax.vjp(matmul, x, params)
        return y, vjp(ct)
    return jax.jit(run)


def bench_shape(tokens, k, n, nb, kernel_cfg, check_only=False):
    keys = jax.random.split(jax.random.PRNGKey(tokens + k + n + nb), 4)
    dtype = jnp.bfloat16
    x = jax.random.normal(keys[0], (tokens, k), dtype)
    w = (jax.random.normal(keys[1], (k, n), jnp.float32) / k ** 0.5).astype(dtype)
    f = monarch.init_factors(keys[2], k, n, nb, dtype)
    ct = jax.random.normal(keys[3], (tokens, n), dtype)
    row = {"shape": f"{tokens}x{k}->{n}", "nb": nb}

    dense = lambda x, w: x @ w
    einsum = lambda x, f: monarch.matmul_reference(x, f, n)
    kernel = lambda x, f: mk.monarch_matmul(x, f, n, **kernel_cfg)
    applies, why = mk.kernel_applies(x.shape, f, block_tokens=kernel_cfg["block_tokens"],
                                     block_out=kernel_cfg["block_out"])
    row["kernel_note"] = why

    # Correctness first: f32 reference on upcast inputs.
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), f)
    xs = x[:1024]
    ref = monarch.matmul_reference(xs.astype(jnp.float32), f32, n,
                                   precision=jax.lax.Precision.HIGHEST)
    row["err_einsum"] = rel_err(jax.jit(einsum)(xs, f), ref)
    if applies:
        try:
            y = jax.jit(lambda x, f: mk.monarch_matmul(x, f, n, poison=True, **kernel_cfg))(xs, f)
            row["err_kernel"] = rel_err(y, ref) if bool(jnp.all(jnp.isfinite(y))) else float("nan")
            _, (gx, gf) = fwd_bwd(kernel)(xs, f, ct[:1024])
            _, (rx, rf) = fwd_bwd(einsum)(xs, f, ct[:1024])
            row["err_grad"] = max(rel_err(gx, rx), rel_err(gf["w1"], rf["w1"]),
                                  rel_err(gf["w2"], rf["w2"]))
        except Exception as e:  # report, keep measuring the rest
            applies = False
            row["kernel_note"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            print(row["kernel_note"], file=sys.stderr)
    if check_only:
        return row

    row["dense_fwd"] = timed(jax.jit(dense), x, w)
    row["einsum_fwd"] = timed(jax.jit(einsum), x, f)
    row["dense_fb"] = timed(fwd_bwd(dense), x, w, ct)
    row["einsum_fb"] = timed(fwd_bwd(einsum), x, f, ct)
    if applies:
        try:
            row["kernel_fwd"] = timed(jax.jit(kernel), x, f)
            row["kernel_fb"] = timed(fwd_bwd(kernel), x, f, ct)
        except Exception as e:
            row["kernel_note"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    return row


def fmt(row):
    def ms(key):
        return f"{row[key] * 1e3:.3f}" if key in row else "—"

    def ratio(a, b):
        return f"{row[a] / row[b]:.2f}×" if a in row and b in row else "—"

    return (f"| {row['shape']} | {row['nb']} | {ms('dense_fwd')} | {ms('einsum_fwd')} "
            f"{ratio('dense_fwd', 'einsum_fwd')} | {ms('kernel_fwd')} {ratio('dense_fwd', 'kernel_fwd')} "
            f"| {ms('dense_fb')} | {ms('einsum_fb')} {ratio('dense_fb', 'einsum_fb')} "
            f"| {ms('kernel_fb')} {ratio('dense_fb', 'kernel_fb')} "
            f"| {row.get('err_einsum', float('nan')):.1e} / {row.get('err_kernel', float('nan')):.1e} "
            f"/ {row.get('err_grad', float('nan')):.1e} | {row['kernel_note']} |")


HEADER = ("| tokens×K→N | nblocks | dense fwd ms | einsums fwd ms (×) | kernel fwd ms (×) "
          "| dense f+b ms | einsums f+b ms (×) | kernel f+b ms (×) | rel err einsum / kernel / kernel grad | kernel |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--block_tokens", type=int, default=64)
    parser.add_argument("--block_out", type=int, default=128)
    parser.add_argument("--block_in", type=int, default=64)
    parser.add_argument("--no_kernel", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "monarch_speed.md"))
    args = parser.parse_args()
    cfg = dict(block_tokens=args.block_tokens, block_out=args.block_out, block_in=args.block_in)
    if args.no_kernel:
        cfg["interpret"] = None
    rows = []
    for tokens, k, n, nb in SHAPES:
        row = bench_shape(tokens, k, n, nb, cfg)
        print(fmt(row), flush=True)
        rows.append(row)
    device = jax.devices()[0].device_kind
    lines = [
        "# Monarch multiply vs dense (bf16)",
        "",
        f"Command: `PYTHONUNBUFFERED=1 python benchmarks/monarch_speed.py {' '.join(sys.argv[1:])}`",
        f"Device: {device}; JAX {jax.__version__}; medians of 20 batches of 5 calls after warm-up;"
        " × = dense time / this time, dense measured in the same run.",
        "f+b = forward and VJP (gradients for x and the weights) under one jit.",
        "Goals (issue 3): nblocks 4 ≥ 2.9× fwd, ≥ 2.7× f+b; nblocks 16 ≥ 10× / 8×; 768→3072 ≥ 1.5× fwd.",
        "",
        HEADER,
        *[fmt(r) for r in rows],
        "",
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    print("\n".join(lines[-len(rows) - 3:]))


if __name__ == "__main__":
    main()
