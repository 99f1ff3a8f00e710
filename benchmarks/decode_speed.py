"""Decode speed from activation sparsity and compressed weights (issue 16), on one GPU.

    PYTHONUNBUFFERED=1 python benchmarks/decode_speed.py            # H200: < 4 minutes
    PYTHONUNBUFFERED=1 python benchmarks/decode_speed.py --smoke    # CPU, interpret mode, tiny sizes

Every variant is first checked against its reference on fresh random inputs on
the device (relative Frobenius error; a failing variant is reported and never
timed), then timed. Timing: each measured function is one ``jax.jit`` that runs
the operation over ``LAYERS`` different weight sets (together far more than the
60 MB L2), called back to back (``timing.median_seconds``: median over repeats
of the mean of several calls after warm-up), divided by ``LAYERS``. Dense XLA
is timed the same way in the same run. No CUDA graphs: launch gaps inside one
jit are what a real decode step pays. The GEMV sections also give each function's
device time (``Bench.device_us``: its kernels' durations from the profiler plus
0.4 µs per launch), the time a CUDA graph of it would approach; those rows say so.

Sections (``--only`` picks some):

* ``gemv``: sparse-input GEMV 8192x8192, batch 1, 50/75/90% zero inputs, vs
  XLA's dense GEMV (goals >= 1.8x / 3x / 6x).
* ``ffn``: Spark FFN decode layer (d_model 2304, d_ff 13824, r = 1024, k = 8%),
  batch 1/2/4/8, vs the dense gated FFN of the same d_ff (goals >= 3x at batch 1,
  >= 1.5x at batch 8); the union of fired neurons per batch (the curve that
  decides sparse vs dense per batch).
* ``nm``: compressed 2:4 (1:4, 2:8) GEMV 8192x8192 vs dense (goal 2:4 batch 1 >= 1.5x).
* ``e2e``: a Gemma-2-2B-width gated LM decode step (d_model 2304, d_ff 9216,
  8 heads, 4 layers, KV cache 1024, byte vocabulary) through ``sparsify`` with
  ``SparkTopK`` on FFN and attention, ``lower``-ed, vs the dense model: tokens/s
  at batch 1/2/4/8 (goal >= 1.5x at batch 1).

Prints the summary table last; writes the full report to ``$OUT/decode_speed.md``
(or benchmarks/results/decode_speed_smoke.md with ``--smoke``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import sparsify
from sparsejax.kernels import device_timing
from sparsejax.kernels import nm_compressed as nm
from sparsejax.kernels import path_choice
from sparsejax.kernels import spark_ffn as sf
from sparsejax.kernels import sparse_input_gemv as sig
from sparsejax.kernels import tile_tables
from sparsejax.masks import nm_mask
from sparsejax.rules import SparkTopK
from timing import interleaved_seconds, median_seconds, rel_err


@dataclasses.dataclass(frozen=True)
class Sizes:
    gemv: int = 8192
    d_model: int = 2304
    d_ff_layer: int = 13824
    predictor: int = 1024
    d_ff_lm: int = 9216
    heads: int = 8
    lm_layers: int = 4
    cache: int = 1024
    vocab: int = 256
    layers: int = 4             # weight sets per timed jit
    calls: int = 10
    repeats: int = 9


FULL = Sizes()
SMOKE = Sizes(gemv=256, d_model=64, d_ff_layer=256, predictor=32, d_ff_lm=192, heads=2, lm_layers=2,
              cache=32, vocab=32, layers=2, calls=1, repeats=1)
K_FRAC = 0.08
TUNE = False    # --tune: the e2e section also times the program-tuned step
ATTENTION_TOPK = "auto"   # --attention_topk: the attention rule's impl ("auto": its kernel on a GPU)
BATCHES = (1, 2, 4, 8)
FFN_VARIANTS = ()   # --ffn_variants: time only the ffn variants whose names contain one of these
GOALS = {"gemv": {0.5: 1.8, 0.75: 3.0, 0.9: 6.0}, "ffn": {1: 3.0, 8: 1.5}, "nm": {1: 1.5},
         "e2e": {1: 1.5}}


class Bench:
    """Checks, times and records; keeps to a wall-clock budget."""

    def __init__(self, sizes: Sizes, interpret: bool, budget_s: float):
        self.s, self.interpret, self.budget = sizes, interpret, budget_s
        self.t0 = time.time()
        self.deadline = self.t0 + budget_s
        self.log_lines: list[str] = []
        self.summary: list[tuple] = []      # (section, case, best variant, ms dense, ms best, ratio, goal)
        self.detail: list[str] = []
        self.key = jax.random.key(int(time.time()) % 100000)
        self.n_keys = 0

    def log(self, s):
        print(s, flush=True)
        self.log_lines.append(s)

    def fresh(self):
        self.n_keys += 1
        return jax.random.fold_in(self.key, self.n_keys)

    def over_budget(self) -> bool:
        return time.time() > self.deadline

    def start_section(self, share: float):
        """This section may run until ``share`` of the budget past now (never past the end)."""
        self.deadline = min(self.t0 + self.budget, time.time() + share * self.budget)

    def time_us(self, fn, *args) -> float:
        return 1e6 * median_seconds(fn, *args, calls=self.s.calls, repeats=self.s.repeats, warmup=2)

    def device_us(self, name, fn, args, per=1) -> float:
        """µs of device time per layer of ``fn(*args)``: its kernels' durations from the profiler
        plus ``device_timing.LAUNCH_GAP_S`` per launch (what a CUDA graph of the call would take;
        the host's enqueueing left out). NaN where no trace can be taken (interpret mode: the
        CPU's ops are not the kernels')."""
        if self.interpret or self.over_budget():
            return float("nan")
        t = device_timing.device_seconds(fn, *args, calls=self.s.calls)
        if t is None:
            return float("nan")
        us = 1e6 * t.seconds / per
        self.log(f"  {name}, device time: {us:.1f} us ({1e6 * t.kernel_s / per:.1f} us in "
                 f"{t.launches / per:.1f} kernels a layer)")
        return us

    def check_and_time(self, name, fn, args, ref, tol, per=1):
        """(rel err, ok, µs per layer) of a jitted ``fn(*args)``; checked against ``ref`` first."""
        if self.over_budget():
            self.log(f"  {name}: skipped (time budget)")
            return float("nan"), False, float("nan")
        try:
            out = fn(*args)
            err = rel_err(out[0] if isinstance(out, (tuple, list)) else out, ref)
            ok = bool(np.isfinite(err) and err < tol)
            if not ok:
                self.log(f"  {name}: FAILED check, rel err {err:.2e}")
                return err, False, float("nan")
            us = self.time_us(fn, *args) / per
            self.log(f"  {name}: {us:.1f} us, rel err {err:.1e}")
            return err, ok, us
        except Exception as e:   # noqa: BLE001  (one failing variant must not hide the others)
            self.log(f"  {name}: ERROR {type(e).__name__}: {str(e)[:300]}")
            self.log_lines.append(traceback.format_exc()[-2000:])
            return float("nan"), False, float("nan")


def _normal(key, shape, dtype=jnp.bfloat16, scale=1.0):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


def _pad_row(x):
    """One token as two rows (XLA's batch-2 GEMM path); the barrier keeps the padding."""
    return jax.lax.optimization_barrier(jnp.pad(x, ((0, 1), (0, 0))))


def _over_layers(op, chain: bool = True):
    """One jit running ``op(x_i, w_i)`` for every weight set: the timed unit.

    ``chain``: layer ``i`` waits for layer ``i - 1``, as in a decode loop: its input is
    ``x_i + 0 * y_{i-1}[..., :1]`` (the zero keeps ``x_i``'s values, and with them its zeros
    and the neurons it fires). Independent layers let the GPU overlap one layer's kernels with
    another's (a CUDA graph runs independent nodes concurrently), which hides the latency of
    small launches and which a model's chain of layers never allows."""
    def run(xs, ws):
        outs = []
        for x, w in zip(xs, ws):
            if chain and outs:
                x = x + (0 * outs[-1][..., :1]).astype(x.dtype)
            outs.append(op(x, w))
        return outs
    return jax.jit(run)


# --------------------------------------------------------------------------- sparse-input GEMV


def gemv_variants(interpret):
    if interpret:
        return {"masked": dict(impl="masked", bk=16, bn=64),
                "masked 4 steps partials": dict(impl="masked", bk=16, bn=64, steps=4, partials=True),
                "gather": dict(impl="gather", bc=16, bn=64, splits=2)}
    # The first H200 sweep's two best one-tile grids (bk128 bn128 at 50/75% zeros, bk64
    # bn256 at 90%) and gather; the rest lost clearly (mma 0.6x, xla_compact 0.4-0.8x,
    # bk16/bk32/w8 tiles). New: split-K loops (steps tiles per program) with partial
    # sums or atomics, unrolled (<= 4 steps) or pipelined (fori, 3 stages).
    v = {}
    for bk, bn in ((128, 128), (64, 256)):
        v[f"masked bk{bk} bn{bn} w4"] = dict(impl="masked", bk=bk, bn=bn, num_warps=4)
    for bk, bn, steps, partials, stages in ((64, 256, 4, True, 2), (64, 256, 4, False, 2),
                                            (128, 128, 4, True, 2), (64, 256, 8, True, 3),
                                            (32, 256, 16, True, 3)):
        v[f"masked bk{bk} bn{bn} {steps} steps {'partials' if partials else 'atomics'} s{stages}"] = dict(
            impl="masked", bk=bk, bn=bn, steps=steps, partials=partials, num_warps=4, num_stages=stages)
    v["gather bc32 splits32"] = dict(impl="gather", bc=32, bn=256, splits=32)
    return v


def bench_gemv(b: Bench):
    n = b.s.gemv
    b.log(f"== sparse-input GEMV {n}x{n}, batch 1, bf16")
    ws = [_normal(b.fresh(), (n, n), scale=n ** -0.5) for _ in range(b.s.layers)]
    # One jit per variant for all zero fractions: compiled once (same shapes).
    dense = _over_layers(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
    fns = {name: _over_layers(functools.partial(sig.sparse_input_gemv, interpret=b.interpret, **kw))
           for name, kw in gemv_variants(b.interpret).items()}
    for zero in (0.5, 0.75, 0.9):
        xs = []
        for _ in range(b.s.layers):
            x = _normal(b.fresh(), (1, n))
            xs.append(jnp.where(jax.random.uniform(b.fresh(), (1, n)) < zero, 0, x).astype(jnp.bfloat16))
        ref = sig.sparse_input_gemv_reference(xs[0], ws[0], out_dtype=jnp.float32)
        b.log(f"-- {zero:.0%} zero inputs")
        _, _, t_dense = b.check_and_time("xla dense", dense, (xs, ws), ref, 2e-2, b.s.layers)
        pad2 = _over_layers(lambda x, w: jnp.dot(_pad_row(x), w, preferred_element_type=jnp.float32)[:1]
                            .astype(x.dtype))
        dev_dense = b.device_us("xla dense", dense, (xs, ws), b.s.layers)
        best, best_dev = (None, float("nan")), (None, float("nan"))
        for name, fn in {"xla dense, batch padded to 2 rows": pad2, **fns}.items():
            _, ok, t = b.check_and_time(name, fn, (xs, ws), ref, 2e-2, b.s.layers)
            dev = b.device_us(name, fn, (xs, ws), b.s.layers) if ok else float("nan")
            if ok and not (t >= best[1]) and not name.startswith("xla dense"):
                best = (name, t)
            if dev == dev and not (dev >= best_dev[1]) and not name.startswith("xla dense"):
                best_dev = (name, dev)
            b.detail.append(f"| gemv | {zero:.0%} zero | {name} | {t_dense:.1f} | {t:.1f} | {t_dense / t:.2f} |")
            if dev == dev:
                b.detail.append(f"| gemv, device time | {zero:.0%} zero | {name} | {dev_dense:.1f} | {dev:.1f} | "
                                f"{dev_dense / dev:.2f} |")
        case = f"{n}², {zero:.0%} zero, batch 1"
        b.summary.append(("sparse-input GEMV", case, best[0], t_dense, best[1], GOALS["gemv"][zero]))
        if best_dev[0] is not None:
            b.summary.append(("sparse-input GEMV, device time", case, best_dev[0], dev_dense, best_dev[1],
                              GOALS["gemv"][zero]))


# --------------------------------------------------------------------------- Spark FFN layer


SPLIT_DOWN = dict(bk=64, bn=256, steps=4, partials=True)
GATE_KERNEL = dict(bk=64, bn=256, steps=4, partials=True)
ROWS_DOWN = dict(impl="rows", bc=16, span=128, col_splits=8, partials=True)


def ffn_variants(interpret, batch):
    if interpret:
        return {"fused": dict(impl="fused", bj=16, bk=32, bn=32),
                "fused, top-k in kernel": dict(impl="fused", bj=16, bk=32, bn=32, act_in_kernel=True),
                "sparse": dict(impl="sparse", bj=16, bk=32, bn=32),
                "sparse, split down, gate kernel": dict(
                    impl="sparse", bj=16, bk=32, bn=32, down_tiles=dict(bk=16, bn=32, steps=2, partials=True),
                    gate_tiles=dict(bk=16, bn=32, steps=2, partials=True)),
                "sparse, rows down, act in kernel": dict(
                    impl="sparse", bj=16, bk=32, bn=32, act_in_kernel=True,
                    down_tiles=dict(impl="rows", bc=8, span=32, col_splits=2)),
                "sparse, rows down, padded-row gate, select kernel": dict(
                    impl="sparse", bj=16, bk=32, bn=32, gate_pad2=True, select_kernel=True,
                    down_tiles=dict(impl="rows", bc=8, span=32, col_splits=2)),
                **({"sparse mma, select kernel": dict(impl="sparse", bj=16, bk=32, bn=32, mma=True,
                                                      select_kernel=True),
                    "sparse mma, select kernel, tokens padded once": dict(
                        impl="sparse", bj=16, bk=32, bn=32, mma=True, select_kernel=True, pad_batch=True),
                    "sparse mma, select kernel, down gather": dict(
                        impl="sparse", bj=16, bk=32, bn=32, mma=True, select_kernel=True,
                        down_tiles=dict(impl="gather", mma=True, bc=16, bn=32, splits=2))}
                   if batch > 1 else {}),
                "auto (choose_impl)": dict(impl="auto")}
    # The first H200 sweep at batch 1: sparse bj16/bj32 48 us, fused atomics 50.7 us,
    # fused bj64 bk128 w8 partials 53.3 us; the predictor GEMV alone 23 us (XLA). The
    # index-list paths (xla 79 us, pallas 74 us) and the other fused tilings lost.
    v = {"sparse bj32": dict(impl="sparse", bj=32, bk=256),
         "sparse bj32, split down": dict(impl="sparse", bj=32, bk=256, down_tiles=SPLIT_DOWN),
         "sparse bj32, split down, gate kernel": dict(impl="sparse", bj=32, bk=256, down_tiles=SPLIT_DOWN,
                                                      gate_tiles=GATE_KERNEL),
         "sparse bj32, rows down, gate kernel": dict(impl="sparse", bj=32, bk=256, down_tiles=ROWS_DOWN,
                                                     gate_tiles=GATE_KERNEL),
         "sparse bj32, rows down, padded-row gate": dict(impl="sparse", bj=32, bk=256, down_tiles=ROWS_DOWN,
                                                         gate_pad2=True),
         "sparse bj32, rows down, padded-row gate, act in kernel": dict(
             impl="sparse", bj=32, bk=256, down_tiles=ROWS_DOWN, gate_pad2=True, act_in_kernel=True),
         "sparse bj32, rows down, gate kernel, act in kernel": dict(
             impl="sparse", bj=32, bk=256, down_tiles=ROWS_DOWN, gate_tiles=GATE_KERNEL, act_in_kernel=True),
         "fused bj32 bk256 bn256 w4 atomics": dict(impl="fused", bj=32, bk=256, bn=256, num_warps=4,
                                                   partials=False),
         "fused bj32 bk256 bn256 w4 atomics, gate kernel": dict(impl="fused", bj=32, bk=256, bn=256,
                                                                num_warps=4, partials=False,
                                                                gate_tiles=GATE_KERNEL),
         "fused bj64 bk128 bn256 w8 partials": dict(impl="fused", bj=64, bk=128, bn=256, num_warps=8,
                                                    partials=True),
         "dense (same function, XLA)": dict(impl="dense"),
         "auto (choose_impl)": dict(impl="auto")}
    # The soft top-k and activation in one kernel (session 9: XLA's two reductions and two
    # elementwise fusions were 5.4 of the layer's 29.5 µs of kernels at batch 1).
    select = dict(impl="sparse", bj=32, bk=256, gate_pad2=True, select_kernel=True)
    v["sparse bj32, rows down, padded-row gate, select kernel"] = dict(select, down_tiles=ROWS_DOWN)
    if batch > 1:
        # Session 10: at batch 4 and 8 every CUDA-core path lost to dense (77.8 / 181.2 against
        # 45.8 / 50.3 µs): each reduces one product row per token. The tensor cores take the
        # batch as one (16, bk) operand (mma=True), in the up kernel and the down kernel.
        mma = dict(impl="sparse", select_kernel=True, mma=True)
        # the shipped down tiles (choose_impl's sparse_mma_select): 8 row tiles per program
        # into partial sums, 3 stages
        down = dict(sf.CHOICE_PATHS["sparse_mma_select"][1]["down_tiles"])
        # First sweep: one-tile down programs 68.1-71.4 / 72.1-74.3 µs (bj32/64, bk128/256).
        # The first profile at batch 8 (per layer): the down kernel's one-tile programs (bk64
        # bn256, 1944 of them adding into y with atomics) 36 µs for 31 MB, the up kernel 12.8.
        # Longer programs down the rows: partial sums or fewer atomics.
        # Second sweep (batch 4 / 8, µs): 8 steps bn256 partials s3 47.5 / 47.2 (the choice
        # path's since), s2 52.9 / 53.1, bn128 53.6 (b8), atomics 55.3 (b8), 4 steps 60.7 (b8);
        # the rows kernel down 112.8 (b8).
        v["sparse mma bj32 bk256, select kernel, down bk64 8 steps bn256 partials s3"] = dict(
            mma, bj=32, bk=256, down_tiles=down)
        # Third sweep (batch 2 / 4 / 8, µs): bk64 8 steps s3 47.4 / 47.7 / 48.3, s4 - / - / 52.1,
        # bk32 16 steps s3 / s4 52.3 / 50.5 (b8), bj64 w8 48.2 (b8). The profile at batch 8 (per
        # layer): down 14.0 µs (2.2 TB/s; 243 programs, under two waves of 132 SMs), up 12.5
        # (2.5 TB/s). Next: more, shorter down programs at 3 stages, and wider up tiles.
        for name, up, dn in (("down bn128 8 steps s3", {}, dict(down, bn=128)),
                             ("down bk128 4 steps s3", {}, dict(down, bk=128, steps=4)),
                             ("down w8", {}, dict(down, num_warps=8)),
                             ("up bj16", dict(bj=16), down),
                             ("up bj64 w8 s3", dict(bj=64, num_warps=8, num_stages=3), down),
                             ("up bk128", dict(bk=128), down),
                             ("tokens padded once", dict(pad_batch=True), down),
                             # Session 11: the seven above lost to the shipped tiles (45.9 µs at
                             # batch 8). The masked down tiles load about half their rows at
                             # batch 8 (49% union), each load's mask waiting on its h tile; the
                             # gather form loads full tiles of live rows from XLA's live-row list.
                             ("down gather bc64 splits16", {},
                              dict(impl="gather", mma=True, bc=64, bn=256, splits=16)),
                             ("down gather bc64 splits32", {},
                              dict(impl="gather", mma=True, bc=64, bn=256, splits=32)),
                             ("down gather bc32 splits32 s3", {},
                              dict(impl="gather", mma=True, bc=32, bn=256, splits=32, num_stages=3))):
            v[f"sparse mma, select kernel, {name}"] = dict(mma, **{"bj": 32, "bk": 256, **up},
                                                           down_tiles=dn)
    if batch == 1:
        # Session 9's sweep of the padded-row path's tilings at batch 1 (µs): bj32 33.9, bj64
        # 33.3, bj32 w8 33.0, rows cs16 33.1, cs4 32.7 (within the noise); bj16 36.7, bk128
        # 34.6 and rows span256 55.4 lost and are not timed again.
        pad2 = dict(impl="sparse", bk=256, gate_pad2=True)
        v.update({
            "sparse bj32 w8, rows down cs4, padded-row gate": dict(
                pad2, bj=32, num_warps=8, down_tiles=dict(ROWS_DOWN, col_splits=4)),
            "sparse bj32, rows down cs4, padded-row gate, select kernel": dict(
                select, down_tiles=dict(ROWS_DOWN, col_splits=4)),
            "sparse bj64 w8, rows down cs4, padded-row gate, select kernel": dict(
                select, bj=64, num_warps=8, down_tiles=dict(ROWS_DOWN, col_splits=4)),
            # The selection kernel shares a row of 13824 (27 chunks) among 27 programs by
            # default, each reading the whole row for the statistics: fewer, longer programs.
            "sparse bj32, rows down cs4, padded-row gate, select kernel, 9 programs": dict(
                select, select_programs=9, down_tiles=dict(ROWS_DOWN, col_splits=4)),
            "sparse bj32, rows down cs4, padded-row gate, select kernel, 3 programs": dict(
                select, select_programs=3, down_tiles=dict(ROWS_DOWN, col_splits=4)),
        })
    if batch > 2:      # the union passes a quarter of the neurons: the tensor-core paths, dense
        v = {k: kw for k, kw in v.items() if "mma" in k or k in ("dense (same function, XLA)",
                                                                 "auto (choose_impl)")}
    return v


def _capacity(d_ff, batch):
    expected = d_ff * (1 - (1 - K_FRAC) ** batch)
    return min(d_ff, int(math.ceil(expected * 1.15 / 128)) * 128)


def _dense_gated(x, w):
    wg, wu, wd = w
    g = jnp.dot(x, wg, preferred_element_type=jnp.float32)
    u = jnp.dot(x, wu, preferred_element_type=jnp.float32)
    return jnp.dot((jax.nn.gelu(g) * u).astype(x.dtype), wd, preferred_element_type=jnp.float32).astype(x.dtype)


def bench_ffn(b: Bench):
    d, d_ff, r = b.s.d_model, b.s.d_ff_layer, b.s.predictor
    b.log(f"== Spark FFN decode layer d_model {d}, d_ff {d_ff}, r {r}, k {K_FRAC:.0%}, bf16")
    spark = []
    for _ in range(b.s.layers):
        wi = _normal(b.fresh(), (d, d_ff), scale=d ** -0.5)
        wo = _normal(b.fresh(), (d_ff, d), scale=d_ff ** -0.5)
        spark.append(sf.decode_weights_from_spark(wi, wo, r))
    dense_w = [tuple(_normal(b.fresh(), s, scale=s[0] ** -0.5) for s in ((d, d_ff), (d, d_ff), (d_ff, d)))
               for _ in range(b.s.layers)]
    curve = []
    section_end = b.deadline
    batches = [bt for bt in BATCHES if not (b.interpret and bt > 2)]
    weights = {1: 0.4, 2: 0.2, 4: 0.2, 8: 0.2}
    for n_done, batch in enumerate(batches):
        # each batch gets its share of what is left (the first sweep spent it all at batch 1)
        share = weights[batch] / sum(weights[bt] for bt in batches[n_done:])
        b.deadline = min(section_end, time.time() + (section_end - time.time()) * share)
        xs = [_normal(b.fresh(), (batch, d)) for _ in range(b.s.layers)]
        w32 = jax.tree.map(lambda a: a.astype(jnp.float32), spark[0])
        ref = sf.topk_ffn_decode_reference(xs[0].astype(jnp.float32), w32, k_frac=K_FRAC)
        # the union of fired neurons over fresh batches (the curve that decides sparse vs dense)
        unions = []
        for _ in range(8):
            x = _normal(b.fresh(), (batch, d))
            pre = jnp.dot(x[:, :r], spark[0].w_gate, preferred_element_type=jnp.float32)
            unions.append(int(sf.select_neurons(pre, k_frac=K_FRAC, capacity=d_ff)[2]))
        b.log(f"-- batch {batch}: union of fired neurons {np.mean(unions):.0f} of {d_ff} "
              f"({np.mean(unions) / d_ff:.1%}; independent tokens: {1 - (1 - K_FRAC) ** batch:.1%})")
        dense = _over_layers(_dense_gated)
        ref_dense = _dense_gated(xs[0].astype(jnp.float32), jax.tree.map(lambda a: a.astype(jnp.float32),
                                                                          dense_w[0]))
        _, _, t_dense = b.check_and_time("dense gated FFN (same d_ff)", dense, (xs, dense_w), ref_dense, 2e-2,
                                         b.s.layers)
        t_pad = float("nan")
        if batch == 1:    # XLA's M=1 GEMV vs its M=2 GEMM path (batch 2 ran faster than batch 1)
            pad2 = _over_layers(lambda x, w: _dense_gated(_pad_row(x), w)[:1])
            _, _, t_pad = b.check_and_time("dense gated FFN, batch padded to 2 rows", pad2, (xs, dense_w),
                                           ref_dense, 2e-2, b.s.layers)
        choice = "-"
        if b.over_budget():
            b.log("  choose_impl and every variant: skipped (time budget)")
            continue
        try:      # what the library picks at this batch (path_choice, weights streamed); cached for "auto"
            picked = sf.choose_impl(batch, spark[0], k_frac=K_FRAC)
            choice = f"{picked.name} ({picked.source}; " + ", ".join(
                f"{k} {v:.1f} us" for k, v in picked.times_us.items()) + ")"
        except Exception as e:   # noqa: BLE001
            choice = f"failed: {type(e).__name__}: {str(e)[:200]}"
        b.log(f"  choose_impl at batch {batch}: {choice}")
        best = (None, float("nan"))
        times, fns = {}, {}
        variants = {name: kw for name, kw in ffn_variants(b.interpret, batch).items()
                    if not FFN_VARIANTS or kw["impl"] in ("dense", "auto")
                    or any(f in name for f in FFN_VARIANTS)}
        for name, kw in variants.items():
            extra = dict(capacity=_capacity(d_ff, batch)) if kw["impl"] in ("xla", "pallas") else {}
            fn = _over_layers(functools.partial(sf.topk_ffn_decode, k_frac=K_FRAC, interpret=b.interpret,
                                                **extra, **kw))
            _, ok, t = b.check_and_time(name, fn, (xs, spark), ref, 3e-2, b.s.layers)
            times[name], fns[name] = t, fn
            if ok and not (t >= best[1]) and kw["impl"] not in ("dense", "auto"):
                best = (name, t)
            b.detail.append(f"| ffn | batch {batch} | {name} | {t_dense:.1f} | {t:.1f} | {t_dense / t:.2f} |")
        if t_pad == t_pad:
            b.detail.append(f"| ffn | batch {batch} | dense gated FFN, batch padded to 2 rows | {t_dense:.1f} | "
                            f"{t_pad:.1f} | {t_dense / t_pad:.2f} |")
        pred = _over_layers(lambda x, w: jnp.dot(x[:, :r], w.w_gate, preferred_element_type=jnp.float32))
        pred_k = _over_layers(lambda x, w: sig.sparse_input_gemv(
            x[:, :r], w.w_gate, impl="masked", out_dtype=jnp.float32, interpret=b.interpret,
            **(GATE_KERNEL if not b.interpret else dict(bk=16, bn=32, steps=2, partials=True))))
        if not b.over_budget():
            t_pred = b.time_us(pred, xs, spark) / b.s.layers
            t_pred_k = b.time_us(pred_k, xs, spark) / b.s.layers
            b.log(f"  predictor GEMV alone: XLA {t_pred:.1f} us, streaming kernel {t_pred_k:.1f} us")
        auto = times.get("auto (choose_impl)", float("nan"))
        steady = None
        if best[0] is not None and auto == auto and not b.over_budget():
            # The summary's ratios from one interleaved timing of dense, the best variant and
            # auto: times taken minutes apart drift (see timing.interleaved_seconds).
            runs = [(dense, (xs, dense_w)), (fns[best[0]], (xs, spark)), (fns["auto (choose_impl)"], (xs, spark))]
            t_dense, t_best, auto = (1e6 * t / b.s.layers for t in interleaved_seconds(
                runs, calls=b.s.calls, repeats=b.s.repeats))
            best = (best[0], t_best)
            b.log(f"  interleaved: dense {t_dense:.1f} us, {best[0]} {t_best:.1f} us, auto {auto:.1f} us")
            # The same in steady state (timing.interleaved_seconds): the sparse paths cost the
            # host more to enqueue, which a turn from an empty queue counts in part.
            steady = [1e6 * t / b.s.layers for t in interleaved_seconds(
                runs, calls=b.s.calls, repeats=b.s.repeats, steady=True)]
            b.log(f"  interleaved, steady state: dense {steady[0]:.1f} us, {best[0]} {steady[1]:.1f} us, "
                  f"auto {steady[2]:.1f} us")
        curve.append((batch, np.mean(unions) / d_ff, t_dense, best, choice))
        b.summary.append(("Spark FFN layer", f"batch {batch}", best[0], t_dense, best[1], GOALS["ffn"].get(batch)))
        b.summary.append(("Spark FFN layer, impl='auto'", f"batch {batch}", choice.split(" (")[0], t_dense, auto,
                          None))
        if steady is not None:
            b.summary.append(("Spark FFN layer, steady-state timing", f"batch {batch}", best[0], steady[0],
                              steady[1], GOALS["ffn"].get(batch)))
            b.summary.append(("Spark FFN layer, impl='auto', steady-state timing", f"batch {batch}",
                              choice.split(" (")[0], steady[0], steady[2], None))
    b.deadline = section_end
    b.detail.append("")
    b.detail.append("Union growth and the per-batch choice (sparse path if it beats dense):")
    b.detail.append("")
    b.detail.append("| batch | union of fired neurons | dense us | best sparse | us | faster here | "
                    "choose_impl picks |")
    b.detail.append("|---|---|---|---|---|---|---|")
    for batch, union, t_dense, (name, t), choice in curve:
        faster = name if t < t_dense else "dense"
        b.detail.append(f"| {batch} | {union:.1%} | {t_dense:.1f} | {name} | {t:.1f} | {faster} | {choice} |")


# --------------------------------------------------------------------------- N:M GEMV


NM_X_ACCESS_NAMES = {"gather": "gather-x natural", "gather_grouped": "gather-x transposed",
                     "select": "select-x transposed"}


def _nm_launch(x_access, warps, stages, programs, cols) -> tile_tables.NMTiles:
    """A GPU launch of the N:M kernel, for the sweep."""
    return tile_tables.NMTiles(cols=cols, x_access=x_access, num_warps=warps, num_stages=stages,
                               target_programs=programs)


@contextlib.contextmanager
def _nm_launch_set(launch: tile_tables.NMTiles):
    """The N:M kernel's module knobs set to ``launch`` while tracing and timing under it."""
    saved = nm.X_ACCESS, nm.NUM_WARPS, nm.NUM_STAGES, nm.TARGET_PROGRAMS
    nm.X_ACCESS, nm.NUM_WARPS, nm.NUM_STAGES, nm.TARGET_PROGRAMS = (
        launch.x_access, launch.num_warps, launch.num_stages, launch.target_programs)
    try:
        yield
    finally:
        nm.X_ACCESS, nm.NUM_WARPS, nm.NUM_STAGES, nm.TARGET_PROGRAMS = saved


def bench_nm(b: Bench):
    n = b.s.gemv
    b.log(f"== compressed N:M GEMV {n}x{n}, bf16")
    for pat in ((2, 4), (1, 4), (2, 8)):
        if b.over_budget():
            break
        dense_ws, packs = [], []
        for _ in range(b.s.layers):
            w = _normal(b.fresh(), (n, n), scale=n ** -0.5)
            wm = jnp.where(nm_mask(jnp.abs(w), *pat), w, 0).astype(jnp.bfloat16)
            dense_ws.append(wm)
            packs.append(nm.compress_nm(wm, *pat))
        for batch in (BATCHES if pat == (2, 4) else tuple(bt for bt in BATCHES if bt == 1)):
            if b.interpret and batch > 2:
                continue
            xs = [_normal(b.fresh(), (batch, n)) for _ in range(b.s.layers)]
            ref = xs[0].astype(jnp.float32) @ dense_ws[0].astype(jnp.float32)
            b.log(f"-- {pat[0]}:{pat[1]} batch {batch} (bytes allow {n * n * 2 / packs[0].nbytes:.2f}x)")
            dense = _over_layers(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
            _, _, t_dense = b.check_and_time("xla dense", dense, (xs, dense_ws), ref, 2e-2, b.s.layers)
            best = (None, float("nan"))
            table = tile_tables.nm_tiles("interpret" if b.interpret else "gpu", batch)
            # (launch, group tile of the packing; None: compress_nm's): the shipped launch, and
            # the same launch reading x from the (m, batch, G) copy (an XLA transpose beside
            # the kernel) that every earlier sweep timed.
            configs = [(table, None), (dataclasses.replace(table, x_access="gather_grouped"), None)]
            if b.interpret:
                configs.append((dataclasses.replace(table, x_access="select"), None))
            elif batch == 1:
                # Earlier sweeps (with the copy unless named): gather beat the selects at every
                # batch; at batch 1, w4 s3 p1024 cols64 (the table's launch) 1.13-1.24x, w4 s2
                # p1024 cols64 1.20x, w4 s3 p512 cols128 1.17x, w4 s2 p2048 cols64 1.08x, longer
                # group tiles (128, 256) 0.8x. Session 9 (from x as it is): the time follows the
                # warps in flight: w4 p512 49.6 and w4 p256 82.7 µs against 35.0 for w4 p1024,
                # w8 p512 (the same warps) 34.2; 4 stages and 32 columns lost. More warps next.
                # Session 10 (two calls, 2:4): w16 p512 30.3 / 31.9 µs, w8 p512 35.4 / 34.3, w8
                # p1024 36.2 / 35.9, w8 p2048 35.0 / 32.4, w8 s2 p1024 37.5 / 36.1, w4 p1024
                # 37.2 / 33.1; w16 p512 is the table's launch since. Session 11 (2:4): w16 p1024
                # 32.6, s2 / s4 32.8, cols128 35.2, w32 p512 / p1024 37.3 / 38.1, w16 p256 44.7
                # against the table's 32.7: the launch space is exhausted.
                configs += [(_nm_launch("gather", 16, 3, 1024, 64), None),
                            (_nm_launch("gather", 32, 3, 512, 64), None),
                            (_nm_launch("gather", 32, 3, 1024, 64), None),
                            (_nm_launch("gather", 16, 3, 256, 64), None),
                            (_nm_launch("gather", 16, 2, 512, 64), None),
                            (_nm_launch("gather", 16, 4, 512, 64), None),
                            (_nm_launch("gather", 16, 3, 512, 128), None)]
            packed_by_tile = {None: packs}
            for launch, group_tile in configs:
                name = (f"kernel {NM_X_ACCESS_NAMES[launch.x_access]} w{launch.num_warps} s{launch.num_stages} "
                        f"p{launch.target_programs} cols{launch.cols}{' (table)' if launch == table else ''}")
                if group_tile is not None:
                    name += f" gt{group_tile}"
                    if group_tile not in packed_by_tile:
                        packed_by_tile[group_tile] = [nm.compress_nm(w, *pat, group_tile=group_tile)
                                                      for w in dense_ws]
                with _nm_launch_set(launch):
                    # The kernel itself at every batch (nm_matmul sends batches above
                    # MAX_KERNEL_BATCH to the reference).
                    op = lambda x, p, cols=launch.cols: nm._nm_apply(
                        x, p.values, p.meta, (p.shape, p.n, p.m, p.group_tile, cols, b.interpret, False))
                    fn = _over_layers(op)
                    _, ok, t = b.check_and_time(name, fn, (xs, packed_by_tile[group_tile]), ref, 2e-2,
                                                b.s.layers)
                if ok and not (t >= best[1]):
                    best = (name, t)
                    best_run = (launch, fn, packed_by_tile[group_tile])
                b.detail.append(f"| nm | {pat[0]}:{pat[1]} batch {batch} | {name} | {t_dense:.1f} | {t:.1f} | "
                                f"{t_dense / t:.2f} |")
            goal = GOALS["nm"].get(batch) if pat == (2, 4) else None
            b.summary.append(("compressed N:M GEMV", f"{pat[0]}:{pat[1]} {n}², batch {batch}", best[0], t_dense,
                              best[1], goal))
            if best[0] is not None and not b.over_budget():
                # dense and the best launch timed in turn, from an empty queue and back to back
                # (see timing.interleaved_seconds): the launch gaps of one call do not decide it.
                launch, fn, packed = best_run
                runs = [(dense, (xs, dense_ws)), (fn, (xs, packed))]
                with _nm_launch_set(launch):
                    inter = [1e6 * t / b.s.layers for t in interleaved_seconds(
                        runs, calls=b.s.calls, repeats=b.s.repeats)]
                    steady = [1e6 * t / b.s.layers for t in interleaved_seconds(
                        runs, calls=b.s.calls, repeats=b.s.repeats, steady=True)]
                b.log(f"  interleaved: dense {inter[0]:.1f} us, {best[0]} {inter[1]:.1f} us; steady state: "
                      f"dense {steady[0]:.1f} us, {steady[1]:.1f} us")
                case = f"{pat[0]}:{pat[1]} {n}², batch {batch}"
                b.summary.append(("compressed N:M GEMV, interleaved", case, best[0], inter[0], inter[1], goal))
                b.summary.append(("compressed N:M GEMV, steady-state timing", case, best[0], steady[0],
                                  steady[1], goal))
                with _nm_launch_set(launch):
                    dev = [b.device_us(label, f, a, b.s.layers)
                           for label, (f, a) in zip(("xla dense", best[0]), runs)]
                if dev[1] == dev[1]:
                    b.summary.append(("compressed N:M GEMV, device time", case, best[0], dev[0], dev[1], goal))


# --------------------------------------------------------------------------- end to end


def lm_params(key, s: Sizes, dtype=jnp.bfloat16, ffn_in_major: bool = False):
    """A gated LM's decode weights; FFN up/gate stored output-major ``(d_ff, d_model)`` (the
    sparse-output GEMV reads an up row per neuron), or input-major ``(d_model, d_ff)`` as
    Flax's Dense stores them (``ffn_in_major``: a thresholded input skips rows of both)."""
    d, f = s.d_model, s.d_ff_lm
    if d == f:
        raise ValueError("lm_params: d_model == d_ff_lm would make the FFN layout ambiguous")
    up_shape = (d, f) if ffn_in_major else (f, d)
    keys = iter(jax.random.split(key, 8 * s.lm_layers + 4))
    p = {"embed": _normal(next(keys), (s.vocab, d), dtype), "head": _normal(next(keys), (d, s.vocab), dtype,
                                                                             d ** -0.5)}
    for i in range(s.lm_layers):
        p[f"layer{i}"] = {
            "attn": {n: _normal(next(keys), (d, d), dtype, d ** -0.5) for n in ("q", "k", "v", "o")},
            "mlp": {"gate": _normal(next(keys), up_shape, dtype, d ** -0.5),
                    "up": _normal(next(keys), up_shape, dtype, d ** -0.5),
                    "down": _normal(next(keys), (f, d), dtype, f ** -0.5)},
        }
    return p


def _rms(x):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)).astype(x.dtype)


def decode_step(params, tokens, cache_k, cache_v, *, heads):
    """One decode step: ``tokens`` ``(B,)``, caches ``(L, B, T, H, hd)`` full of past keys/values.

    Returns the logits and each layer's new key and value. Writing them into the
    cache (an in-place ``dynamic_update_slice`` with donated buffers in a serving
    loop) is the caller's; attention reads the ``T`` cached positions once, as a
    decode step does, instead of copying the cache to append to it.
    """
    x = params["embed"][tokens]                                             # (B, d)
    b, d = x.shape
    hd = d // heads
    new_kv = []
    for i in range(cache_k.shape[0]):
        p = params[f"layer{i}"]
        h = _rms(x)
        q = (h @ p["attn"]["q"]).reshape(b, heads, hd)
        k_new = (h @ p["attn"]["k"]).reshape(b, heads, hd)
        v_new = (h @ p["attn"]["v"]).reshape(b, heads, hd)
        keys, values = cache_k[i], cache_v[i]                                   # (B, T, H, hd)
        scores = jnp.einsum("bhd,bthd->bht", q, keys).astype(jnp.float32) / jnp.sqrt(jnp.float32(hd))
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        att = jnp.einsum("bht,bthd->bhd", probs, values).reshape(b, d)
        x = x + att @ p["attn"]["o"]
        h = _rms(x)
        ffn_in = "bd,df->bf" if p["mlp"]["gate"].shape[0] == d else "bd,fd->bf"   # see lm_params
        g = jnp.einsum(ffn_in, h, p["mlp"]["gate"])
        u = jnp.einsum(ffn_in, h, p["mlp"]["up"])
        x = x + (jax.nn.gelu(g) * u).astype(x.dtype) @ p["mlp"]["down"]
        new_kv.append((k_new, v_new))
    return (_rms(x) @ params["head"]).astype(jnp.float32), new_kv


def spark_recipe(s: Sizes) -> list:
    """Spark top-k on every FFN and attention site of :func:`decode_step`'s LM."""
    return [SparkTopK("*", site="ffn", k_frac=K_FRAC),
            SparkTopK("*", site="attention", k=min(256, s.cache // 4), impl=ATTENTION_TOPK)]


def bench_e2e(b: Bench):
    s = b.s
    b.log(f"== end-to-end decode: d_model {s.d_model}, d_ff {s.d_ff_lm}, {s.heads} heads, {s.lm_layers} layers, "
          f"KV cache {s.cache}, vocab {s.vocab}, bf16")
    params = lm_params(b.fresh(), s)
    hd = s.d_model // s.heads
    step = functools.partial(decode_step, heads=s.heads)
    recipe = spark_recipe(s)

    def inputs(batch):
        shape = (s.lm_layers, batch, s.cache, s.heads, hd)
        return (jax.random.randint(b.fresh(), (batch,), 0, s.vocab), _normal(b.fresh(), shape),
                _normal(b.fresh(), shape))

    sfn = sparsify(step, recipe)
    # Spark FFN sites are found at batch 2 (the batch-1 site finder is being fixed separately);
    # each batch is traced on its own, and the table says how many kernels each step runs.
    sp, ss = sfn.init(params, *inputs(2))
    low = sfn.lower(ss, interpret=b.interpret)
    dense = jax.jit(step)
    # The dense model given the GEMV paths the lowered Spark step has at its unruled sites
    # (XLA's one-row product is a slow reduction; padding the row to two or a streaming kernel
    # avoids it): the Spark step's gain over this is what the activation sparsity itself buys.
    dsfn = sparsify(step, [])
    _, dss = dsfn.init(params, *inputs(2))
    dlow = dsfn.lower(dss, interpret=b.interpret, dense_gemv=True)
    dense_low = jax.jit(lambda p, *a: dlow(p, dss, *a))
    spark_xla = jax.jit(lambda p, *a: sfn(p, ss, *a))
    spark_low = jax.jit(lambda p, *a: low(p, ss, *a))
    site_paths = []
    for batch in BATCHES:
        if b.interpret and batch > 2:
            continue
        args = inputs(batch)
        b.log(f"-- batch {batch}")
        if b.over_budget():       # lowering measures every site's candidates: not past the budget
            b.log("  skipped (time budget)")
            continue
        try:
            n_sites = len(sfn._trace_for(jax.tree.leaves(sp), *_split(sfn, args)).activation_sites)
            kernels = sum(e.primitive.name == "pallas_call"
                          for e in low.rewritten_jaxpr(sp, ss, *args).jaxpr.eqns)
        except Exception as e:   # noqa: BLE001
            n_sites, kernels = -1, -1
            b.log(f"  site count failed: {type(e).__name__}: {e}"[:300])
        b.log(f"  activation sites found: {n_sites}; Pallas kernels in the lowered step: {kernels}")
        ref = spark_xla(params, *args)[0]
        dense_ref = dense(params, *args)[0]
        # The first two are the references themselves: their check only asks for finite,
        # repeatable outputs (XLA may reorder a reduction between runs).
        _, _, t_dense = b.check_and_time("dense model", dense, (params, *args), dense_ref, 1e-3)
        _, _, t_dense_low = b.check_and_time("dense model, lowered (dense_gemv=True)", dense_low,
                                             (params, *args), dense_ref, 3e-2)
        final_dense_low = dense_low
        if TUNE:
            dtuning = dlow.tune(lambda p, *a: dlow(p, dss, *a), params, *args)
            b.log("  dense lowered: " + dtuning.summary().replace("\n", "\n  "))
            if dtuning.verdicts or dtuning.compiler_options:
                final_dense_low = jax.jit(lambda p, *a: dlow(p, dss, *a),
                                          compiler_options=dtuning.compiler_options or None)
                _, _, t_dense_low = b.check_and_time(
                    "dense model, lowered (dense_gemv=True), program-tuned", final_dense_low,
                    (params, *args), dense_ref, 3e-2)
        _, _, t_xla = b.check_and_time("Spark top-k, XLA (sparsify, not lowered)", spark_xla, (params, *args),
                                       ref, 1e-3)
        _, ok, t_low = b.check_and_time("Spark top-k, lowered (sparse GEMVs)", spark_low, (params, *args), ref,
                                        3e-2)
        final_spark = spark_low
        tok = lambda t: batch / (t * 1e-6)
        b.detail.append(f"| e2e | batch {batch} | lowered | {t_dense:.1f} | {t_low:.1f} | {t_dense / t_low:.2f} |")
        b.detail.append(f"| e2e | batch {batch} | Spark XLA (not lowered) | {t_dense:.1f} | {t_xla:.1f} | "
                        f"{t_dense / t_xla:.2f} |")
        b.detail.append(f"| e2e | batch {batch} | dense, lowered (dense_gemv=True{', tuned' if TUNE else ''}) | "
                        f"{t_dense:.1f} | {t_dense_low:.1f} | {t_dense / t_dense_low:.2f} |")
        b.log(f"  tokens/s: dense {tok(t_dense):.0f}, Spark lowered {tok(t_low):.0f}, Spark XLA {tok(t_xla):.0f}"
              f"; sites {n_sites}, kernels {kernels}")
        paths = sorted({f"{p}: {h.site_path(st.key)}" for p, h in low._handlers.items() for st in h.sites
                        if hasattr(h, "choices")})
        site_paths += [f"- batch {batch}: {p}" for p in paths if p.split(":")[0].startswith("layer0/")]
        b.summary.append(("end-to-end decode step", f"batch {batch} (tokens/s {tok(t_dense):.0f} -> "
                          f"{tok(t_low):.0f}; {kernels} kernels)", "sparsify + lower", t_dense, t_low,
                          GOALS["e2e"].get(batch)))
        if TUNE:
            # Close per-site choices settled on the whole step (SparseFunction.tune), then the
            # tuned step, where a switch was kept, timed as the others were (a fresh trace
            # takes the verdicts).
            # The program the benchmark times (the sparsity state closed over, not an argument):
            # the tuner's verdicts hold for the program it timed.
            tuning = low.tune(lambda p, *a: low(p, ss, *a), params, *args)
            b.log("  " + tuning.summary().replace("\n", "\n  "))
            t_tuned = t_low       # no switch kept: the step already timed
            if tuning.verdicts or tuning.compiler_options:
                tuned = jax.jit(lambda p, *a: low(p, ss, *a), compiler_options=tuning.compiler_options or None)
                _, _, t_tuned = b.check_and_time("Spark top-k, lowered, program-tuned", tuned,
                                                 (params, *args), ref, 3e-2)
                final_spark = tuned
            b.detail.append(f"| e2e | batch {batch} | lowered, program-tuned | {t_dense:.1f} | "
                            f"{t_tuned:.1f} | {t_dense / t_tuned:.2f} |")
            b.summary.append(("end-to-end decode step, program-tuned", f"batch {batch} "
                              f"({sum(t.kept for t in tuning.trials)} of {len(tuning.trials)} switches kept)",
                              "sparsify + lower + tune", t_dense, t_tuned, GOALS["e2e"].get(batch)))
        # The same step against the dense model on the same GEMV paths (its "dense us" column)
        b.summary.append(("end-to-end decode step against dense with the same GEMV paths",
                          f"batch {batch}", "sparsify + lower" + (" + tune" if TUNE else ""),
                          t_dense_low, t_tuned if TUNE else t_low, None))
        if not b.over_budget():
            # The three final programs timed in turn (A B C A B C ...): their ratios do not
            # carry the drift of times taken minutes apart (timing.interleaved_seconds).
            runs = [(dense, (params, *args)), (final_dense_low, (params, *args)),
                    (final_spark, (params, *args))]
            t_d, t_dl, t_s = (1e6 * t for t in interleaved_seconds(
                runs, calls=b.s.calls, repeats=b.s.repeats))
            b.log(f"  interleaved: dense {t_d:.1f} us, dense lowered {t_dl:.1f} us, Spark lowered "
                  f"{t_s:.1f} us")
            b.summary.append(("end-to-end decode step, interleaved timing", f"batch {batch}",
                              "sparsify + lower" + (" + tune" if TUNE else ""), t_d, t_s,
                              GOALS["e2e"].get(batch)))
            b.summary.append(("end-to-end decode step against dense with the same GEMV paths, "
                              "interleaved timing", f"batch {batch}", "sparsify + lower"
                              + (" + tune" if TUNE else ""), t_dl, t_s, None))
            t_d, t_dl, t_s = (1e6 * t for t in interleaved_seconds(
                runs, calls=b.s.calls, repeats=b.s.repeats, steady=True))
            b.log(f"  interleaved, steady state: dense {t_d:.1f} us, dense lowered {t_dl:.1f} us, "
                  f"Spark lowered {t_s:.1f} us")
            b.summary.append(("end-to-end decode step, steady-state timing", f"batch {batch}",
                              "sparsify + lower" + (" + tune" if TUNE else ""), t_d, t_s,
                              GOALS["e2e"].get(batch)))
    b.detail.append("")
    b.detail.append("Paths the lowered sites took, per batch:")
    b.detail.append("")
    b.detail += site_paths


def _split(sfn, args):
    leaves, treedef, dynamic, static = sfn._split_args(args, {})
    return leaves, treedef, dynamic, static


def summary_table(b: Bench, variant_header: str) -> list[str]:
    """The summary rows of ``b`` as a Markdown table: each ratio to dense beside its goal."""
    table = [f"| measurement | case | {variant_header} | dense us | sparse us | x dense | goal | met |",
             "|---|---|---|---|---|---|---|---|"]
    for section, case, name, t_dense, t_best, goal in b.summary:
        ratio = t_dense / t_best if t_best == t_best and t_best > 0 else float("nan")
        met = "-" if goal is None else ("yes" if ratio >= goal else "no")
        if b.interpret:
            met = "n/a: interpret mode times nothing real"
        table.append(f"| {section} | {case} | {name} | {t_dense:.1f} | {t_best:.1f} | {ratio:.2f} | "
                     f"{'-' if goal is None else f'>= {goal}'} | {met} |")
    return table


# --------------------------------------------------------------------------- main


def main():
    global TUNE, ATTENTION_TOPK, BATCHES, FFN_VARIANTS
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, Pallas interpret mode (CPU)")
    parser.add_argument("--only", default="gemv,ffn,nm,e2e")
    parser.add_argument("--budget", type=float, default=195.0, help="seconds before variants are skipped")
    parser.add_argument("--tune", action="store_true",
                        help="e2e: also settle close per-site path choices on the whole step "
                             "(SparseFunction.tune) and time the tuned step")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)),
                        help="decode batch sizes the ffn, nm and e2e sections measure, e.g. '1,8' "
                             "(nm: 1:4 and 2:8 at batch 1 only)")
    parser.add_argument("--attention_topk", choices=("auto", "xla"), default="auto",
                        help="the attention rule's top-k: 'auto' (its one-pass kernel on a GPU) "
                             "or 'xla' (XLA's fusions)")
    parser.add_argument("--ffn_variants", default="",
                        help="comma-separated name fragments: the ffn section times only the variants "
                             "whose names contain one (dense and auto always run)")
    args = parser.parse_args()
    TUNE, ATTENTION_TOPK = args.tune, args.attention_topk
    FFN_VARIANTS = tuple(f for f in args.ffn_variants.split(",") if f)
    BATCHES = tuple(int(bt) for bt in args.batches.split(","))
    interpret = args.smoke or jax.default_backend() != "gpu"
    b = Bench(SMOKE if args.smoke else FULL, interpret, args.budget)
    dev = jax.devices()[0]
    b.log(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, interpret={interpret}")
    sections = {"gemv": bench_gemv, "ffn": bench_ffn, "nm": bench_nm, "e2e": bench_e2e}
    shares = {"gemv": 0.13, "ffn": 0.32, "nm": 0.10, "e2e": 0.45}     # of the budget, each from its start
    with path_choice.mode("auto"):
        for name in args.only.split(","):
            b.start_section(shares[name] if not args.smoke else 10.0)
            try:
                sections[name](b)
            except Exception as e:   # noqa: BLE001
                b.log(f"section {name} failed: {type(e).__name__}: {str(e)[:400]}")
                b.log_lines.append(traceback.format_exc()[-3000:])
    table = summary_table(b, "best variant")
    command = "PYTHONUNBUFFERED=1 python " + " ".join(["benchmarks/decode_speed.py", *sys.argv[1:]])
    md = ["# Decode speed: sparse-input GEMV, Spark FFN, compressed N:M, end to end", "",
          f"Command: `{command}`", "",
          f"Device: {dev.device_kind}; JAX {jax.__version__}; bf16; interpret mode: {interpret}. Each time is "
          f"a median over {b.s.repeats} repeats of {b.s.calls} back-to-back calls of one jit running "
          f"{b.s.layers} weight sets, per weight set; dense XLA in the same run. Elapsed "
          f"{time.time() - b.t0:.0f} s.", "", *table, "",
          "## Every variant", "", "| section | case | variant | dense us | us | x dense |", "|---|---|---|---|---|---|",
          *b.detail, "", "## Log", "", "```", *b.log_lines, "```", ""]
    out_dir = os.environ.get("OUT")
    if out_dir is None:
        out_dir = os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    name = "decode_speed_smoke.md" if args.smoke else "decode_speed.md"
    with open(os.path.join(out_dir, name), "w") as f:
        f.write("\n".join(md))
    print("\n".join(table))


if __name__ == "__main__":
    main()
