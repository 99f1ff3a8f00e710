"""Where a decode kernel's time goes: device kernel time against wall time, per launch.

    python benchmarks/decode_profile.py            # GPU
    python benchmarks/decode_profile.py --smoke    # tiny sizes, interpret mode: checks the script

At decode the sparse paths read a few MB, so a few µs of launch and gap decide their ratio to
dense. For each case (the sparse-input GEMV at 90% zeros, the Spark FFN layer at batch 1, the
2:4 GEMV, each beside XLA's dense product) this times one jit over ``layers`` weight sets the
way ``decode_speed.py`` does (wall µs per weight set), then traces the same calls with
``jax.profiler`` and prints the device kernels' µs and launches per weight set. Wall minus
kernel time is what launches and gaps cost; a kernel list shows which launches a fused
design would remove. The host's time to enqueue a call is printed beside: where it
reaches the wall time, the timing is bound by dispatch (``--layers``: more weight sets per
call). Prints the table last; writes $OUT/decode_profile.md when $OUT is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.append(str(pathlib.Path(__file__).resolve().parent))
from decode_speed import (FULL, K_FRAC, ROWS_DOWN, SMOKE,  # noqa: E402
                          _dense_gated, _normal, _over_layers, decode_step, lm_params, spark_recipe)
from step_profile import summarise, top_line, trace  # noqa: E402
from timing import enqueue_seconds, median_seconds, rel_err  # noqa: E402

from sparsejax.kernels import device_timing  # noqa: E402
from sparsejax.kernels import nm_compressed as nm  # noqa: E402
from sparsejax.kernels import spark_ffn as sf  # noqa: E402
from sparsejax.kernels import sparse_input_gemv as sig  # noqa: E402
from sparsejax import sparsify  # noqa: E402
from sparsejax.masks import nm_mask  # noqa: E402


def cases(s, interpret, key):
    """``(section, name, jitted fn, args, reference of its first output, calls it stands for)``."""
    keys = iter(jax.random.split(key, 16 * s.layers + 16))
    out = []
    n = s.gemv
    ws = [_normal(next(keys), (n, n), scale=n ** -0.5) for _ in range(s.layers)]
    dense = _over_layers(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
    rows = dict(impl="rows") if interpret else dict(impl="rows", bc=16, span=128, col_splits=8, num_warps=4)
    masked = dict(impl="masked", bk=16, bn=64) if interpret else dict(impl="masked", bk=64, bn=256, num_warps=4)
    rows_fn = _over_layers(functools.partial(sig.sparse_input_gemv, interpret=interpret, **rows))
    masked_fn = _over_layers(functools.partial(sig.sparse_input_gemv, interpret=interpret, **masked))
    for zero in (0.5, 0.75, 0.9):
        xs = []
        for _ in range(s.layers):
            x = _normal(next(keys), (1, n))
            xs.append(jnp.where(jax.random.uniform(next(keys), (1, n)) < zero, 0, x).astype(jnp.bfloat16))
        ref = sig.sparse_input_gemv_reference(xs[0], ws[0], out_dtype=jnp.bfloat16)
        section = f"gemv {zero:.0%} zero"
        out.append((section, "xla dense", dense, (xs, ws), ref, s.layers))
        out.append((section, "rows", rows_fn, (xs, ws), ref, s.layers))
        out.append((section, "masked", masked_fn, (xs, ws), ref, s.layers))

    d, d_ff, r = s.d_model, s.d_ff_layer, s.predictor
    spark = [sf.decode_weights_from_spark(_normal(next(keys), (d, d_ff), scale=d ** -0.5),
                                          _normal(next(keys), (d_ff, d), scale=d_ff ** -0.5), r)
             for _ in range(s.layers)]
    dense_w = [tuple(_normal(next(keys), sh, scale=sh[0] ** -0.5) for sh in ((d, d_ff), (d, d_ff), (d_ff, d)))
               for _ in range(s.layers)]
    xs = [_normal(next(keys), (1, d)) for _ in range(s.layers)]
    ref = sf.topk_ffn_decode_reference(xs[0].astype(jnp.float32),
                                       jax.tree.map(lambda a: a.astype(jnp.float32), spark[0]), k_frac=K_FRAC)
    ref_dense = _dense_gated(xs[0].astype(jnp.float32), jax.tree.map(lambda a: a.astype(jnp.float32), dense_w[0]))
    out.append(("Spark FFN b1", "dense gated FFN", _over_layers(_dense_gated), (xs, dense_w), ref_dense, s.layers))
    rows_pad2 = (dict(bj=16, bk=32, bn=32, gate_pad2=True) if interpret else
                 dict(bj=32, bk=256, down_tiles=ROWS_DOWN, gate_pad2=True))
    out.append(("Spark FFN b1", "sparse, rows down, padded-row gate", _over_layers(functools.partial(
        sf.topk_ffn_decode, k_frac=K_FRAC, impl="sparse", interpret=interpret, **rows_pad2)), (xs, spark), ref,
        s.layers))
    out.append(("Spark FFN b1", "sparse, rows down, padded-row gate, select kernel", _over_layers(
        functools.partial(sf.topk_ffn_decode, k_frac=K_FRAC, impl="sparse", interpret=interpret,
                          select_kernel=True, **rows_pad2)), (xs, spark), ref, s.layers))
    out.append(("Spark FFN b1", "auto", _over_layers(functools.partial(
        sf.topk_ffn_decode, k_frac=K_FRAC, impl="auto", interpret=interpret)), (xs, spark), ref, s.layers))
    out.append(("Spark FFN b1", "selection only (XLA)", _over_layers(
        lambda x, w: sf.select_neurons(jnp.dot(w.gate_input(x), w.w_gate, preferred_element_type=jnp.float32),
                                       k_frac=K_FRAC, capacity=d_ff)[0]), (xs, spark), None, s.layers))

    # Batch 8: the union of fired neurons is about half of them; where the sparse paths' time
    # goes there (CUDA-core kernels reduce one product row per token; mma: the tensor cores).
    xs8 = [_normal(next(keys), (8, d)) for _ in range(s.layers)]
    ref8 = sf.topk_ffn_decode_reference(xs8[0].astype(jnp.float32),
                                        jax.tree.map(lambda a: a.astype(jnp.float32), spark[0]), k_frac=K_FRAC)
    ref8_dense = _dense_gated(xs8[0].astype(jnp.float32),
                              jax.tree.map(lambda a: a.astype(jnp.float32), dense_w[0]))
    out.append(("Spark FFN b8", "dense gated FFN", _over_layers(_dense_gated), (xs8, dense_w), ref8_dense,
                s.layers))
    tiles8 = dict(bj=16, bk=32, bn=32) if interpret else dict(bj=32, bk=256)
    mma_down = {} if interpret else sf.CHOICE_PATHS["sparse_mma_select"][1]["down_tiles"]
    for name, kw in (("sparse, select kernel", dict(select_kernel=True)),
                     ("sparse, select kernel, mma (choose_impl's sparse_mma_select)", dict(
                         select_kernel=True, mma=True, down_tiles=mma_down)),
                     ("sparse, select kernel, mma up, CUDA-core down", dict(
                         select_kernel=True, mma=True, down_tiles=dict(mma=False)))):
        out.append(("Spark FFN b8", name, _over_layers(functools.partial(
            sf.topk_ffn_decode, k_frac=K_FRAC, impl="sparse", interpret=interpret, **tiles8, **kw)),
            (xs8, spark), ref8, s.layers))

    ws = [_normal(next(keys), (n, n), scale=n ** -0.5) for _ in range(s.layers)]
    packed = [nm.compress_nm(w, 2, 4, nm_mask(w, 2, 4)) for w in ws]
    xs = [_normal(next(keys), (1, n)) for _ in range(s.layers)]
    ref = nm.nm_matmul_reference(xs[0], packed[0])
    out.append(("2:4 GEMV", "xla dense (masked weight)", dense, (xs, [p.to_dense() for p in packed]), ref, s.layers))
    # nm_matmul with its table's batch-1 launch: kernel µs per launch against wall µs shows
    # what XLA launches beside the kernel cost.
    out.append(("2:4 GEMV", "nm kernel", _over_layers(functools.partial(nm.nm_matmul, interpret=interpret)),
                (xs, packed), ref, s.layers))

    # The end-to-end decode step of decode_speed.py at batch 1: dense, and Spark top-k on the
    # FFNs and attention through sparsify + lower (one step per call).
    params = lm_params(next(keys), s)
    hd = s.d_model // s.heads
    shape = (s.lm_layers, 1, s.cache, s.heads, hd)
    args = (jax.random.randint(next(keys), (1,), 0, s.vocab), _normal(next(keys), shape),
            _normal(next(keys), shape))
    step = functools.partial(decode_step, heads=s.heads)
    sfn = sparsify(step, spark_recipe(s))
    big = (jax.random.randint(next(keys), (2,), 0, s.vocab), _normal(next(keys), shape[:1] + (2,) + shape[2:]),
           _normal(next(keys), shape[:1] + (2,) + shape[2:]))
    _, sstate = sfn.init(params, *big)
    low = sfn.lower(sstate, interpret=interpret)
    ref = jax.jit(lambda p, *a: sfn(p, sstate, *a))(params, *args)[0]
    dense_ref = jax.jit(step)(params, *args)[0]
    out.append(("e2e decode b1", "dense step", jax.jit(step), (params, *args), dense_ref, 1))
    # The dense model on the GEMV paths the Spark step's unruled sites have (lower(dense_gemv=True)):
    # the kernels the Spark step adds or removes beside its fair dense baseline.
    dsfn = sparsify(step, [])
    _, dstate = dsfn.init(params, *big)
    dlow = dsfn.lower(dstate, interpret=interpret, dense_gemv=True)
    out.append(("e2e decode b1", "dense step, lowered (dense_gemv=True)",
                jax.jit(lambda p, *a: dlow(p, dstate, *a)), (params, *args), dense_ref, 1))
    out.append(("e2e decode b1", "Spark lowered step", jax.jit(lambda p, *a: low(p, sstate, *a)),
                (params, *args), ref, 1))

    # Batch 2, where the Spark step ran below dense in session 10 with no kernel kept: the
    # Spark rules' own top-k launches against what the sparse GEMVs save.
    shape2 = shape[:1] + (2,) + shape[2:]
    args2 = (jax.random.randint(next(keys), (2,), 0, s.vocab), _normal(next(keys), shape2),
             _normal(next(keys), shape2))
    out.append(("e2e decode b2", "dense step", jax.jit(step), (params, *args2),
                jax.jit(step)(params, *args2)[0], 1))
    out.append(("e2e decode b2", "Spark step, not lowered (XLA)", jax.jit(lambda p, *a: sfn(p, sstate, *a)),
                (params, *args2), jax.jit(lambda p, *a: sfn(p, sstate, *a))(params, *args2)[0], 1))
    out.append(("e2e decode b2", "Spark lowered step", jax.jit(lambda p, *a: low(p, sstate, *a)),
                (params, *args2), jax.jit(lambda p, *a: sfn(p, sstate, *a))(params, *args2)[0], 1))
    return out


def timeline(fn, args, calls: int = 3) -> list[str]:
    """Every device event of ``calls`` back-to-back calls, in start order: the stream (line),
    the kernel, its start, duration and the idle gap before it on the device, in µs. Where
    wall time exceeds kernel time, this shows between which kernels the device waits."""
    data = device_timing.profile_calls(lambda: fn(*args), calls)
    if data is None:
        return ["(no trace)"]
    events = [(e.start_ns, e.duration_ns, line.name, e.name)
              for plane in data.planes if plane.name.startswith("/device:GPU")
              for line in plane.lines for e in line.events]
    events.sort()
    lines, end = [], None
    t0 = events[0][0] if events else 0
    for start, dur, line, name in events:
        gap = (start - end) / 1e3 if end is not None else 0.0
        lines.append(f"{(start - t0) / 1e3:9.1f} {dur / 1e3:7.1f} gap {gap:6.1f}  [{line[:24]}] {name[:60]}")
        end = max(end or 0, start + dur)
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--steps", type=int, default=5, help="calls traced per case")
    parser.add_argument("--timeline", default="",
                        help="comma-separated paths (e.g. rows,masked) whose device timeline to print")
    parser.add_argument("--only", default="", help="comma-separated sections to run (default: all)")
    parser.add_argument("--layers", type=int, default=0,
                        help="weight sets per timed jit (default: decode_speed's)")
    args = parser.parse_args()
    interpret = args.smoke or jax.default_backend() != "gpu"
    s = SMOKE if interpret else FULL
    if args.layers:
        s = dataclasses.replace(s, layers=args.layers)
    head = f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, interpret={interpret}"
    print(head, flush=True)
    rows, details = [], []
    want = [w for w in args.timeline.split(",") if w]
    only = [w for w in args.only.split(",") if w]
    for section, name, fn, fargs, ref, per in cases(s, interpret, jax.random.key(0)):
        if only and not any(section.startswith(o) for o in only):
            continue
        try:
            if name in want or (want == ["all"]):
                details.append(f"-- timeline: {section}: {name} (start µs, duration µs, idle gap before)")
                details += ["    " + line for line in timeline(fn, fargs)[:200]]
            y = fn(*fargs)[0]
            err = rel_err(y, ref) if ref is not None else float("nan")
            wall = 1e6 * median_seconds(fn, *fargs, calls=s.calls, repeats=s.repeats, warmup=2) / per
            host = 1e6 * enqueue_seconds(fn, *fargs, calls=s.calls, repeats=s.repeats) / per
            prof = summarise(trace(lambda: fn(*fargs), args.steps), top=10)
            kern = prof["total_us"] / per
            launches = prof["launches"] / per
            rows.append(f"| {section} | {name} | {wall:.1f} | {kern:.1f} | {wall - kern:.1f} | {host:.1f} | "
                        f"{launches:.1f} | {err:.1e} |")
            details.append(f"-- {section}: {name} (per call: {per} weight sets)")
            details += ["    " + top_line(e) for e in prof["top"]]
            print(rows[-1], flush=True)
        except Exception as e:  # noqa: BLE001  (one failing case must not hide the others)
            rows.append(f"| {section} | {name} | ERROR {type(e).__name__}: {str(e)[:160]} | | | | | |")
            print(rows[-1], flush=True)
    table = ["| case | path | wall µs | kernel µs | wall − kernel | host enqueue µs | launches | rel err |",
             "|---|---|---|---|---|---|---|---|"] + rows
    text = "\n".join([head, "", "Kernels per call (µs and launches per call of all weight sets):", "```",
                      *details, "```", "", "Per weight set:", "", *table])
    print(text)
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], "decode_profile.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
