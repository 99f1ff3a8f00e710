"""The fastest correct path for one call site, chosen by measurement and remembered.

A rewritten site (a lowered block-sparse matmul, a Monarch product, a decode
GEMV) can usually be computed several correct ways: one or more kernels and
XLA's dense product. Which is fastest depends on the shape, the density and the
device, and it is not always the kernel: a block-sparse matmul whose columns
keep one block each, or a Monarch product at 768 wide, loses to XLA. So a site
never trusts a rule of thumb on an accelerator: :func:`choose` times every
supported candidate on the device the first time a signature is seen, keeps the
answer in memory, in a user cache file (``SPARSEJAX_PATH_CACHE``) and in the
tables shipped with the library (``path_tables/<device>.json``), and the site
then takes the winner. On the CPU, and whenever measuring is off, the choice is
deterministic: the first supported candidate in the caller's order of
preference (the reference twin where no kernel runs).

Modes (:func:`set_mode` / :func:`mode`, or ``SPARSEJAX_PATHS``):

* ``"auto"`` (default): measure on GPU/TPU when no table knows the signature;
  deterministic on CPU.
* ``"table"``: use the memory cache and the tables, never measure; an unknown
  signature takes the deterministic choice.
* ``"measure"``: measure on GPU/TPU even where a table knows the signature (what
  this process measured is reused): how a shipped table is refreshed.
* ``"off"``: always the deterministic choice.
* ``"force:<path>"``: that path wherever it is a candidate and supported (tests,
  benchmarks of one path).

Measurements run in a worker thread: a site is chosen while the rewritten
program is being traced, and a thread starts with no trace of its own, so the
candidates run eagerly on concrete random inputs of the site's shapes.

A measured candidate must also be right on the device: where the caller says
the candidates compute the same function (``check=True``), before one is timed
its output on the measurement's inputs is compared with the baseline's (XLA's
dense product, :data:`CHECK_RTOL`), and one that disagrees is reported in a
warning and never chosen. Interpret-mode tests cannot see a kernel's
device-only defects; this check keeps one from reaching a program.

Per-site timing cannot see how sites compose in a program (a kernel's launch beside
its neighbours, XLA fusing a product with what surrounds it). Where a site's runner-up
was close, :func:`sparsejax.kernels.program_tuning.tune` times the whole program each
way and keeps the faster; its verdicts (:func:`overriding`) outrank the per-site ones.

``SPARSEJAX_PATHS_LOG=1`` prints each measured choice (signature, winner, times,
seconds spent) to stderr. Candidates compile in parallel threads
(``SPARSEJAX_PATHS_COMPILE_THREADS``, default the CPU count; 1 compiles one at a time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import statistics
import sys
import threading
import time
import warnings
from concurrent import futures
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.kernels import device_timing

__all__ = ["Candidate", "Choice", "choose", "median_seconds", "set_mode", "mode", "clear_cache",
           "cache_entries", "device_key", "table_path"]

_TABLE_DIR = pathlib.Path(__file__).with_name("path_tables")


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way to compute a site.

    Attributes:
      name: short, stable name (the key in tables and reports), e.g. ``"kernel"``, ``"xla_dense"``.
      fn: the computation, ``fn(*args)`` on arrays shaped like the caller's ``args``.
      unsupported: why this path cannot run here (``None`` if it can); unsupported
        candidates are never measured or chosen.
      describe: a human description for the report (defaults to ``name``).
      movable: its time alone overstates its cost inside a program, because part of its
        work can move out of a loop there (a Monarch weight rebuilt once before a scan
        instead of in every layer): program tuning
        (:mod:`sparsejax.kernels.program_tuning`) tries it whatever it measured alone.
    """

    name: str
    fn: Callable
    unsupported: str | None = None
    describe: str | None = None
    movable: bool = False

    @property
    def label(self) -> str:
        return self.describe or self.name


@dataclasses.dataclass(frozen=True)
class Choice:
    """The path a site takes, and why.

    Attributes:
      name: the chosen candidate's name.
      label: its description.
      source: ``"measured"`` (now), ``"cache"`` (this process or the user cache
        file), ``"table"`` (shipped table), ``"default"`` (deterministic order),
        ``"forced"``, ``"program"`` (the whole program timed each way: a remembered verdict
        of :mod:`sparsejax.kernels.program_tuning`, or one in force, :func:`overriding`).
      times_us: median microseconds of each measured candidate (empty if none was measured).
      baseline: the candidate the times are compared against (XLA dense), if given.
      timed_by: ``"wall"`` (the wall clock over back-to-back calls) or ``"device"`` (the
        profiler's device time, where the wall clock measured the host's dispatch; see
        :func:`measure`).
    """

    name: str
    label: str
    source: str
    times_us: Mapping[str, float] = dataclasses.field(default_factory=dict)
    baseline: str | None = None
    timed_by: str = "wall"

    def summary(self) -> str:
        """One phrase for a report column: the path, and its time against the baseline."""
        text = self.label
        mine = self.times_us.get(self.name)
        base = self.times_us.get(self.baseline) if self.baseline else None
        how = self.source + (", device time" if self.timed_by == "device" else "")
        if mine is not None and base is not None and self.name != self.baseline:
            text += f" ({mine:.0f} µs vs dense {base:.0f} µs, {base / mine:.2f}×, {how})"
        elif mine is not None:
            text += f" ({mine:.0f} µs, {how})"
        elif self.source != "default":
            text += f" ({self.source})"
        return text


# --------------------------------------------------------------------------- mode

_state = threading.local()
_MODES = ("auto", "table", "measure", "off")


def _check_mode(m: str) -> str:
    if m in _MODES or (isinstance(m, str) and m.startswith("force:") and len(m) > 6):
        return m
    raise ValueError(f"path choice mode must be one of {_MODES} or 'force:<path>', got {m!r}")


_global_mode = _check_mode(os.environ.get("SPARSEJAX_PATHS", "auto"))


def set_mode(m: str) -> None:
    """Sets the process-wide mode (see the module docstring)."""
    global _global_mode
    _global_mode = _check_mode(m)


def current_mode() -> str:
    return getattr(_state, "mode", None) or _global_mode


@contextlib.contextmanager
def mode(m: str):
    """Context manager: the mode for choices made (traced) inside the block, in this thread."""
    _check_mode(m)
    previous = getattr(_state, "mode", None)
    _state.mode = m
    try:
        yield
    finally:
        _state.mode = previous


# --------------------------------------------------------------------------- cache and tables

_memory: dict[str, dict] = {}
_lock = threading.Lock()
_loaded_tables: dict[str, dict] = {}


def device_key(device=None) -> str:
    """A file-name-safe name of the device kind, e.g. ``nvidia_h200``."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", device.platform)
    return "".join(c if c.isalnum() else "_" for c in kind.lower()).strip("_") or device.platform


def table_path(device=None) -> pathlib.Path:
    """Where the shipped table of a device kind lives."""
    return _TABLE_DIR / f"{device_key(device)}.json"


def _read_table(path: pathlib.Path) -> dict:
    key = str(path)
    if key not in _loaded_tables:
        try:
            _loaded_tables[key] = json.loads(path.read_text()).get("entries", {})
        except (OSError, ValueError):
            _loaded_tables[key] = {}
    return _loaded_tables[key]


# --------------------------------------------------------------------------- program-level verdicts

_overrides: dict[str, str] = {}
_recorders: list[dict] = []


@contextlib.contextmanager
def overriding(paths: Mapping[str, str]):
    """Inside the block (every thread), the site whose key (``"op|signature"``) is in ``paths``
    takes that path wherever it is a supported candidate, before any cache or table: the
    verdict of timing the whole program (:mod:`sparsejax.kernels.program_tuning`). Forcing
    (``force:<path>``) and ``off`` still come first."""
    global _overrides
    with _lock:
        previous = _overrides
        _overrides = {**previous, **paths}
    try:
        yield
    finally:
        with _lock:
            _overrides = previous


@contextlib.contextmanager
def recording():
    """Collects the choices made (traced) inside the block, from every thread:
    ``{key: (Choice, names of the supported candidates, names of the movable ones)}``, the
    latest per key."""
    seen: dict = {}
    with _lock:
        _recorders.append(seen)
    try:
        yield seen
    finally:
        with _lock:
            _recorders.remove(seen)


def remember_program_verdict(key: str, path: str, program_us: Mapping[str, float]) -> None:
    """Keeps a program-level verdict (memory, and the user cache file when one is set) so later
    traces take ``path`` at ``key`` with no override. ``program_us``: the program's time each
    way; the site's own times are kept beside."""
    found = _lookup(key)
    entry = dict(found[0]) if found is not None else {}
    entry.update(path=path, program_us={k: round(v, 2) for k, v in program_us.items()})
    _remember(key, entry)


def _user_cache_path() -> pathlib.Path | None:
    p = os.environ.get("SPARSEJAX_PATH_CACHE")
    return pathlib.Path(p) if p else None


def _lookup(key: str, tables: bool = True) -> tuple[dict, str] | None:
    with _lock:
        if key in _memory:
            return _memory[key], "cache"
    if not tables:
        return None
    user = _user_cache_path()
    if user is not None and key in _read_table(user):
        return _read_table(user)[key], "cache"
    shipped = _read_table(table_path())
    if key in shipped:
        return shipped[key], "table"
    return None


def _remember(key: str, entry: dict) -> None:
    with _lock:
        _memory[key] = entry
    user = _user_cache_path()
    if user is not None:
        entries = dict(_read_table(user))
        entries[key] = entry
        user.parent.mkdir(parents=True, exist_ok=True)
        user.write_text(json.dumps({"device": device_key(), "entries": entries}, indent=1,
                                   sort_keys=True))
        _loaded_tables[str(user)] = entries


def cache_entries() -> dict[str, dict]:
    """Everything measured in this process, keyed by signature: the form of a shipped table."""
    with _lock:
        return dict(_memory)


def clear_cache() -> None:
    """Forgets this process's measurements and reloads table files on next use."""
    with _lock:
        _memory.clear()
    _loaded_tables.clear()


# --------------------------------------------------------------------------- measuring


def _random_like(spec, key):
    if isinstance(spec, jax.ShapeDtypeStruct):
        dtype = jnp.dtype(spec.dtype)
        if jnp.issubdtype(dtype, jnp.floating):
            return jax.random.normal(key, spec.shape, jnp.float32).astype(dtype)
        if jnp.issubdtype(dtype, jnp.integer):
            return jax.random.randint(key, spec.shape, 0, 2, dtype)
        return jnp.zeros(spec.shape, dtype)
    return spec


def median_seconds(fn, *args, calls: int = 10, repeats: int = 15, warmup: int = 3) -> float:
    """Median over ``repeats`` of the mean time of ``calls`` back-to-back calls, after warm-up.

    Back-to-back calls keep the device queue full, so launch gaps of one call do not count.
    The benchmarks time with this too (``benchmarks/timing.py``).
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def enqueue_seconds(fn, *args, calls: int = 10, repeats: int = 1) -> float:
    """Median over ``repeats`` of the host's time to enqueue one of ``calls`` back-to-back
    calls (the queue drained before and after): what a timing of ``fn`` cannot go below,
    whatever the device does. Where it reaches :func:`median_seconds`, that timing measures
    the host's dispatch, not the device."""
    times = []
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        times.append((time.perf_counter() - t0) / calls)
        jax.block_until_ready(out)
    return statistics.median(times)


# Bytes an H200's L2 holds: inputs re-read from it would time the cache, not memory.
L2_BYTES = 60e6


# FLOPs per byte of input above which a site is compute-bound on the devices measured (an
# H200: ~990 TFLOP/s of bf16 over ~4.8 TB/s is ~200): where its inputs sit (L2 or HBM) no
# longer decides its time.
COMPUTE_BOUND_INTENSITY = 200.0


# The most input sets one timed call runs over. At 16, a 1024x1024 bf16 decode weight (2 MB)
# was timed over 32 MB, which the 60 MB L2 holds, while in a model 24 layers' weights stream
# from HBM. (On the H200, 64 sets raised both the kernel's and XLA's time at such a site by
# about a quarter; neither choice changed.)
MAX_COPIES = 64


# A timing whose host enqueue reaches this share of it measures dispatch, not the device.
HOST_BOUND = 0.7

# The most rounds over its input sets one timed call runs, and the most applications
# (input sets times rounds) it holds: each is compiled in, unrolled.
MAX_ROUNDS = 16
MAX_APPLICATIONS = 512

# Seconds of compilation the rounds may add. Every application is its own kernel to lower: on
# the H200 a Mosaic GPU kernel over 64 input sets took 28 s to compile, and its site's
# measurement, with four rounds of them, 147 s.
ROUNDS_COMPILE_S = 60.0


def rounds_for(enqueue_s: float, seconds: float, copies: int, chainable: bool = True,
               compile_s: float = 0.0) -> int:
    """How many rounds over its ``copies`` input sets a timed call needs for the device's work
    to outlast the host's enqueue (1: it already does, the first timing shows no device time,
    or the rounds cannot be chained, see :func:`over_input_sets`).

    ``enqueue_s`` and ``seconds``: one call's host enqueue and measured time at one round. The
    device works at most ``seconds`` per call, so ``3 * enqueue_s / seconds`` rounds give it at
    least three times the host's dispatch to do, within :data:`MAX_ROUNDS` and
    :data:`MAX_APPLICATIONS`, and, where compiling one round took ``compile_s``, within
    :data:`ROUNDS_COMPILE_S` more of compilation (but two rounds at least).
    """
    if not seconds > 0 or enqueue_s < HOST_BOUND * seconds or not chainable:
        return 1
    cap = max(1, min(MAX_ROUNDS, MAX_APPLICATIONS // max(copies, 1)))
    if compile_s > 0:
        cap = min(cap, max(2, int(ROUNDS_COMPILE_S // compile_s)))
    return max(1, min(cap, math.ceil(3 * enqueue_s / seconds)))


def copies_for(arg_specs: Sequence, flops: float | None = None) -> int:
    """How many independent input sets one timed call runs over.

    One small matmul per call times the host's dispatch (tens of µs), and one input set
    re-read every call times the L2; so each timed call runs the candidate over enough
    different input sets to stream 2.5× the L2 from memory (at most :data:`MAX_COPIES`).
    A site whose ``flops`` per input byte reach :data:`COMPUTE_BOUND_INTENSITY` needs only two.
    """
    nbytes = sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
                 for s in arg_specs if isinstance(s, jax.ShapeDtypeStruct))
    streamed = max(1, min(MAX_COPIES, math.ceil(2.5 * L2_BYTES / max(nbytes, 1))))
    if flops is not None and flops >= COMPUTE_BOUND_INTENSITY * max(nbytes, 1):
        return min(2, streamed)
    return streamed


# How far (norm of the difference over the baseline's norm, per output leaf) a measured
# candidate may be from the baseline on the same inputs: loose enough for 16-bit operands
# summed in another order, far below what a wrong tile or a dropped term gives.
CHECK_RTOL = 3e-2


def _rel_err(got, want) -> float:
    """The worst leaf's ``|got - want| / |want|`` (Frobenius norms, float32; non-float leaves,
    such as the float0 cotangents of integer arguments, are skipped)."""
    worst = 0.0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if not jnp.issubdtype(jnp.result_type(w), jnp.inexact):
            continue
        if jnp.shape(g) != jnp.shape(w):
            return float("inf")
        g32, w32 = jnp.asarray(g, jnp.float32), jnp.asarray(w, jnp.float32)
        num = float(jnp.linalg.norm((g32 - w32).ravel()))
        den = float(jnp.linalg.norm(w32.ravel()))
        err = num / den if den > 0 else num
        if not err == err:            # NaN: wrong
            return float("inf")
        worst = max(worst, err)
    return worst


def _compile_all(candidates: Sequence[Candidate], wrap: Callable, args: Sequence) -> dict:
    """``{name: (compiled fn or the exception raised, seconds)}`` for ``jax.jit(wrap(c.fn))`` of
    every candidate on ``args``, compiled in parallel threads: compilation, not the timed
    calls, is most of a measurement's cost (a Mosaic GPU kernel takes seconds)."""
    def compile_one(c):
        t0 = time.perf_counter()
        try:
            fn = jax.jit(wrap(c.fn)).lower(*args).compile()
        except Exception as e:   # reported (and the candidate never chosen) by the caller
            fn = e
        return c.name, (fn, time.perf_counter() - t0)

    threads = int(os.environ.get("SPARSEJAX_PATHS_COMPILE_THREADS", os.cpu_count() or 1))
    if len(candidates) <= 1 or threads <= 1:
        return dict(map(compile_one, candidates))
    with futures.ThreadPoolExecutor(max_workers=min(len(candidates), threads)) as pool:
        compiled = dict(pool.map(compile_one, candidates))
    # A lowering that is not safe beside another one in the process gets a second, lone try
    # before its candidate is given up.
    for c in candidates:
        if isinstance(compiled[c.name][0], Exception):
            compiled[c.name] = compile_one(c)[1]
    return compiled


def over_input_sets(fn: Callable, is_array: Sequence[bool], rounds: int = 1) -> Callable:
    """``run(per_copy, shared)``: ``fn`` applied to every input set, ``rounds`` times over.

    ``per_copy`` holds each input set's arrays (the arguments where ``is_array``), ``shared``
    the other arguments, in order. Returns each input set's output of the last round.

    Rounds after the first chain on the one before: the application's smallest floating
    argument (a site's activation, not its weight) is added zero times a scalar of its
    previous output. Each round then waits for the last, so XLA can neither merge the rounds'
    identical work nor fuse two rounds that read the same weight into one pass over it. The
    chain costs what a site's input costs in a model, where an earlier op produces it (XLA
    may fuse that op into its own product, a kernel reads it from memory).

    Every application calls one ``jax.jit`` of ``fn``: JAX traces and lowers it once for all
    of them (a Pallas kernel's lowering is most of its compile time, and 64 input sets
    lowered it 64 times: 28 s for one Mosaic GPU kernel on the H200), and XLA inlines the
    calls, so the compiled program is the one the applications spelled out would give.
    """
    def run(per_copy, shared):
        apply = jax.jit(fn)
        outs = None
        for r in range(rounds):
            applied = []
            for c, arrays in enumerate(per_copy):
                args = _application_args(arrays, shared, is_array)
                if r:
                    args = _chained(args, outs[c])
                applied.append(apply(*args))
            outs = applied
        return outs
    return run


def _application_args(arrays: Sequence, shared: Sequence, is_array: Sequence[bool]) -> list:
    """One application's arguments, in order: its input set's ``arrays`` where ``is_array``,
    the ``shared`` ones elsewhere."""
    drawn, given = iter(arrays), iter(shared)
    return [next(drawn) if arr else next(given) for arr in is_array]


def _floating(a) -> bool:
    return isinstance(a, (jax.Array, np.ndarray)) and jnp.issubdtype(a.dtype, jnp.floating)


def _chain_target(args: Sequence) -> int | None:
    """The argument a round's chain adds to: the smallest floating array, where it is at
    most a tenth of the arguments' bytes (adding to a weight would time a pass over it)."""
    floating = [i for i, a in enumerate(args) if _floating(a)]
    if not floating:
        return None
    total = sum(a.nbytes for a in args if isinstance(a, (jax.Array, np.ndarray)))
    smallest = min(floating, key=lambda i: args[i].nbytes)
    return smallest if args[smallest].nbytes <= 0.1 * total else None


def _chained(args: Sequence, previous) -> list:
    """``args`` with :func:`_chain_target` plus zero times a scalar of ``previous`` (XLA does
    not fold ``0 * y`` for floats: ``y`` may be infinite or NaN; zeros stay zeros)."""
    scalar = next(jnp.ravel(leaf)[0] for leaf in jax.tree.leaves(previous) if _floating(leaf))
    target = _chain_target(args)
    args = list(args)
    args[target] = args[target] + (scalar * 0).astype(args[target].dtype)
    return args


def measure(candidates: Sequence[Candidate], arg_specs: Sequence, *, calls: int = 10,
            repeats: int = 7, copies: int | None = None,
            reference: str | None = None, first_call_s: dict | None = None,
            enqueue_us: dict | None = None, rounds_us: dict | None = None,
            device: bool | None = None, wall_us: dict | None = None) -> dict[str, float]:
    """Median µs of one call of each supported candidate, on random inputs like ``arg_specs``.

    ``arg_specs`` are ShapeDtypeStructs (or concrete values passed as they are, shared by
    every copy; numpy arrays, not arrays made while a program is traced, which are tracers).
    Each timed call runs the candidate over ``copies`` different input sets inside one
    jit (default :func:`copies_for`) and the time is divided by it. Each copy's arrays are
    separate buffers: slices of one stacked array would make a kernel's operand a copy
    that XLA materialises (a 134 MB weight read and written again, timed with it). Runs in a fresh
    thread, so it may be called while a program is being traced. ``reference``: the
    candidate whose output every other must match within :data:`CHECK_RTOL` on the same
    inputs; one that does not gets ``inf`` (never chosen) and a warning. ``first_call_s``:
    filled with each candidate's first call in seconds (compilation included). The
    candidates are compiled concurrently (XLA compiles without holding the GIL), then
    checked and timed one after another. ``enqueue_us``: filled with each candidate's host
    time to enqueue one call, per input set as the times are.

    Where that enqueue reaches :data:`HOST_BOUND` of the measured time, the timing is the
    host's dispatch (each input set's arrays are arguments to pass), not the device's, and
    candidates with more arguments would look slower than they run in a program. Such a
    candidate is compiled again to run over its input sets several rounds per call
    (:func:`rounds_for`; the arguments stay the same, the device's work grows) and timed
    again; its time and enqueue are then per input set and round. ``rounds_us``: filled with
    the rounds each candidate was finally timed at.

    Where a candidate stays host-bound even so (a decode GEMV's device time is a few µs, its
    enqueue more, and each round is another launch to enqueue), and ``device`` is on, every
    candidate is timed again by its device time (:func:`device_timing.device_seconds`: its
    kernels' durations from the profiler, plus a gap per launch), which is what it costs in a
    program whose device is the bottleneck, as a decode step's is. ``device`` defaults to on
    off the CPU (where host and device are one). ``wall_us``: filled with the wall-clock times
    so replaced.
    """
    copies = copies_for(arg_specs) if copies is None else copies
    if device is None:
        device = _measuring_pays()
    is_array = [isinstance(s, jax.ShapeDtypeStruct) for s in arg_specs]

    def over_copies(fn, rounds=1):
        return over_input_sets(fn, is_array, rounds)

    def chainable(outputs, per_copy, shared) -> bool:
        first = _application_args(per_copy[0], shared, is_array)
        return any(map(_floating, jax.tree.leaves(outputs))) and _chain_target(first) is not None

    def run():
        keys = jax.random.split(jax.random.key(0), copies * max(len(arg_specs), 1))
        per_copy = [[_random_like(s, keys[c * len(arg_specs) + i])
                     for i, (s, arr) in enumerate(zip(arg_specs, is_array)) if arr]
                    for c in range(copies)]
        shared = [jnp.asarray(s) if isinstance(s, np.ndarray) else s
                  for s, arr in zip(arg_specs, is_array) if not arr]
        args = (per_copy, shared)
        out = {}
        runnable = [c for c in candidates if c.unsupported is None]
        ref = next((c for c in runnable if c.name == reference), None)
        compiled = _compile_all(runnable, over_copies, args)
        want = None
        timed, enqueues = {}, {}
        # The reference runs first: its first call's output is what the others must match.
        for c in sorted(runnable, key=lambda c: c is not ref):
            try:
                fn, seconds_to_compile = compiled[c.name]
                if isinstance(fn, Exception):
                    raise fn
                t_first = time.perf_counter()
                got = jax.block_until_ready(fn(*args))
                if first_call_s is not None:
                    first_call_s[c.name] = seconds_to_compile + time.perf_counter() - t_first
                if c is ref:
                    want = got
                elif want is not None:
                    err = _rel_err(got, want)
                    if not err <= CHECK_RTOL:
                        warnings.warn(f"path choice: candidate {c.name!r} disagrees with "
                                      f"{ref.name!r} on this device (relative error {err:.1e} > "
                                      f"{CHECK_RTOL:g}); it is not chosen")
                        out[c.name] = float("inf")
                        continue
                seconds = median_seconds(fn, *args, calls=calls, repeats=repeats, warmup=2)
                enqueued = enqueue_seconds(fn, *args, calls=calls)
                rounds = rounds_for(enqueued, seconds, copies, chainable(got, *args),
                                    compile_s=seconds_to_compile)
                if rounds > 1:      # host-bound: the same arguments, more device work per call
                    try:
                        fn = jax.jit(over_copies(c.fn, rounds)).lower(*args).compile()
                        jax.block_until_ready(fn(*args))
                        seconds = median_seconds(fn, *args, calls=calls, repeats=repeats,
                                                 warmup=1) / rounds
                        enqueued = enqueue_seconds(fn, *args, calls=calls) / rounds
                    except Exception as e:   # the one-round timing stands
                        warnings.warn(f"path choice: candidate {c.name!r} failed over {rounds} "
                                      f"rounds ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:200]}); its host-bound timing "
                                      "stands")
                        rounds = 1
                out[c.name] = 1e6 * seconds / copies
                timed[c.name] = (fn, rounds)
                enqueues[c.name] = 1e6 * enqueued / copies
                if rounds_us is not None:
                    rounds_us[c.name] = rounds
            except Exception as e:   # a path that fails to compile or run is never chosen
                warnings.warn(f"path choice: candidate {c.name!r} failed while measured "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              "it is not chosen")
                out[c.name] = float("inf")
        if enqueue_us is not None:
            enqueue_us.update(enqueues)
        if device and any(enqueues[n] >= HOST_BOUND * out[n] for n in timed):
            # Host-bound even over rounds: the wall clock compares dispatch. Every candidate is
            # timed again by its device time, so all of them are compared the same way.
            by_device = {}
            for name, (fn, rounds) in timed.items():
                dt = device_timing.device_seconds(fn, *args, calls=calls)
                if dt is None:
                    break
                by_device[name] = 1e6 * dt.seconds / (rounds * copies)
            else:
                if wall_us is not None:
                    wall_us.update({n: out[n] for n in timed})
                out.update(by_device)
        return out

    with futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run).result()


# --------------------------------------------------------------------------- choosing


def choices_can_vary() -> bool:
    """Whether :func:`choose` can return anything but the deterministic first candidate here:
    a forced path, a measurement on an accelerator, or a remembered choice."""
    m = current_mode()
    if m.startswith("force:"):
        return True
    with _lock:
        remembered = bool(_memory) or bool(_overrides)
    return m != "off" and (_measuring_pays() or remembered or _user_cache_path() is not None)


def _measuring_pays() -> bool:
    """Whether timings here say anything about the device the program targets (not on CPU)."""
    return jax.devices()[0].platform != "cpu"


def _default_choice(candidates: Sequence[Candidate], baseline: str | None, source: str,
                    times: Mapping[str, float] | None = None) -> Choice:
    first = next(c for c in candidates if c.unsupported is None)
    return Choice(first.name, first.label, source, dict(times or {}), baseline)


def choose(op: str, signature: str, candidates: Sequence[Candidate], arg_specs: Sequence, *,
           baseline: str | None = None, check: bool = False,
           flops: float | None = None, copies: int | None = None,
           reference: Candidate | None = None, reference_specs: Sequence | None = None) -> Choice:
    """The path for one site.

    Args:
      op: the operation's name (``"block_sparse_matmul"``, ``"monarch_matmul"``, ...).
      signature: everything besides the device that decides the winner (shapes,
        dtype, density, block), as a stable string.
      candidates: the paths in order of preference; at least one must be supported
        (the XLA one always is).
      arg_specs: ShapeDtypeStructs of ``fn``'s array arguments (random inputs are
        drawn for measurement), or concrete values passed as they are.
      baseline: the candidate the report compares against (XLA's dense product).
      check: the candidates compute the same function of the same arguments, so each
        measured one is checked against ``baseline`` on the device first (see the
        module doc); leave it off where they read different forms of the inputs.
      flops: the site's work, where the caller knows it: a compute-bound site (see
        :func:`copies_for`) is timed over two input sets instead of enough to stream
        past the L2, so each candidate is compiled with fewer copies inside its jit.
      copies: how many input sets one timed call runs over, where the caller knows better
        than :func:`copies_for` (a decode site sizes them by its weight alone).
      reference: what the dense program computes at this site, on its own arguments
        (``reference_specs``), where that is not a path the site can take: a factorized
        site holds no dense matrix, so its ``xla_dense`` candidate rebuilds one from the
        factors (and, differentiated, takes the rebuild's backward too), which is no
        measure of what the dense model pays. The reference is timed beside the
        candidates and is the baseline the report compares against; it is never chosen.
    """
    supported = [c for c in candidates if c.unsupported is None]
    if not supported:
        raise ValueError(f"{op}: no candidate path is supported here: "
                         + "; ".join(f"{c.name}: {c.unsupported}" for c in candidates))
    choice = _choose(op, signature, supported, arg_specs, baseline=baseline, check=check,
                     flops=flops, copies=copies, reference=reference,
                     reference_specs=reference_specs)
    with _lock:
        for seen in _recorders:
            seen[f"{op}|{signature}"] = (choice, tuple(c.name for c in supported),
                                         tuple(c.name for c in supported if c.movable))
    return choice


def _choose(op, signature, supported, arg_specs, *, baseline, check, flops, copies, reference,
            reference_specs) -> Choice:
    m = current_mode()
    if m.startswith("force:"):
        want = m[len("force:"):]
        for c in supported:
            if c.name == want:
                return Choice(c.name, c.label, "forced", {}, baseline)
        return _default_choice(supported, baseline, "default")
    if m == "off" or len(supported) == 1:
        return _default_choice(supported, baseline, "default")
    key = f"{op}|{signature}"
    names = {c.name for c in supported}
    entry, source = _lookup(key, tables=m != "measure") or ({}, None)
    with _lock:
        verdict = _overrides.get(key)
    path = entry.get("path")
    if verdict in names:                     # a program-level verdict in force (overriding)
        path, source = verdict, "program"
    elif "program_us" in entry:              # one remembered (program_tuning)
        source = "program"
    if path in names:
        c = next(c for c in supported if c.name == path)
        known = entry.get("times_us", {})
        if reference is not None and reference.name in known:
            baseline = reference.name
        return Choice(c.name, c.label, source, known, baseline, entry.get("timed_by", "wall"))
    if m == "table" or not _measuring_pays():
        return _default_choice(supported, baseline, "default")
    logging = os.environ.get("SPARSEJAX_PATHS_LOG", "") not in ("", "0")
    if logging:     # before: a candidate that hangs on the device still names its signature
        print(f"path choice: measuring {key}: {', '.join(c.name for c in supported)}",
              file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    first: dict = {}
    copies = copies_for(arg_specs, flops) if copies is None else copies
    enqueue, rounds, wall = {}, {}, {}
    times = measure(supported, arg_specs, reference=baseline if check and baseline in names else None,
                    first_call_s=first, copies=copies, enqueue_us=enqueue, rounds_us=rounds,
                    wall_us=wall)
    best = min(times, key=times.get)   # the candidates only: the reference joins below
    if reference is not None:
        # Timed apart: it reads its own arguments (the dense weight), and is no candidate.
        # Over as many input sets as the candidates: timed the same way.
        ref_time = measure([reference], reference_specs, first_call_s=first,
                           copies=copies, enqueue_us=enqueue, rounds_us=rounds,
                           wall_us=wall).get(reference.name)
        if ref_time is not None:
            times = {**times, reference.name: ref_time}
            baseline = reference.name
    if logging:
        shown = ", ".join(f"{k} {v:.1f}" for k, v in times.items())
        compiled = ", ".join(f"{k} {v:.1f}" for k, v in first.items())
        enqueued = ", ".join(f"{k} {v:.1f}" for k, v in enqueue.items())
        rounded = ", ".join(f"{k} {v}" for k, v in rounds.items() if v > 1) or "none"
        print(f"path choice: {key}: {best} ({shown} µs; {time.perf_counter() - t0:.1f} s, first "
              f"calls {compiled} s; host enqueue {enqueued} µs; {copies} input sets, rounds "
              f"{rounded})", file=sys.stderr, flush=True)
        if wall:
            walls = ", ".join(f"{k} {v:.1f}" for k, v in wall.items())
            print(f"path choice: {key}: timed by device time (profiler): the wall-clock times "
                  f"({walls} µs) were host-bound", file=sys.stderr, flush=True)
        bound = sorted(k for k, v in enqueue.items()
                       if k in times and k not in wall and v >= HOST_BOUND * times[k])
        if bound:
            print(f"path choice: {key}: host-bound timing of {', '.join(bound)} even so (the "
                  f"host's enqueue is at least {HOST_BOUND} of the time: it compares dispatch, "
                  f"not the device)", file=sys.stderr, flush=True)
    entry = {"path": best, "times_us": {k: round(v, 2) for k, v in times.items()}}
    if wall:
        entry["timed_by"] = "device"      # the profiler's device time, see measure()
    _remember(key, entry)
    c = next(c for c in supported if c.name == best)
    return Choice(c.name, c.label, "measured", times, baseline, "device" if wall else "wall")


def write_table(path, entries: Mapping[str, dict] | None = None, device=None) -> None:
    """Writes ``entries`` (default: this process's measurements) as a shippable table file."""
    entries = dict(cache_entries() if entries is None else entries)
    pathlib.Path(path).write_text(json.dumps({"device": device_key(device), "entries": entries},
                                             indent=1, sort_keys=True))
