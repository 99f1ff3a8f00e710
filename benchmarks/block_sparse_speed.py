"""Block-sparse matmul vs XLA dense: correctness on the device first, then medians.

    PYTHONUNBUFFERED=1 python benchmarks/block_sparse_speed.py [--size 8192] [--variants]

Checks the kernel against the plain-JAX reference (fresh random inputs; odd
shapes; all-zero, fully dense and one-block-per-row masks; forward and both
gradients), then times forward and forward+backward at 128-blocks for
densities 0.5 / 0.25 / 0.1 against the dense XLA product in the same run, bf16.
Prints a table last and writes benchmarks/results/block_sparse_speed.md (or
$OUT/block_sparse_speed.md when OUT is set).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.kernels import block_sparse as bs
from sparsejax.kernels.block_sparse import mosaic_gpu, mosaic_gpu_ws
from sparsejax.kernels import tile_tables
from timing import median_seconds, rel_err

GOALS_FWD = {0.5: 1.7, 0.25: 3.4, 0.1: 8.0}
GOALS_FWD_BWD = {0.5: 1.5, 0.25: 3.0, 0.1: 6.0}


def _median_ms(fn, *args, **kwargs) -> float:
    return 1e3 * median_seconds(fn, *args, **kwargs)


def random_block_mask(rng, grid, density):
    kb, nb = grid
    keep = max(0, int(round(density * kb * nb)))
    mask = np.zeros(kb * nb, bool)
    mask[rng.permutation(kb * nb)[:keep]] = True
    return mask.reshape(grid)


def check_correctness(rng, log) -> bool:
    """Kernel vs reference on the device, forward and gradients; returns all-pass."""
    cases = [
        ("random, odd shape", 300, 700, 333, "random"),
        ("random", 512, 1024, 768, "random"),
        ("all-zero mask", 256, 512, 384, "zero"),
        ("fully dense", 256, 512, 384, "dense"),
        ("one block per row", 200, 640, 512, "one_per_row"),
        ("decode batch 3", 3, 1024, 512, "random"),
    ]
    ok_all = True
    for name, m, k, n, kind in cases:
        block = (128, 128)
        grid = (-(-k // 128), -(-n // 128))
        if kind == "random":
            bmask = random_block_mask(rng, grid, 0.4)
            bmask[:, 0] = False                                 # an empty column
        elif kind == "zero":
            bmask = np.zeros(grid, bool)
        elif kind == "dense":
            bmask = np.ones(grid, bool)
        else:
            bmask = np.zeros(grid, bool)
            bmask[np.arange(grid[0]), rng.integers(0, grid[1], grid[0])] = True
        w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        g = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
        packed = bs.pack(w, bmask, block)

        def vjp(fn, x, p, g):
            y, pull = jax.vjp(fn, x, p)
            dx, dp = pull(g)
            return y, dx, dp.blocks

        try:
            got = jax.jit(lambda x, p, g: vjp(bs.block_sparse_matmul, x, p, g))(x, packed, g)
            # Reference in f32 on upcast operands.
            p32 = bs.BlockSparseWeight(packed.blocks.astype(jnp.float32), packed.tables)
            ref = jax.jit(lambda x, p, g: vjp(bs.block_sparse_matmul_reference, x, p, g))(
                x.astype(jnp.float32), p32, g.astype(jnp.float32))
            errs = [rel_err(a, b) if np.asarray(b).size else 0.0 for a, b in zip(got, ref)]
            if kind == "zero":
                errs = [float(np.abs(np.asarray(got[0], np.float32)).max()),
                        float(np.abs(np.asarray(got[1], np.float32)).max()), 0.0]
                ok = all(e == 0 for e in errs)
            else:
                ok = all(np.isfinite(e) and e < 1e-2 for e in errs)
        except Exception:   # noqa: BLE001 - report and go on to the timings
            log(traceback.format_exc())
            errs, ok = [float("nan")] * 3, False
        ok_all &= ok
        log(f"check {name:20s} m={m} k={k} n={n}: rel err y {errs[0]:.2e} dx {errs[1]:.2e} "
            f"dW {errs[2]:.2e} -> {'ok' if ok else 'FAIL'}")
    return ok_all


def time_density(rng, size, density, log, tiles=None):
    k = n = m = size
    block = (128, 128)
    grid = (k // 128, n // 128)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((m, n)), jnp.bfloat16)
    packed = bs.pack(w, random_block_mask(rng, grid, density), block)
    fwd = jax.jit(bs.block_sparse_matmul)

    def fwd_bwd(x, p, g):
        y, pull = jax.vjp(bs.block_sparse_matmul, x, p)
        return y, pull(g)

    t_fwd = _median_ms(fwd, x, packed)
    t_fb = _median_ms(jax.jit(fwd_bwd), x, packed, g)
    return t_fwd, t_fb


def time_variants(rng, size, density, log):
    """Forward-only tile variants (for the shipped table)."""
    k = n = m = size
    grid = (k // 128, n // 128)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    packed = bs.pack(w, random_block_mask(rng, grid, density), (128, 128))
    t = packed.tables
    base = tile_tables.block_sparse_tiles("gpu", m)
    rows = []
    step_k = 64
    for ws in (False, True):
        kernel = mosaic_gpu_ws.gather_matmul_ws if ws else mosaic_gpu.gather_matmul
        # stages=2 without warp specialization leaves room for two programs per SM.
        for stages in ((2, 4) if not ws else (3, 4)):
            for width in (4, 8, 16):
                tiles = dataclasses.replace(base, stages=stages, step_k=step_k, grid_tile_width=width,
                                            warp_specialized=ws)
                fn = jax.jit(lambda x, b, tiles=tiles, kernel=kernel: kernel(
                    x, b, t.col_ptr, t.row_of, jnp.bfloat16, tiles))
                name = f"variant ws={ws} stages={stages} width={width}"
                try:
                    ms = _median_ms(fn, x, packed.blocks, repeats=7)
                except Exception as e:   # noqa: BLE001 - e.g. shared memory exceeded
                    log(f"{name}: {type(e).__name__}: {str(e)[:200]}")
                    continue
                rows.append((ms, ws, stages, width))
                log(f"{name}: {ms:.3f} ms")
    return sorted(rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--variants", action="store_true", help="also time tile variants")
    args = parser.parse_args()
    lines = []

    def log(s):
        print(s)
        lines.append(s)

    dev = jax.devices()[0]
    log(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    rng = np.random.default_rng(int(time.time()))
    correct = check_correctness(rng, log)

    size = args.size
    x = jnp.asarray(rng.standard_normal((size, size)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((size, size)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((size, size)), jnp.bfloat16)
    dense = jax.jit(lambda x, w: x @ w)

    def dense_fb(x, w, g):
        y, pull = jax.vjp(lambda x, w: x @ w, x, w)
        return y, pull(g)

    t_dense = _median_ms(dense, x, w)
    t_dense_fb = _median_ms(jax.jit(dense_fb), x, w, g)
    log(f"dense XLA {size}^3: fwd {t_dense:.3f} ms, fwd+bwd {t_dense_fb:.3f} ms")
    del x, w, g

    results = []
    shipped = tile_tables._BLOCK_SPARSE["gpu"]
    configs = [("shipped", shipped)]
    if args.variants:   # also the other pipeline kind, end to end
        configs.append(("alt", dataclasses.replace(shipped, warp_specialized=not shipped.warp_specialized,
                                                   stages=4, grid_tile_width=4)))
    for label, tiles in configs:
        tile_tables._BLOCK_SPARSE["gpu"] = tiles
        tile_tables.block_sparse_tiles.cache_clear()
        if label != "shipped":
            log(f"[{label}] {tiles}")
            correct &= check_correctness(rng, log)
        for density in (0.5, 0.25, 0.1):
            try:
                t_fwd, t_fb = time_density(rng, size, density, log)
            except Exception:   # noqa: BLE001
                log(traceback.format_exc())
                t_fwd = t_fb = float("nan")
            if label == "shipped":
                results.append((density, t_fwd, t_fb))
            log(f"[{label} ws={tiles.warp_specialized}] density {density}: fwd {t_fwd:.3f} ms "
                f"({t_dense / t_fwd:.2f}x), fwd+bwd {t_fb:.3f} ms ({t_dense_fb / t_fb:.2f}x)")
    tile_tables._BLOCK_SPARSE["gpu"] = shipped
    tile_tables.block_sparse_tiles.cache_clear()

    variants = time_variants(rng, size, 0.25, log) if args.variants else []

    table = ["| density | fwd ms | fwd x dense (goal) | fwd+bwd ms | fwd+bwd x dense (goal) |",
             "|---|---|---|---|---|",
             f"| 1 (XLA dense) | {t_dense:.3f} | 1 | {t_dense_fb:.3f} | 1 |"]
    for density, t_fwd, t_fb in results:
        table.append(f"| {density} | {t_fwd:.3f} | {t_dense / t_fwd:.2f} (>= {GOALS_FWD[density]}) | "
                     f"{t_fb:.3f} | {t_dense_fb / t_fb:.2f} (>= {GOALS_FWD_BWD[density]}) |")
    command = "PYTHONUNBUFFERED=1 python " + " ".join(["benchmarks/block_sparse_speed.py", *sys.argv[1:]])
    md = ["# Block-sparse matmul speed", "",
          f"Command: `{command}`", "",
          f"Device: {dev.device_kind}; JAX {jax.__version__}; bf16; {size}x{size}x{size}; "
          "128x128 blocks, random block masks; medians of 15 repeats of 10 calls after warm-up; "
          "ratio to XLA dense in the same run.", "",
          f"Correctness checks (kernel vs f32 reference, fresh random inputs): "
          f"{'all passed' if correct else 'SOME FAILED'}", "", *table, ""]
    if variants:
        md += ["Forward tile variants at density 0.25, fastest first:", ""]
        md += [f"- {ms:.3f} ms: warp_specialized={ws}, stages={s}, grid_tile_width={wd}"
               for ms, ws, s, wd in variants]
        md.append("")
    md += ["## Log", "", "```", *lines, "```", ""]
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "block_sparse_speed.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(table))


if __name__ == "__main__":
    main()
