"""Monarch multiply speed vs dense ``x @ W`` (bf16): einsum paths and the fused Mosaic GPU kernel.

Run on a GPU (finishes in under three minutes on an H200):

    source benchmarks/device_env.sh && python benchmarks/monarch_speed.py

Check on the CPU that it runs end to end (kernel in Mosaic GPU interpret mode, tiny shapes):

    python benchmarks/monarch_speed.py --smoke

For every shape and path it first checks correctness on two fresh random draws
(forward and the gradients of x, w1, w2 against the float32 reference by relative
Frobenius error; a memory block filled with NaN is freed before the first kernel
run so an output tile the kernel never writes reads NaN or stale data, and the
second draw catches stale data), then times forward and forward+backward (a VJP
with a random cotangent, all three gradients) as medians after warm-up, dense XLA
measured in the same run. Paths:

* ``einsum_ref``: ``monarch.matmul_reference`` with JAX autodiff (what the pass ran before);
* ``einsum``: ``monarch_matmul_einsum`` (its backward keeps the matmuls in bf16; the GEMMs
  return bf16; ``P1`` moves contiguous runs where 8 p <= tokens); ``einsum_f32out``: the same with float32 GEMM
  outputs rounded afterwards; ``einsum_p1alt``: the other ``P1`` spelling
  (contiguous runs vs a minor-axis transpose; the default picks by ``8 p <= tokens``);
* ``kernel``: the fused kernel forward, einsum backward; ``kernel_fdx``: the same
  with dx through the kernel; ``kernel_s2`` / ``kernel_c128`` / ``kernel_grp`` / ``kernel_c256`` /
  ``kernel_o256``: tile variants (2 pipeline stages; 128-column intermediate chunks; the
  most output blocks per program; a block pair's whole slice per stage-one accumulator;
  256-column output tiles);
  ``kernel_noP2``: the kernel's block-major output before XLA's output transpose (what
  the transpose costs; a consumer inside a model absorbs it);
* ``block_sparse``: the two factors as block-sparse products (``monarch_block_sparse``),
  forward and backward; ``block_sparse_noP2``: the same leaving the output block-major, as
  a producer chained to another Monarch site does (checked through the interleave).

Prints the table last and writes it to ``$OUT/monarch_speed.md`` when ``$OUT`` is set.
Paths past the time budget (``--budget_s``) are listed as skipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sparsejax import monarch  # noqa: E402
from sparsejax.kernels import monarch_block_sparse as mbs  # noqa: E402
from sparsejax.kernels import monarch_matmul as mk  # noqa: E402
from timing import median_seconds  # noqa: E402

SHAPES = [  # (tokens, K, N, nblocks); nblocks 4 first: the end-to-end LM's Monarch sites
    (8192, 4096, 16384, 4),
    (8192, 16384, 4096, 4),
    (16384, 768, 3072, 4),
    (16384, 3072, 768, 4),
    (8192, 4096, 16384, 16),
    (8192, 16384, 4096, 16),
]
SMOKE_SHAPES = [(40, 76, 72, 2), (40, 80, 70, 2)]   # nblocks | q (h saved), and not


def goals(k, n, nb):
    """(forward, forward+backward) goals of issue 15."""
    if max(k, n) <= 3072:
        return 1.5, 1.5
    return {4: (2.9, 2.7), 16: (10.0, 8.0)}[nb]


def fwd_bwd(matmul):
    def run(x, params, ct):
        y, vjp = jax.vjp(matmul, x, params)
        return y, vjp(ct)
    return jax.jit(run)


def paths(n, nb, q, p, s, interpret, tokens):
    """name -> (matmul(x, factors), timed parts, why not) for the Monarch paths."""
    out = {
        "einsum_ref": (lambda x, f: monarch.matmul_reference(x, f, n), ("fwd", "fb"), None),
        "einsum": (lambda x, f: mk.monarch_matmul_einsum(x, f, n), ("fwd", "fb"), None),
        "einsum_f32out": (lambda x, f: mk.monarch_matmul_einsum(x, f, n, native_rounding=False),
                          ("fwd", "fb"), None),
        # The other spelling of P1 than einsum's default at this shape (block_runs).
        "einsum_p1alt": (lambda x, f: mk.monarch_matmul_einsum(
            x, f, n, block_runs=not 8 * p <= tokens), ("fwd", "fb"),
            None if q % nb == 0 else "nblocks does not divide q: one spelling"),
    }
    base = mk.choose_tiles(nb, q, p, s, interpret=interpret)
    variants = {
        "kernel": (base, "einsum", ("fwd", "fb")),
        "kernel_fdx": (base, "fused", ("fb",)),
        "kernel_s2": (dataclasses.replace(base, stages=2), "einsum", ("fwd",)),
        "kernel_c128": (dataclasses.replace(base, chunk=min(mk._round_up(mk._slot_plan(nb, q)[3], 16),
                                                            128), stages=2), "einsum", ("fwd",)),
        # Several output blocks per program: u read nblocks / group times, not nblocks.
        "kernel_grp": (mk.choose_tiles(nb, q, p, s, interpret=interpret, prefer_group=True),
                       "einsum", ("fwd",)),
        # The whole slice of a block pair in one stage-one accumulator (u streamed once per
        # (j, i) instead of once per chunk), narrower output tiles to make room.
        "kernel_c256": (mk.MonarchTiles(rows=64, step_in=base.step_in, stages=2, group=1,
                                        chunk=min(mk._round_up(mk._slot_plan(nb, q)[3], 16), 256),
                                        out_cols=min(base.out_cols, 64)), "einsum", ("fwd", "fb")),
        # Half as many stage-two pipelines (each restarts its copies) per program.
        "kernel_o256": (dataclasses.replace(base, rows=64, chunk=min(base.chunk, 64), stages=2,
                                            out_cols=mk._pow2_at_most(s, 256)), "einsum", ("fwd",)),
    }
    shapes = {"w1": jax.ShapeDtypeStruct((nb, q, p), jnp.bfloat16),
              "w2": jax.ShapeDtypeStruct((nb, s, q), jnp.bfloat16)}
    seen = set()
    for name, (tiles, bwd, parts) in variants.items():
        if name != "kernel_fdx" and tiles in seen:
            continue    # a variant equal to the default tiles: nothing new to time
        seen.add(tiles)
        why = mk.supported((1, nb * p), shapes, interpret=interpret, tiles=tiles)
        fn = (lambda tiles, bwd: lambda x, f: mk.monarch_matmul(
            x, f, n, impl="kernel", interpret=interpret, tiles=tiles, backward=bwd))(tiles, bwd)
        out[name] = (fn, parts, why)
    # Diagnostic: the default kernel without the output interleave P2 (XLA's transpose of
    # the output), which a consumer in a model absorbs. Checked through the interleave.
    why = out["kernel"][2] if "kernel" in out else "no kernel"
    cfg = mk._Config(tiles=base, tiles_dx=base, backward="einsum", interpret=interpret)

    def block_major(x, f):
        u = mk._blocks_in(x, nb, p, x.dtype)
        return mk._fused_blocks(u, f["w1"], f["w2"], cfg)

    out["kernel_noP2"] = (block_major, ("fwd",), why)
    # The two factors as block-sparse products on the block-sparse kernel (no transpose of the
    # intermediate; P2 as XLA's transpose of the output), forward and backward.
    # (The smoke's tiny shapes take small blocks, which only the interpreted kernel runs.)
    blocks = mbs.blocks_for(nb, q, p, s, sides=(8, 4, 2, 1)) if interpret else None
    out["block_sparse"] = (
        lambda x, f: mbs.monarch_matmul_block_sparse(x, f, n, blocks=blocks, interpret=interpret),
        ("fwd", "fb"), mbs.supported((1, nb * p), shapes, blocks=blocks, interpret=interpret))
    # Diagnostic: the same without P2 (block-major output, as a producer chained to another
    # Monarch site leaves it), forward and backward: what the output transpose costs.
    out["block_sparse_noP2"] = (
        lambda x, f: mbs.monarch_matmul_block_sparse(x, f, n, blocks=blocks, interpret=interpret,
                                                     block_major_output=True),
        ("fwd", "fb"), out["block_sparse"][2] or (None if n == nb * s else "padded output"))
    return out


@jax.jit
def rel_err(a, b):
    """``‖a − b‖ / ‖b‖`` on the device (host float64 would cost seconds per 8192 x 16384 check);
    NaN when ``a`` has a non-finite entry."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    err = jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30)
    return jnp.where(jnp.all(jnp.isfinite(a)), err, jnp.nan)


def draw(key, tokens, k, n, nb):
    kx, kf, kc = jax.random.split(key, 3)
    x = jax.random.normal(kx, (tokens, k), jnp.float32).astype(jnp.bfloat16)
    f = monarch.init_factors(kf, k, n, nb, jnp.bfloat16)
    ct = jax.random.normal(kc, (tokens, n), jnp.float32).astype(jnp.bfloat16)
    return x, f, ct


def poison_allocator(shape):
    """Fill and free a NaN block the size of an output, so unwritten output memory reads NaN."""
    jax.block_until_ready(jnp.full(shape, jnp.nan, jnp.bfloat16)).delete()


class Budget:
    def __init__(self, seconds):
        self.end = time.perf_counter() + seconds

    def left(self):
        return self.end - time.perf_counter()


PRIMARY = ("einsum", "block_sparse", "kernel")   # timed for every shape first; the rest while the budget lasts
# Then these (dx through the kernel first: it lowers at every shape now), then the tiles.
SECOND = ["block_sparse_noP2", "kernel_fdx", "einsum_p1alt", "kernel_noP2", "kernel_grp", "einsum_ref",
          "einsum_f32out"]


def prepare_shape(tokens, k, n, nb, args):
    """Inputs, float32 references of two fresh check draws, dense timings, and the paths."""
    (_, q, p), (_, s, _) = monarch.monarch_shapes(k, n, nb)
    key = jax.random.PRNGKey(tokens + k + n + nb)
    checks = [draw(kk, tokens, k, n, nb) for kk in jax.random.split(key, 2)]
    x, f, ct = draw(jax.random.fold_in(key, 7), tokens, k, n, nb)
    w = (jax.random.normal(jax.random.fold_in(key, 8), (k, n), jnp.float32) / k ** 0.5
         ).astype(jnp.bfloat16)
    timing = dict(calls=args.calls, repeats=args.repeats, warmup=args.warmup)
    ref_fb = fwd_bwd(lambda x, f: monarch.matmul_reference(
        x, f, n, precision=jax.lax.Precision.HIGHEST))
    f32 = lambda a: a.astype(jnp.float32)
    refs = [ref_fb(f32(cx), jax.tree.map(f32, cf), f32(cct)) for cx, cf, cct in checks]
    dense = {"path": "dense XLA", "shape": f"{tokens}×{k}→{n}", "nb": nb, "goal": goals(k, n, nb),
             "fwd": median_seconds(jax.jit(lambda x, w: x @ w), x, w, **timing),
             "fb": median_seconds(fwd_bwd(lambda x, w: x @ w), x, w, ct, **timing)}
    return dict(tokens=tokens, n=n, nb=nb, checks=checks, refs=refs, inputs=(x, f, ct),
                timing=timing, dense=dense, rows=[dense],
                paths=paths(n, nb, q, p, s, args.smoke, tokens))


def run_path(ctx, name, budget):
    """Checks one path on both draws (each timed part is checked), then times it."""
    fn, parts, why = ctx["paths"][name]
    n, dense = ctx["n"], ctx["dense"]
    row = dict(shape=dense["shape"], nb=ctx["nb"], goal=dense["goal"], path=name, dense=dense)
    ctx["rows"].append(row)
    if why is not None:
        row["note"] = f"not run: {why}"
        return
    if budget.left() < 0:
        row["note"] = "skipped: time budget"
        return
    try:
        full = fn
        if name == "kernel_noP2":   # checked through the interleave, timed without it
            full = lambda x, f: mk._interleave_out(fn(x, f), x.shape[:-1], n)
        if name == "block_sparse_noP2":
            full = lambda x, f: mk._interleave_out(fn(x, f).reshape(-1, ctx["nb"], n // ctx["nb"]),
                                                   x.shape[:-1], n)
        compiled = {"fwd": jax.jit(full), "fb": fwd_bwd(full)}
        errs = []
        for (cx, cf, cct), (ry, (rx, rf)) in zip(ctx["checks"], ctx["refs"]):
            if "fb" in parts:
                poison_allocator((ctx["tokens"], n))
                y, (gx, gf) = compiled["fb"](cx, cf, cct)
                errs.append(max(rel_err(gx, rx), rel_err(gf["w1"], rf["w1"]),
                                rel_err(gf["w2"], rf["w2"])))
                errs.append(rel_err(y, ry))
            if "fwd" in parts:
                poison_allocator((ctx["tokens"], n))
                errs.append(rel_err(compiled["fwd"](cx, cf), ry))
        errs = [float(e) for e in errs]
        row["err"] = max(errs, key=lambda e: (e != e, e))   # NaN counts as the worst
        if not row["err"] < 2e-2:    # bf16 lands at 2-5e-3; NaN fails
            row["note"] = "WRONG: not timed"
            return
        x, f, ct = ctx["inputs"]
        if "fwd" in parts:
            timed = compiled["fwd"] if full is fn else jax.jit(fn)   # reuse the compiled check
            row["fwd"] = median_seconds(timed, x, f, **ctx["timing"])
        if "fb" in parts:    # without the interleave (noP2) the cotangent's order is moot
            timed = compiled["fb"] if full is fn else fwd_bwd(fn)
            row["fb"] = median_seconds(timed, x, f, ct, **ctx["timing"])
    except Exception as e:  # report, keep measuring the rest
        row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        print(f"{dense['shape']} nb={ctx['nb']} {name}: {row['note']}", file=sys.stderr)
    print(fmt(row), flush=True)


def fmt(row):
    dense = row.get("dense", row)

    def cell(part):
        if part not in row:
            return "—"
        if row is dense:
            return f"{row[part] * 1e3:.3f}"
        return f"{row[part] * 1e3:.3f} ({dense[part] / row[part]:.2f}×)"

    err = f"{row['err']:.1e}" if "err" in row else ""
    goal = f"{row['goal'][0]}× / {row['goal'][1]}×" if row is dense else ""
    return (f"| {row['shape']} | {row['nb']} | {row['path']} | {cell('fwd')} | {cell('fb')} "
            f"| {err} | {goal} | {row.get('note', '')} |")


HEADER = ("| tokens×K→N | nblocks | path | fwd ms (× dense) | fwd+bwd ms (× dense) "
          "| rel err (worst of y, dx, dw1, dw2) | goal fwd / f+b | note |\n|---|---|---|---|---|---|---|---|")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU, the kernel in Mosaic GPU interpret mode")
    parser.add_argument("--budget_s", type=float, default=130.0,
                        help="stop timing new paths after this many seconds")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    shapes = SHAPES
    if args.smoke:
        shapes = SMOKE_SHAPES
        args.calls, args.repeats, args.warmup = 1, 1, 1
    start = time.perf_counter()
    budget = Budget(args.budget_s)
    contexts = []

    def report(final=False):
        """The table so far; rewritten to $OUT after every path, so a run cut short keeps it."""
        order = ["dense XLA", *PRIMARY, *SECOND]
        rows = [r for ctx in contexts
                for r in sorted(ctx["rows"], key=lambda r: (order + [r["path"]]).index(r["path"]))]
        lines = [
            "# Monarch multiply vs dense (bf16)",
            "",
            f"Command: `python benchmarks/monarch_speed.py {' '.join(sys.argv[1:])}`",
            f"Device: {jax.devices()[0].device_kind}; JAX {jax.__version__}; medians of "
            f"{args.repeats} batches of {args.calls} calls after warm-up; × = dense time / this "
            f"time, dense measured in the same run; total {time.perf_counter() - start:.0f} s"
            + ("." if final else " (incomplete: the run was still going)."),
            "fwd+bwd = forward and VJP (gradients for x, w1, w2) under one jit. rel err: against "
            "the float32 reference, worst of two fresh draws over every timed part.",
            "",
            HEADER,
            *[fmt(r) for r in rows],
            "",
        ]
        text = "\n".join(lines)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "monarch_speed.md"), "w") as fh:
                fh.write(text)
        return text

    for tokens, k, n, nb in shapes:     # pass one: dense and the primary paths, every shape
        ctx = prepare_shape(tokens, k, n, nb, args)
        contexts.append(ctx)
        print(fmt(ctx["dense"]), flush=True)
        for name in PRIMARY:
            run_path(ctx, name, budget)
            report()
    # Pass two: the other paths and variants, each over every shape before the next.
    names = dict.fromkeys(n for ctx in contexts for n in ctx["paths"] if n not in PRIMARY)
    for name in sorted(names, key=lambda n: (SECOND + [n]).index(n)):
        for ctx in contexts:
            if name in ctx["paths"]:
                run_path(ctx, name, budget)
                report()
    print(report(final=True))


if __name__ == "__main__":
    main()
