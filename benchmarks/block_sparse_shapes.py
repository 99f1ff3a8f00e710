"""Block-sparse kernel variants on the shapes of real FFNs, against XLA dense, on the GPU.

    PYTHONUNBUFFERED=1 python benchmarks/block_sparse_shapes.py \\
        [--variants tile,persistent,persistent_dwT] [--shapes up1024,down1024,...] \\
        [--densities 0.5,0.25,0.1] [--tokens 8192] [--budget-s 300] [--smoke]

For each kernel variant (a set of ``BlockSparseTiles`` fields, see VARIANTS):
first a correctness check on the device against the float32 reference (fresh
random inputs, odd M, an empty and a single-block block column; forward, dx and
dW). Then, per shape ``tokens x (K -> N)`` and density (random 128 x 128 block
masks, the same mask for every variant), the forward and forward+backward
(dx and dW) medians, each checked against the reference on those very inputs,
with XLA dense timed in the same run. Prints the table last (ratio to dense and
to the ideal 1 / density) and writes ``$OUT/block_sparse_shapes.md`` and
``$OUT/block_sparse_shapes.json`` (best variant per shape and density, plus a
``_GPU_BY_SHAPE`` table to paste into ``sparsejax/kernels/tile_tables.py``).

Configurations past ``--budget-s`` seconds are skipped (and listed), so the run
fits its time slot; the shapes run in the order given, most telling first.
``--smoke`` runs the same code on CPU in Mosaic GPU interpret mode at tiny
shapes (minutes: interpret mode simulates every warpgroup).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.kernels import block_sparse as bs
from sparsejax.kernels import tile_tables
from timing import median_seconds

# Name -> BlockSparseTiles fields over the shipped GPU tiles. The default sweep is
# DEFAULT_VARIANTS; the others are there for --variants. "persistent_dwT" differs from
# "persistent" only in dW, so its forward times the same kernel twice (the run's noise).
VARIANTS = {
    # One program per output tile (the shipped schedule), empty columns zeroed in-kernel.
    "tile": dict(schedule="tile"),
    # One program per SM over output tiles ordered by block-column length.
    "persistent": dict(schedule="persistent"),
    # The same with a 128-row M tile: twice the tiles, for narrow outputs.
    "persistent_r64": dict(schedule="persistent", rows=64),
    "tile_r64": dict(schedule="tile", rows=64),
    "persistent_w1": dict(schedule="persistent", grid_tile_width=1),
    "persistent_w32": dict(schedule="persistent", grid_tile_width=32),
    # One weight block per pipeline step (fewer, larger copies; two stages fit).
    "persistent_k128": dict(schedule="persistent", step_k=128, stages=2),
    # Single compute warpgroup, two stages: two programs fit on an SM.
    "single_s2": dict(warp_specialized=False, stages=2),
    # dW: x tiles transposed in shared memory instead of an XLA transpose of x.
    "persistent_dwT": dict(schedule="persistent", dw_transpose_in_kernel=True),
    # dW with one program per kept block (the previous kernel).
    "tile_dw1": dict(schedule="tile", dw_split=1),
    # Per-shape choice of tile_tables.select_block_sparse_tiles.
    "auto": dict(schedule="auto"),
}
DEFAULT_VARIANTS = ("tile", "persistent", "persistent_dwT")

# Name -> (K, N) of the weight; tokens x K @ (K, N).
SHAPES = {
    "up1024": (1024, 4096), "down1024": (4096, 1024),
    "up4096": (4096, 11008), "down4096": (11008, 4096),
    "cube": (8192, 8192),
    "up2048": (2048, 8192), "down2048": (8192, 2048),
}
DENSITIES = (0.5, 0.25, 0.1)
# Device-to-device copy on an H200, bytes read plus written (KINDS.md: about 4.3 TB/s).
COPY_BYTES_PER_S = 4.3e12
SMOKE_SHAPES = {"smoke_up": (128, 256), "smoke_down": (256, 128)}


def random_block_mask(rng, grid, density):
    kb, nb = grid
    keep = max(1, int(round(density * kb * nb)))
    mask = np.zeros(kb * nb, bool)
    mask[rng.permutation(kb * nb)[:keep]] = True
    return mask.reshape(grid)


def rel_err_device(a, b) -> float:
    """``||a - b|| / ||b||`` in float32 on the device; NaN if ``a`` has a non-finite entry."""
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if b.size == 0:
        return 0.0
    if not bool(jnp.isfinite(a).all()):
        return float("nan")
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


class Setup:
    """Backend, block size, timing and tile overrides for the GPU run or the CPU smoke run."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.block = (64, 64) if smoke else (128, 128)
        self.interpret = smoke   # Mosaic GPU interpret mode
        self.timing = dict(calls=1, repeats=1, warmup=0) if smoke else dict(calls=10, repeats=9,
                                                                            warmup=3)

    def tiles(self, variant: str) -> tile_tables.BlockSparseTiles:
        fields = dict(VARIANTS[variant])
        if self.smoke:   # tiny M: one 128-row tile per program, a few simulated programs
            fields.update(rows=64, num_programs=2)
        return dataclasses.replace(tile_tables._BLOCK_SPARSE["gpu"], **fields)

    def matmul(self, x, p):
        if self.smoke:
            return bs.block_sparse_matmul(x, p, backend="mosaic_gpu", interpret=True)
        return bs.block_sparse_matmul(x, p, backend="gpu")

    def ms(self, fn, *args) -> float:
        return 1e3 * median_seconds(fn, *args, **self.timing)


def make_case(rng, m, k, n, density, block, bmask=None):
    grid = (-(-k // block[0]), -(-n // block[1]))
    if bmask is None:
        bmask = random_block_mask(rng, grid, density)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    return x, bs.pack(w, bmask, block), g


def reference(x, packed, g):
    """Forward, dx and the dense dW masked to the kept blocks, in float32 on upcast operands."""
    wm = packed.to_dense().astype(jnp.float32)
    x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    y = jnp.matmul(x32, wm, precision=hi)
    dx = jnp.matmul(g32, wm.T, precision=hi)
    keep = jnp.asarray(np.kron(packed.block_mask(), np.ones(packed.block, bool))[:wm.shape[0],
                                                                              :wm.shape[1]])
    dw = jnp.where(keep, jnp.matmul(x32.T, g32, precision=hi), 0)
    return y, dx, dw


def fwd_bwd_fn(setup: Setup):
    def fwd_bwd(x, p, g):
        y, pull = jax.vjp(setup.matmul, x, p)
        dx, dp = pull(g)
        return y, dx, dp
    return fwd_bwd


def check(setup: Setup, x, packed, g, fb_out=None, ref=None):
    """Relative errors (y, dx, dW) of the kernel's forward+backward against the reference."""
    if fb_out is None:
        fb_out = jax.jit(fwd_bwd_fn(setup))(x, packed, g)
    y, dx, dp = fb_out
    ref = ref if ref is not None else jax.jit(reference)(x, packed, g)
    return [rel_err_device(y, ref[0]), rel_err_device(dx, ref[1]),
            rel_err_device(dp.to_dense(), ref[2])]


def ok(errs, tol=1e-2) -> bool:
    return all(np.isfinite(e) and e < tol for e in errs)


def lowers_for_cuda(variant: str) -> str:
    """Mosaic GPU's lowering of forward + backward for CUDA (runs on CPU): "ok" or the error."""
    rng = np.random.default_rng(0)
    x, packed, g = make_case(rng, 512, 1024, 4096, 0.1, (128, 128))
    tiles = dataclasses.replace(tile_tables._BLOCK_SPARSE["gpu"], **VARIANTS[variant])

    def fwd_bwd(x, p, g):
        y, pull = jax.vjp(lambda x, p: bs.block_sparse_matmul(x, p, backend="gpu"), x, p)
        return y, pull(g)

    try:
        with tile_tables.using_block_sparse_tiles("gpu", tiles):
            jax.export.export(jax.jit(fwd_bwd), platforms=["cuda"])(x, packed, g)
        return "ok"
    except Exception as e:   # noqa: BLE001 - reported
        return f"{type(e).__name__}: {str(e)[:300]}"


def correctness(setup: Setup, rng, variants, log) -> dict[str, bool]:
    """Each variant vs the f32 reference on small awkward cases; returns name -> passed.

    In the CPU smoke run, each variant's CUDA lowering is checked too, and variants
    that JAX's Mosaic GPU interpreter cannot run (transposed wgmma operands, JAX
    0.10) are checked by lowering only and left out of the timings.
    """
    bk, bn = setup.block
    if setup.smoke:
        cases = [("odd M, empty + single-block columns", 100, 2 * bk, 3 * bn)]
    else:
        cases = [("odd M, short columns", 1000, 1024, 2048),
                 ("odd shape, long columns", 500, 2944, 333)]
    passed = {}
    for name in variants:
        passed[name] = True
        if setup.smoke:
            lowered = lowers_for_cuda(name)
            log(f"check [{name}] lowering for CUDA (1024 -> 4096, density 0.1): {lowered}")
            passed[name] = lowered == "ok"
            if VARIANTS[name].get("dw_transpose_in_kernel"):
                log(f"check [{name}] not run: the Mosaic GPU interpreter cannot run transposed "
                    "wgmma operands; left out of the smoke timings")
                passed[name] = "lowering only" if lowered == "ok" else False
                continue
        with tile_tables.using_block_sparse_tiles("gpu", setup.tiles(name)):
            for label, m, k, n in cases:
                grid = (-(-k // bk), -(-n // bn))
                bmask = random_block_mask(rng, grid, 0.1 if "short" in label else 0.4)
                bmask[:, 0] = False                 # an empty block column
                bmask[:, 1] = False
                bmask[grid[0] // 2, 1] = True       # a single-block column
                x, packed, g = make_case(rng, m, k, n, None, setup.block, bmask)
                try:
                    errs = check(setup, x, packed, g)
                except Exception:   # noqa: BLE001 - report, exclude the variant, go on
                    log(traceback.format_exc(limit=3))
                    errs = [float("nan")] * 3
                good = ok(errs)
                passed[name] &= good
                log(f"check [{name}] {label} m={m} k={k} n={n}: rel err y {errs[0]:.2e} "
                    f"dx {errs[1]:.2e} dW {errs[2]:.2e} -> {'ok' if good else 'FAIL'}")
    return passed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--shapes", default=None, help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip configurations that would start after this many seconds "
                             "(default 300 on the GPU, none in --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, Mosaic GPU interpret mode, tiny shapes")
    args = parser.parse_args()
    t_start = time.perf_counter()
    if args.budget_s is None:
        args.budget_s = float("inf") if args.smoke else 300.0
    setup = Setup(args.smoke)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"--variants: unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    all_shapes = SMOKE_SHAPES if args.smoke else SHAPES
    shape_names = args.shapes.split(",") if args.shapes else list(all_shapes)
    for s in shape_names:
        if s not in all_shapes:
            raise ValueError(f"--shapes: unknown shape {s!r}; known: {', '.join(all_shapes)}")
    densities = [float(d) for d in args.densities.split(",")]
    tokens = 128 if args.smoke else args.tokens
    if args.smoke:
        densities = densities[:1]

    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    dev = jax.devices()[0]
    log(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}"
        f"{', SMOKE (Mosaic GPU interpret mode)' if args.smoke else ''}")
    for v in variants:
        log(f"variant {v}: {setup.tiles(v)}")
    rng = np.random.default_rng(int(time.time()))
    passed = correctness(setup, rng, variants, log)
    log(f"correctness checks: {time.perf_counter() - t_start:.0f} s")
    timed_variants = [v for v in variants if passed[v] is True]

    rows, skipped = [], []
    for shape_name in shape_names:
        k, n = all_shapes[shape_name]
        if time.perf_counter() - t_start > args.budget_s:
            skipped += [f"{shape_name} d={d}" for d in densities]
            continue
        xd = jnp.asarray(rng.standard_normal((tokens, k)), jnp.bfloat16)
        wd = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
        gd = jnp.asarray(rng.standard_normal((tokens, n)), jnp.bfloat16)

        def dense_fb(x, w, g):
            y, pull = jax.vjp(lambda x, w: x @ w, x, w)
            return y, pull(g)

        t_dense = setup.ms(jax.jit(lambda x, w: x @ w), xd, wd)
        t_dense_fb = setup.ms(jax.jit(dense_fb), xd, wd, gd)
        del xd, wd, gd
        log(f"{shape_name} {tokens}x{k}->{n}: dense XLA fwd {t_dense:.3f} ms, "
            f"fwd+bwd {t_dense_fb:.3f} ms")
        for density in densities:
            if time.perf_counter() - t_start > args.budget_s:
                skipped.append(f"{shape_name} d={density}")
                continue
            x, packed, g = make_case(rng, tokens, k, n, density, setup.block)
            ref = jax.jit(reference)(x, packed, g)
            counts = np.diff(np.asarray(packed.tables.col_ptr))
            log(f"  density {density}: {packed.tables.num_blocks} blocks, block columns: "
                f"{int((counts == 0).sum())}/{counts.size} empty, mean {counts.mean():.1f}")
            # Forward floor: the dense run's rate on the kept FLOPs, or the fewest bytes
            # (x read once, y written once, kept blocks read once) at the copy bandwidth.
            min_bytes = 2 * (tokens * k + tokens * n + packed.tables.num_blocks * math.prod(setup.block))
            floor_ms = max(t_dense * packed.tables.num_blocks / math.prod(packed.tables.grid),
                           1e3 * min_bytes / COPY_BYTES_PER_S)
            for v in timed_variants:
                t0 = time.perf_counter()
                try:
                    with tile_tables.using_block_sparse_tiles("gpu", setup.tiles(v)):
                        # Fresh functions per variant: the tiles are read while tracing,
                        # and jit would reuse a trace cached for the same function object.
                        fwd = jax.jit(lambda x, p: setup.matmul(x, p))
                        fb = jax.jit(fwd_bwd_fn(setup))
                        err_fwd = rel_err_device(fwd(x, packed), ref[0])
                        errs = check(setup, x, packed, g, fb(x, packed, g), ref)
                        t_fwd = setup.ms(fwd, x, packed)
                        t_fb = setup.ms(fb, x, packed, g)
                except Exception:   # noqa: BLE001 - a variant that fails here is reported
                    log(traceback.format_exc(limit=3))
                    err_fwd, errs, t_fwd, t_fb = float("nan"), [float("nan")] * 3, float("nan"), float("nan")
                good = ok([err_fwd, *errs])
                rows.append(dict(shape=shape_name, k=k, n=n, density=density, variant=v,
                                 floor_ms=floor_ms, fwd_ms=t_fwd, fwd_bwd_ms=t_fb, dense_ms=t_dense,
                                 dense_fwd_bwd_ms=t_dense_fb, errors=[err_fwd, *errs], ok=good))
                log(f"    [{v}] fwd {t_fwd:.3f} ms ({t_dense / t_fwd:.2f}x), fwd+bwd {t_fb:.3f} ms "
                    f"({t_dense_fb / t_fb:.2f}x); rel err y {err_fwd:.1e} dx {errs[1]:.1e} "
                    f"dW {errs[2]:.1e} {'ok' if good else 'FAIL'} "
                    f"[{time.perf_counter() - t0:.1f} s incl. compile]")

    # Best correct variant per shape and density, forward and forward+backward.
    best = {}
    for r in rows:
        if not r["ok"]:
            continue
        entry = best.setdefault(r["shape"], {}).setdefault(str(r["density"]), {})
        for key, t in (("fwd", r["fwd_ms"]), ("fwd_bwd", r["fwd_bwd_ms"])):
            dense = r["dense_ms"] if key == "fwd" else r["dense_fwd_bwd_ms"]
            if key not in entry or t < entry[key]["ms"]:
                entry[key] = dict(variant=r["variant"], fields=VARIANTS[r["variant"]], ms=t,
                                  x_dense=dense / t, x_ideal=dense / t * r["density"])
    # The forward's winner for (K, N) is what select_block_sparse_tiles should pick for a
    # kernel call of that shape (dx of the layer N -> K is such a call).
    by_shape = {}
    for shape_name, per_density in best.items():
        k, n = all_shapes[shape_name]
        by_shape[f"({k}, {n})"] = {d: e["fwd"]["fields"] for d, e in per_density.items()}

    by_shape_py = "_GPU_BY_SHAPE = {" + ", ".join(
        f"({all_shapes[s][0]}, {all_shapes[s][1]}): {{"
        + ", ".join(f"{float(d)}: {e['fwd']['fields']!r}" for d, e in per.items()) + "}"
        for s, per in best.items()) + "}"
    table = ["| shape (tokens x K -> N) | density | variant | fwd ms | fwd x dense | fwd / ideal | "
             "fwd floor ms | fwd+bwd ms | fwd+bwd x dense | fwd+bwd / ideal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ideal = 1 / r["density"]
        sx, sfb = r["dense_ms"] / r["fwd_ms"], r["dense_fwd_bwd_ms"] / r["fwd_bwd_ms"]
        flag = "" if r["ok"] else " (FAILED check)"
        table.append(f"| {r['shape']} {tokens}x{r['k']}->{r['n']} | {r['density']} | {r['variant']}{flag} | "
                     f"{r['fwd_ms']:.3f} | {sx:.2f} | {sx / ideal:.2f} | {r['floor_ms']:.3f} | "
                     f"{r['fwd_bwd_ms']:.3f} | "
                     f"{sfb:.2f} | {sfb / ideal:.2f} |")
    dense_rows = {(r["shape"], r["k"], r["n"]): (r["dense_ms"], r["dense_fwd_bwd_ms"]) for r in rows}
    best_lines = [f"- {s} d={d}: fwd {e['fwd']['variant']} {e['fwd']['x_dense']:.2f}x "
                  f"({e['fwd']['x_ideal']:.2f} of ideal); fwd+bwd {e['fwd_bwd']['variant']} "
                  f"{e['fwd_bwd']['x_dense']:.2f}x ({e['fwd_bwd']['x_ideal']:.2f} of ideal)"
                  for s, per in best.items() for d, e in per.items()]
    command = "PYTHONUNBUFFERED=1 python " + " ".join(["benchmarks/block_sparse_shapes.py", *sys.argv[1:]])
    md = ["# Block-sparse kernel variants on FFN shapes", "",
          f"Command: `{command}`", "",
          f"Device: {dev.device_kind}; JAX {jax.__version__}; bf16; {tokens} tokens; "
          f"{setup.block[0]}x{setup.block[1]} blocks, random block masks (the same per shape and "
          f"density for every variant); medians of {setup.timing['repeats']} repeats of "
          f"{setup.timing['calls']} calls after {setup.timing['warmup']} warm-up calls; XLA dense "
          "timed in the same run; ideal = 1 / density; fwd floor = the larger of dense time x "
          "density and the fewest bytes (x, y, kept blocks once each) at 4.3 TB/s.", "",
          "Correctness (f32 reference, fresh random inputs): "
          + ", ".join(f"{v} {p if isinstance(p, str) else 'passed' if p else 'FAILED'}"
                      for v, p in passed.items()), "",
          *table, "", "Dense XLA per shape (ms, fwd / fwd+bwd): "
          + "; ".join(f"{s} {a:.3f} / {b:.3f}" for (s, _, _), (a, b) in dense_rows.items()), "",
          "Best correct variant per shape and density:", "", *best_lines, "",
          "Forward winners as a table for `sparsejax/kernels/tile_tables.py` (schedule=\"auto\"):",
          "", "```python", by_shape_py, "```", ""]
    if skipped:
        md += [f"Skipped (past the {args.budget_s:.0f} s budget): {', '.join(skipped)}", ""]
    md += ["## Log", "", "```", *lines, "```", ""]
    out_dir = os.environ.get("OUT") or (os.path.join(os.path.dirname(__file__), "results")
                                        if not args.smoke else "/tmp")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "block_sparse_shapes.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(out_dir, "block_sparse_shapes.json"), "w") as f:
        json.dump(dict(device=dev.device_kind, jax=jax.__version__, tokens=tokens,
                       variants={v: VARIANTS[v] for v in variants}, correctness=passed, best=best,
                       gpu_by_shape_for_tile_tables=by_shape, rows=rows, skipped=skipped),
                  f, indent=1)
    print(f"total {time.perf_counter() - t_start:.0f} s; wrote {out_dir}/block_sparse_shapes.md/.json")
    if skipped:
        print(f"skipped (budget): {', '.join(skipped)}")
    print("\n".join(best_lines))
    print(by_shape_py)
    print("\n".join(table))


if __name__ == "__main__":
    main()
