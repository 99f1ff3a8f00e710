"""Compressed N:M GEMV vs XLA dense GEMV: correctness on the device first, then medians.

    PYTHONUNBUFFERED=1 python benchmarks/nm_gemv_speed.py [--size 8192] [--variants]

bf16, ``W`` of ``size x size``; ``y = x @ W`` for batch 1 (and 2, 4, 8), 2:4
(and 1:4, 2:8), by the Pallas kernel and by the fused-XLA formulation
(``fused_xla_gemv`` below, an anchor), against the dense product of the same shape in the same run.
Prints a table last and writes benchmarks/results/nm_gemv_speed.md (or
$OUT/nm_gemv_speed.md when OUT is set).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import masks
from sparsejax.kernels import nm_compressed as nm
from sparsejax.kernels import tile_tables
from timing import median_seconds, rel_err


def fused_xla_gemv(x: jax.Array, packed: nm.NMWeight) -> jax.Array:
    """An anchor: ``x @ W`` from the compressed bytes as one XLA reduction fusion.

    Unpacking, selecting ``x`` at each kept position and the multiply-add are
    elementwise producers of one sum over the groups: no dense ``W`` is written,
    so XLA reads only the compressed bytes, as the Pallas kernel does.
    """
    dtype = jnp.result_type(x.dtype, packed.dtype)
    (k, cols), n, m = packed.shape, packed.n, packed.m
    g = k // m
    lead = x.shape[:-1]
    xg = x.reshape(-1, g, m).astype(jnp.float32)                        # (B, G, m)
    idx = packed.indices()[:, :g]                                       # (n, G, N)
    vals = packed.values[:, :g].astype(jnp.float32)
    picked = jnp.zeros((xg.shape[0],) + idx.shape, jnp.float32)         # x at each kept position
    for p in range(m):
        picked = jnp.where(idx == p, xg[:, None, :, p, None], picked)
    y = jnp.sum(picked * vals, axis=(1, 2))
    return y.reshape(*lead, cols).astype(dtype)


def median_us(fn, *args, calls: int = 20, **kwargs) -> float:
    return 1e6 * median_seconds(fn, *args, calls=calls, **kwargs)


def checked_us(fn, x, packed, expected, log):
    """(relative error, passed, median us) of ``fn(x, packed)``; a failure is logged, not raised."""
    try:
        err = rel_err(fn(x, packed), expected)
        return err, bool(np.isfinite(err) and err < 1e-2), median_us(fn, x, packed)
    except Exception:   # noqa: BLE001
        log(traceback.format_exc())
        return float("nan"), False, float("nan")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--variants", action="store_true")
    args = parser.parse_args()
    lines = []

    def log(s):
        print(s)
        lines.append(s)

    dev = jax.devices()[0]
    log(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    rng = np.random.default_rng(int(time.time()))
    size = args.size
    rows = []
    all_ok = True
    for n, m in ((2, 4), (1, 4), (2, 8)):
        w = jnp.asarray(rng.standard_normal((size, size)), jnp.bfloat16)
        wm = jnp.where(masks.nm_mask(jnp.abs(w), n, m), w, 0)
        packed = nm.compress_nm(wm, n, m)
        kernel = jax.jit(lambda x, p: nm._nm_apply(
            x, p.values, p.meta, (p.shape, p.n, p.m, p.group_tile,
                                  tile_tables.nm_tiles("gpu").cols, False, False)))
        dense = jax.jit(lambda x, w: x @ w)
        fused_xla = jax.jit(fused_xla_gemv)
        for batch in ((1, 2, 4, 8) if (n, m) == (2, 4) else (1,)):
            x = jnp.asarray(rng.standard_normal((batch, size)), jnp.bfloat16)
            expected = x.astype(jnp.float32) @ wm.astype(jnp.float32)
            err, ok, t_k = checked_us(kernel, x, packed, expected, log)
            err_x, ok_x, t_x = checked_us(fused_xla, x, packed, expected, log)
            all_ok &= ok and ok_x
            t_d = median_us(dense, x, w)
            ratio = t_d / t_k
            bytes_ratio = (size * size * 2) / packed.nbytes
            rows.append((f"{n}:{m}", batch, t_d, t_k, ratio, t_x, t_d / t_x, bytes_ratio, max(err, err_x)))
            log(f"{n}:{m} batch {batch}: dense {t_d:.1f} us, compressed {t_k:.1f} us, "
                f"{ratio:.2f}x; fused XLA {t_x:.1f} us, {t_d / t_x:.2f}x (bytes allow "
                f"{bytes_ratio:.2f}x), rel err {err:.1e} / {err_x:.1e} {'ok' if ok and ok_x else 'FAIL'}")
        if args.variants and (n, m) == (2, 4):
            x = jnp.asarray(rng.standard_normal((1, size)), jnp.bfloat16)
            saved = nm.TARGET_PROGRAMS, nm.NUM_WARPS      # None: the launch table's
            for target, warps in ((256, 4), (512, 4), (1024, 4), (512, 8), (1024, 2)):
                for cols in (64, 128, 256):
                    nm.TARGET_PROGRAMS = target
                    nm.NUM_WARPS = warps
                    static = (packed.shape, n, m, packed.group_tile, cols, False, False)
                    fn = jax.jit(lambda x, v, mt, static=static: nm._nm_apply(x, v, mt, static))
                    try:
                        t = median_us(fn, x, packed.values, packed.meta, repeats=7)
                        log(f"variant programs={target} warps={warps} cols_tile={cols}: {t:.1f} us")
                    except Exception as e:   # noqa: BLE001
                        log(f"variant programs={target} warps={warps} cols_tile={cols}: "
                            f"{type(e).__name__}: {e}"[:300])
            nm.TARGET_PROGRAMS, nm.NUM_WARPS = saved
        del w, wm, packed

    table = ["| N:M | batch | dense us | Pallas kernel us | x dense | fused XLA us | x dense | "
             "bytes allow | rel err |", "|---|---|---|---|---|---|---|---|---|"]
    table += [f"| {a} | {b} | {d:.1f} | {k:.1f} | {r:.2f} | {tx:.1f} | {rx:.2f} | {br:.2f} | {e:.1e} |"
              for a, b, d, k, r, tx, rx, br, e in rows]
    command = "PYTHONUNBUFFERED=1 python " + " ".join(["benchmarks/nm_gemv_speed.py", *sys.argv[1:]])
    md = ["# Compressed N:M GEMV speed", "", f"Command: `{command}`", "",
          f"Device: {dev.device_kind}; JAX {jax.__version__}; bf16; W {size}x{size}; "
          "medians of 15 repeats of 20 calls after warm-up; ratio to XLA dense in the same run. "
          f"Goal: 2:4 batch 1 >= 1.5x. Correctness (kernel vs f32 dense on the masked weight): "
          f"{'all passed' if all_ok else 'SOME FAILED'}.", "", *table, "",
          "## Log", "", "```", *lines, "```", ""]
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "nm_gemv_speed.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(table))


if __name__ == "__main__":
    main()
