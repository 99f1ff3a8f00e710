"""Sweep of the sparse-input GEMV's variants (issue 16 item 1) on one GPU.

    source benchmarks/device_env.sh && python benchmarks/sparse_input_sweep.py --budget 150
    python benchmarks/sparse_input_sweep.py --smoke      # CPU, Pallas interpret mode, tiny sizes

``y = where(|x| > 0, x, 0) @ W`` for ``W`` 8192x8192 bf16 at 50 / 75 / 90% zero inputs, batch
1 (goals >= 1.8 / 3 / 6x of XLA's dense GEMV), then batch 2 / 4 / 8 at 50% as the budget
allows. The zeros sit at random positions shared by the batch's rows (whole dead rows of
``W``), so every batch runs at the stated live fraction; a 100%-zero case gives each path's
fixed cost (launches, partial-sum reduction), and the XLA live-row list alone
(``live_row_list``: cumsum + scatter) is timed to price the ``compact="xla"`` variants.

Each variant is first checked against ``sparse_input_gemv_reference`` on the device (relative
Frobenius error < 2e-2, else FAILED and not timed), then timed the way issue 16 item 3 asks
(``decode_speed.Bench``): one jit running the GEMV over ``layers`` = 4 distinct weights
(512 MiB, far past the 60 MB L2), called back to back; median over repeats after warm-up, per
weight. XLA's dense GEMV is timed the same way in the same run. Each function's device time
(``Bench.device_us``: its kernels' durations from the profiler plus 0.4 µs per launch, what a
CUDA graph of the call approaches) goes beside it in rows that say so. Variants: the best ``masked``
configs of the earlier sweeps, ``gather``, and a grid of the ``rows`` path's knobs (``bc`` rows
per chunk, ``span`` rows compacted at once, ``programs`` row groups, ``col_splits`` column
strips, ``num_warps``, ``num_stages``, partial sums summed by XLA / by the last program of
each strip / atomics, in-kernel vs XLA compaction).

After ``--budget`` seconds the remaining variants are skipped and listed. Prints the table
last; writes it with every variant and the log to ``$OUT/sparse_input_sweep.md`` when ``$OUT``
is set.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import time
import traceback

# The package comes from the install (or device_env.sh's layout): the repo root goes last.
sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sparsejax.kernels import sparse_input_gemv as sig  # noqa: E402
from decode_speed import FULL, SMOKE, Bench, _normal, _over_layers, _pad_row, summary_table  # noqa: E402
from timing import rel_err  # noqa: E402

GOALS = {0.5: 1.8, 0.75: 3.0, 0.9: 6.0}          # batch 1, x dense XLA (issue 16)
TOL = 2e-2


def rows_name(bc=32, span=256, programs=None, col_splits=16, num_warps=4, num_stages=2,
              partials=True, compact="kernel", sum_in_kernel=False):
    parts = [f"rows bc{bc}"]
    parts.append(f"span{span}" if compact == "kernel" else "xla-list")
    if programs is not None:
        parts.append(f"P{programs}")
    parts += [f"cs{col_splits}", f"w{num_warps}"]
    if num_stages != 2:
        parts.append(f"s{num_stages}")
    if not partials:
        parts.append("atomics")
    if sum_in_kernel:
        parts.append("summed in kernel")
    return " ".join(parts)


def _rows(**kw):
    return rows_name(**kw), dict(impl="rows", **kw)


def variants(interpret: bool) -> dict[str, dict]:
    """name -> ``sparse_input_gemv`` keyword arguments (``family`` decides the summary rows)."""
    if interpret:     # tiny tiles: every family once, for the smoke run
        return dict([("masked bk16 bn64", dict(impl="masked", bk=16, bn=64)),
                     ("masked bk16 bn64 4 steps partials", dict(impl="masked", bk=16, bn=64, steps=4,
                                                                partials=True)),
                     ("gather bc16 splits2", dict(impl="gather", bc=16, bn=64, splits=2)),
                     _rows(bc=8, span=64, col_splits=4),
                     _rows(bc=8, span=32, programs=2, col_splits=2, partials=False),
                     _rows(bc=8, programs=3, col_splits=4, compact="xla"),
                     _rows(bc=8, span=32, col_splits=4, sum_in_kernel=True)])
    v = {"masked bk128 bn128 w4": dict(impl="masked", bk=128, bn=128, num_warps=4),
         "masked bk64 bn256 w4": dict(impl="masked", bk=64, bn=256, num_warps=4),
         "masked bk64 bn256 4 steps partials": dict(impl="masked", bk=64, bn=256, steps=4,
                                                    partials=True, num_warps=4),
         "gather bc32 splits32": dict(impl="gather", bc=32, bn=256, splits=32)}
    # The rows path: the default first, then one knob at a time around it, then a few
    # joint moves. Programs launched = (N / bn strips) x (row groups); the partial sums
    # are (row groups, B, N) f32, written once and read once by XLA's sum.
    grid = [dict(),                                              # bc32 span256 -> 32 groups x 16 strips
            dict(bc=16), dict(bc=64, num_warps=8),               # rows per chunk
            dict(col_splits=8, num_warps=8), dict(col_splits=32),  # strip width 1024 / 256
            dict(bc=16, col_splits=32, num_warps=2),
            dict(span=128), dict(span=512),                      # compaction range: 64 / 16 groups
            dict(programs=16), dict(span=128, programs=16),      # groups looping over 2 / 4 ranges
            dict(num_warps=8), dict(num_stages=1),               # stages: loads pipelined across
            dict(num_stages=3), dict(bc=16, num_stages=3),       # chunks, where Triton does it
            dict(partials=False),                                # atomics into a zeroed output
            dict(sum_in_kernel=True),                            # last program per strip sums: 1 launch
            dict(span=512, col_splits=32, sum_in_kernel=True),
            dict(bc=64, span=512, col_splits=32, num_warps=8), dict(span=512, col_splits=32),
            dict(bc=16, span=128, col_splits=8, num_warps=4),
            dict(compact="xla", programs=32),                    # XLA's list, chunks round-robin
            dict(compact="xla", programs=132, col_splits=8),
            dict(compact="xla", bc=16, programs=66),
            dict(compact="xla", programs=66, sum_in_kernel=True)]
    v.update(_rows(**kw) for kw in grid)
    return v


def family(kw: dict) -> str:
    if kw["impl"] == "rows":
        return "rows (XLA list)" if kw.get("compact") == "xla" else "rows (in-kernel compaction)"
    return kw["impl"]


def make_x(b: Bench, batch: int, k: int, zero: float):
    """``(batch, k)`` normal inputs (never zero) with a random ``zero`` fraction of columns zeroed."""
    x = _normal(b.fresh(), (batch, k))
    dead = jax.random.uniform(b.fresh(), (1, k)) < zero
    return jnp.where(dead, jnp.zeros((), x.dtype), x)


def time_compaction(b: Bench, xs, k: int, rows_out: list):
    """The XLA live-row list alone (what ``compact="xla"`` and ``gather`` add before their kernel)."""
    name = "XLA live-row list alone (cumsum + scatter)"
    if b.over_budget():
        b.log(f"  {name}: skipped (time budget)")
        return
    fn = jax.jit(lambda xs: [sig.live_row_list(sig.live_rows(x), k) for x in xs])
    idx, count = fn(xs)[0]
    want = np.nonzero(np.asarray(sig.live_rows(xs[0])))[0]
    ok = int(count) == want.size and np.array_equal(np.asarray(idx)[:want.size], want)
    if not ok:
        b.log(f"  {name}: FAILED check")
        return
    us = b.time_us(fn, xs) / len(xs)
    b.log(f"  {name}: {us:.1f} us")
    rows_out.append(us)


def sweep_case(b: Bench, ws, fns, kws, batch: int, zero: float, skipped: list):
    k, n = ws[0].shape
    xs = [make_x(b, batch, k, zero) for _ in ws]
    ref = sig.sparse_input_gemv_reference(xs[0], ws[0], out_dtype=jnp.float32)
    case = f"{k}x{n}, batch {batch}, {zero:.0%} zero"
    live = int(np.asarray(sig.live_rows(xs[0])).sum())
    live_bytes = live * n * ws[0].dtype.itemsize
    gbs = lambda t: f"{live_bytes / (t * 1e3):.0f}" if t == t and t > 0 else "-"   # live bytes / time
    b.log(f"-- {case} (live rows {live} of {k}: {live_bytes / 1e6:.1f} MB of W needed)")
    dense = _over_layers(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
    per = len(ws)
    _, _, t_dense = b.check_and_time("xla dense", dense, (xs, ws), ref, TOL, per)
    dev_dense = b.device_us("xla dense", dense, (xs, ws), per)
    if batch == 1:
        pad2 = _over_layers(lambda x, w: jnp.dot(_pad_row(x), w, preferred_element_type=jnp.float32)[:1]
                            .astype(x.dtype))
        _, _, t = b.check_and_time("xla dense, batch padded to 2 rows", pad2, (xs, ws), ref, TOL, per)
        b.detail.append(f"| {case} | xla dense, batch padded to 2 rows | {t_dense:.1f} | {t:.1f} | "
                        f"{t_dense / t:.2f} | - |")
    compaction = []
    time_compaction(b, xs, k, compaction)
    if compaction:
        b.detail.append(f"| {case} | XLA live-row list alone | - | {compaction[0]:.1f} | - | - |")
    best, best_dev = {}, (None, float("nan"))
    for name, fn in fns.items():
        if b.over_budget():
            skipped.append(f"{case}: {name}")
        _, ok, t = b.check_and_time(name, fn, (xs, ws), ref, TOL, per)
        status = "" if ok or b.over_budget() else " (FAILED or error)"
        b.detail.append(f"| {case} | {name}{status} | {t_dense:.1f} | {t:.1f} | {t_dense / t:.2f} | "
                        f"{gbs(t)} |")
        dev = b.device_us(name, fn, (xs, ws), per) if ok else float("nan")
        if dev == dev:
            b.detail.append(f"| {case}, device time | {name} | {dev_dense:.1f} | {dev:.1f} | "
                            f"{dev_dense / dev:.2f} | {gbs(dev)} |")
            if not (dev >= best_dev[1]):
                best_dev = (name, dev)
        fam = family(kws[name])
        if ok and not (t >= best.get(fam, (None, float("inf")))[1]):
            best[fam] = (name, t)
    goal = GOALS.get(zero) if batch == 1 else None
    overall = min(best.values(), key=lambda nt: nt[1]) if best else (None, float("nan"))
    b.summary.append(("best of all", case, overall[0], t_dense, overall[1], goal))
    if best_dev[0] is not None:
        b.summary.append(("best of all, device time", case, best_dev[0], dev_dense, best_dev[1], goal))
    for fam in ("masked", "gather", "rows (in-kernel compaction)", "rows (XLA list)"):
        name, t = best.get(fam, (None, float("nan")))
        b.summary.append((fam, case, name, t_dense, t, None))


ODD_SHAPES = ((3, 1000, 700, 0.3), (1, 9216, 2304, 0.0))     # (batch, K, N, threshold)


def check_odd_shapes(b: Bench, interpret: bool) -> list[str]:
    """The rows path on shapes no tile divides and on a Gemma-width down projection, with a
    threshold: correctness only (the device's compiled kernels, not interpret mode)."""
    configs = {"rows default (partials)": dict(impl="rows"),
               "rows summed in kernel": dict(impl="rows", sum_in_kernel=True),
               "rows atomics": dict(impl="rows", partials=False),
               "rows xla-list": dict(impl="rows", compact="xla")}
    if interpret:
        configs = {k: dict(v, span=64, bc=8) for k, v in configs.items()}
    lines = []
    for batch, k, n, thr in (ODD_SHAPES[:1] if interpret else ODD_SHAPES):
        x = _normal(b.fresh(), (batch, k))
        x = jnp.where(jax.random.uniform(b.fresh(), (batch, k)) < 0.7, jnp.zeros((), x.dtype), x)
        w = _normal(b.fresh(), (k, n), scale=k ** -0.5)
        ref = sig.sparse_input_gemv_reference(x, w, threshold=thr, out_dtype=jnp.float32)
        for name, kw in configs.items():
            try:
                err = rel_err(jax.jit(functools.partial(sig.sparse_input_gemv, threshold=thr,
                                                        interpret=interpret, **kw))(x, w), ref)
                verdict = "ok" if err < TOL else "FAILED"
                lines.append(f"| {batch}x{k} @ {k}x{n}, threshold {thr} | {name} | {err:.1e} | {verdict} |")
            except Exception as e:   # noqa: BLE001
                lines.append(f"| {batch}x{k} @ {k}x{n}, threshold {thr} | {name} | - | ERROR "
                             f"{type(e).__name__}: {str(e)[:120]} |")
            b.log("  odd shape " + lines[-1])
    return lines


CROSS_CHECK = ((2304, 2304), (2304, 9216), (9216, 2304), (8192, 8192))    # (K, N): TEAL's, and 8192²


def cross_check_path_choice(b: Bench, interpret: bool) -> list[str]:
    """The same kernel and XLA GEMV timed two ways, per weight, at 50% zeros, batch 1: as the
    lowering's path choice times them (``choose_streaming``: one jit over enough weight
    copies to pass the L2) and as this sweep does (one jit over ``layers`` weight sets).
    The two should agree; a lowered TEAL step's site measurements once read ~10x slower."""
    from sparsejax.kernels import path_choice, streaming_choice

    lines = []
    for k, n in ((CROSS_CHECK[0],) if interpret else CROSS_CHECK):
        if interpret:
            k, n = 64, 64
        x = _normal(b.fresh(), (1, k))
        x = jnp.where(jax.random.uniform(b.fresh(), (1, k)) < 0.5, jnp.zeros((), x.dtype), x)
        kernel = functools.partial(sig.sparse_input_gemv, impl="masked", bk=64 if not interpret else 16,
                                   bn=256 if not interpret else 64, interpret=interpret)
        dense = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
        cands = [path_choice.Candidate("kernel", kernel), path_choice.Candidate("xla_dense", dense)]
        t0 = time.time()
        with path_choice.mode("auto"):
            path_choice.clear_cache()
            choice = streaming_choice.choose_streaming(
                "sweep_cross_check", f"K{k}|N{n}", cands, [x, jax.ShapeDtypeStruct((k, n), x.dtype)],
                weight_args=(1,), baseline="xla_dense", check=True)
        seconds = time.time() - t0
        ws = [_normal(b.fresh(), (k, n), scale=k ** -0.5) for _ in range(b.s.layers)]
        xs = [x] * b.s.layers
        sweep = {name: b.time_us(_over_layers(fn), xs, ws) / b.s.layers
                 for name, fn in (("kernel", kernel), ("xla_dense", dense))}
        t = choice.times_us
        lines.append(f"| {k}x{n} | {t.get('kernel', float('nan')):.1f} | {t.get('xla_dense', float('nan')):.1f} | "
                     f"{sweep['kernel']:.1f} | {sweep['xla_dense']:.1f} | {seconds:.1f} |")
        b.log("  cross-check " + lines[-1])
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, Pallas interpret mode (CPU)")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds before variants are skipped")
    parser.add_argument("--batches", default="1,2,4,8",
                        help="batch 1 at 50/75/90/100%% zeros, the others at 50%%")
    args = parser.parse_args()
    interpret = args.smoke or jax.default_backend() != "gpu"
    sizes = SMOKE if args.smoke else FULL          # W is gemv x gemv: 256 / 8192
    b = Bench(sizes, interpret, args.budget)
    dev = jax.devices()[0]
    b.log(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"interpret={interpret}")
    n = sizes.gemv
    ws = [_normal(b.fresh(), (n, n), scale=n ** -0.5) for _ in range(sizes.layers)]
    kws = variants(interpret)
    skipped: list[str] = []
    b.log("== rows path on odd shapes (independent random zeros per token, 70%)")
    odd = check_odd_shapes(b, interpret)
    b.log("== path-choice timing vs this sweep's, 50% zeros, batch 1 (µs per weight)")
    try:
        cross = cross_check_path_choice(b, interpret)
    except Exception as e:   # noqa: BLE001
        cross = [f"| failed: {type(e).__name__}: {str(e)[:200]} | | | | | |"]
        b.log_lines.append(traceback.format_exc()[-3000:])
    for batch in [int(s) for s in args.batches.split(",")]:
        b.log(f"== sparse-input GEMV {n}x{n} bf16, batch {batch}")
        try:
            # One jit per variant and batch, reused across zero fractions (same shapes).
            fns = {name: _over_layers(functools.partial(sig.sparse_input_gemv, interpret=interpret, **kw))
                   for name, kw in kws.items()}
            for zero in ((0.5, 0.75, 0.9, 1.0) if batch == 1 else (0.5,)):
                sweep_case(b, ws, fns, kws, batch, zero, skipped)
        except Exception as e:   # noqa: BLE001  (a broken case must not hide the others)
            b.log(f"batch {batch} failed: {type(e).__name__}: {str(e)[:400]}")
            b.log_lines.append(traceback.format_exc()[-3000:])
    table = summary_table(b, "variant")
    command = "python " + " ".join(["benchmarks/sparse_input_sweep.py", *sys.argv[1:]])
    md = ["# Sparse-input GEMV sweep: masked, gather and rows variants vs XLA dense", "",
          f"Command: `{command}`", "",
          f"Device: {dev.device_kind}; JAX {jax.__version__}; bf16; interpret mode: {interpret}. Each time "
          f"is a median over {sizes.repeats} repeats of {sizes.calls} back-to-back calls of one jit running "
          f"{sizes.layers} weight sets, per weight set; dense XLA in the same run. Elapsed "
          f"{time.time() - b.t0:.0f} s.", "", *table, "",
          "## The rows path on odd shapes (correctness)", "", "| case | variant | rel err | check |",
          "|---|---|---|---|", *odd, "",
          "## The path choice's timing against this sweep's (µs per weight, 50% zeros, batch 1)", "",
          "| K x N | path choice: kernel | path choice: XLA | sweep: kernel | sweep: XLA | choice took s |",
          "|---|---|---|---|---|---|", *cross, "",
          "## Every variant", "", "Live GB/s: the bytes of W the live rows need, over the time (the",
          "dense GEMV streams 3.2-3.85 TB/s on an H200; a sparse path near that is bandwidth-bound).", "",
          "| case | variant | dense us | us | x dense | live GB/s |", "|---|---|---|---|---|---|",
          *b.detail, "", f"## Skipped (time budget): {len(skipped)}", "", *[f"- {s}" for s in skipped], "",
          "## Log", "", "```", *b.log_lines, "```", ""]
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "sparse_input_sweep.md"), "w") as f:
            f.write("\n".join(md))
    if skipped:
        print(f"skipped (time budget): {len(skipped)} variant runs, listed in the report")
    print("\n".join(table))


if __name__ == "__main__":
    main()
