"""Path choices checked against the whole program: where per-site timing is not enough.

:func:`sparsejax.kernels.path_choice.choose` times each site's candidates alone. That is
the right first answer, and the only affordable one for every site, but it cannot see
how sites compose: on an H200, a 90% block-sparse LM's batch-1 decode step ran at 1.00×
of dense with the per-site choices (XLA's GEMV won two sites by 2-3 µs timed alone) and
at 1.18× with the block-sparse kernel at every site. :func:`tune` settles such close
calls by timing the program itself:

1. trace and time ``step`` once, recording every choice its sites make;
2. where any site took a path other than its fallback (XLA's product, the path the dense
   program's own site takes), time the program with every such site on its fallback at
   once: the program-level form of "never slower than dense". Sites timed alone can each
   win and still lose together (a decode step whose Pallas GEMVs each measured faster ran
   at 0.70× of the same model on XLA). Where that program is faster it is kept, and each
   site is then tried back on its own choice, one at a time, as a switch like those below;
3. on a GPU, time the program under each of ``compiler_trials`` (XLA options for the step's
   own compile): a program the rewrite filled with small batched products and transposes
   can compile worse than its sites did alone. On an H200 a Monarch(4) LM's training step
   took 87.0 ms with XLA's default GEMM fusions (Triton kernels around the Monarch einsums
   and their transposes) and 74.7 ms with them off for the whole process (``XLA_FLAGS``;
   cuBLAS), while the dense step stayed at 73-74 ms either way. An option set that makes
   the step faster is kept in ``Tuning.compiler_options`` (the caller passes it to its
   ``jax.jit``), and the trials after it compile under it. It goes before the close calls:
   one trial, where the gain may be largest, and a budget spent on close calls would never
   reach it;
4. for each signature whose other candidates measured within ``margin`` of the winner,
   retrace and time the program with that signature on each of them (one switch at a time,
   greedily, keeping each switch that makes the program faster by more than ``min_gain``,
   against the program without it timed again right after: a GPU's timings drift over the
   minutes a tuning takes, so a switch is not credited with what the drift gave);
   likewise for each *movable* path (``Candidate.movable``), whose time alone overstates its
   cost in the program whatever it measured (a Monarch weight that a scan can rebuild once
   for every layer);
5. keep the verdicts (:func:`path_choice.remember_program_verdict`): later traces take
   them from the cache (and the user cache file, ``SPARSEJAX_PATH_CACHE``), and the
   report says so.

Every trial is a fresh trace and compile of ``step``: the caller passes a plain function
(a ``jax.jit``-wrapped one is unwrapped) and ``invalidate``, which drops whatever cached the
rewritten programs (:meth:`sparsejax.SparseFunction.invalidate`). On the CPU no site has
measured times, so there is nothing to settle and :func:`tune` only times the program once.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import jax

from sparsejax.kernels import path_choice

__all__ = ["COMPILER_OPTIONS", "EVERY_SITE", "GPU_COMPILER_TRIALS", "Trial", "Tuning", "close_calls",
           "fallbacks", "tune"]

# The key a trial of every site on its fallback at once is reported under.
EVERY_SITE = "every site not on its fallback"
# The key a trial of XLA options for the step's compile is reported under.
COMPILER_OPTIONS = "XLA options for the step's compile"
# XLA options tried on a GPU (``tune``'s default ``compiler_trials``): the GEMM fusions that
# XLA emits as Triton kernels, off (every dot a cuBLAS call, its operands' transposes separate).
GPU_COMPILER_TRIALS = ({"xla_gpu_enable_triton_gemm": False},)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One program timed with ``key`` switched from ``was`` to ``path``."""

    key: str
    was: str
    path: str
    site_us: tuple[float, float]        # the site alone: (was, path)
    program_s: float                    # the program with this switch (and those kept before)
    kept: bool
    # The program without this switch timed again after it (only where the switch beat the
    # earlier time of that program): the time a kept switch has beaten.
    incumbent_s: float | None = None


@dataclasses.dataclass(frozen=True)
class Tuning:
    """What :func:`tune` found: the program's time with the per-site choices, every trial,
    the verdicts kept (``{key: path}``) and the final time."""

    base_s: float
    trials: tuple[Trial, ...]
    verdicts: dict
    final_s: float
    # XLA options the step compiled faster with: pass them on, ``jax.jit(step,
    # compiler_options=tuning.compiler_options)`` (empty: the defaults won).
    compiler_options: dict = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"program {self.base_s * 1e3:.3f} ms with the per-site choices, "
                 f"{self.final_s * 1e3:.3f} ms tuned ({self.base_s / self.final_s:.2f}×)"]
        for t in self.trials:
            again = ("" if t.incumbent_s is None else
                     f" against {t.incumbent_s * 1e3:.3f} ms without it, timed again")
            alone = ("" if t.key == COMPILER_OPTIONS else
                     f"alone {t.site_us[0]:.1f} vs {t.site_us[1]:.1f} µs; ")
            lines.append(f"  {'kept' if t.kept else 'not kept'}: {t.key}: {t.was} -> {t.path} "
                         f"({alone}program {t.program_s * 1e3:.3f} ms{again})")
        if self.compiler_options:
            lines.append(f"  compile the step with jax.jit(..., compiler_options="
                         f"{self.compiler_options!r})")
        return "\n".join(lines)


def close_calls(recorded: dict, margin: float) -> list[tuple[str, str, str, float, float]]:
    """``(key, chosen, alternative, chosen_us, alternative_us)`` for each recorded choice and
    each of its other candidates (supported, with a measured time) within ``margin`` (a
    fraction: 0.25 = 25% slower) of the chosen path, not only the runner-up: the third-fastest
    alone may be the one that composes best (a kernel whose output layout XLA fuses into the
    next op, say); and for each movable candidate (``Candidate.movable``: its time alone
    overstates its cost in a program) not chosen, whatever it measured; closest first."""
    out = []
    for key, (choice, names, *movable) in recorded.items():
        times = {n: t for n, t in choice.times_us.items() if n in names}
        if choice.name not in times or len(times) < 2:
            continue
        mine = times[choice.name]
        tried = set()
        for name in sorted((n for n in times if n != choice.name), key=times.get):
            if times[name] <= (1.0 + margin) * mine:
                out.append((key, choice.name, name, mine, times[name]))
                tried.add(name)
        for name in (movable[0] if movable else ()):
            if name != choice.name and name in times and name not in tried:
                out.append((key, choice.name, name, mine, times[name]))
    return sorted(out, key=lambda c: c[4] / max(c[3], 1e-9))


def fallbacks(recorded: dict) -> dict[str, str]:
    """``{key: path}``: each recorded site that took a path other than its fallback, and that
    fallback: the choice's baseline where it is one of the site's candidates (XLA's product),
    else its ``xla_dense`` candidate (a factorized site's baseline is the dense program's own
    product, which it cannot take; its dense matrix rebuilt from the factors is the nearest)."""
    out = {}
    for key, (choice, names, *_) in recorded.items():
        fallback = (choice.baseline if choice.baseline in names else
                    "xla_dense" if "xla_dense" in names else None)
        if fallback is not None and choice.name != fallback:
            out[key] = fallback
    return out


def _program_seconds(step: Callable, args: Sequence, repeats: int,
                     compiler_options: dict | None = None) -> float:
    fn = jax.jit(step, compiler_options=compiler_options or None)
    return path_choice.median_seconds(fn, *args, calls=5, repeats=repeats, warmup=2)


def _options_label(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def tune(step: Callable, *args, invalidate: Callable[[], None], margin: float = 0.25,
         min_gain: float = 0.01, repeats: int = 15, max_trials: int = 8,
         budget_s: float | None = None,
         timer: Callable[..., float] | None = None,
         compiler_trials: Sequence[dict] | None = None) -> Tuning:
    """Settles close per-site path choices by timing ``step(*args)`` as a whole.

    Args:
      step: the program (a forward, a decode step, a training step) that calls one or more
        sparsified functions; plain, so that each trial traces it anew.
      args: its arguments.
      invalidate: drops the cached rewritten programs, so the next trace chooses again
        (``SparseFunction.invalidate``, or a function calling it on several).
      margin: which choices are close: an alternative measured at most this fraction slower.
      min_gain: a switch is kept only if the program gets faster by more than this fraction
        (timing noise on a GPU is about 1%), both against the best time so far and against
        the program without the switch timed again after it.
      repeats, max_trials: timing repeats per program, and at most this many switches tried.
      budget_s: no trial starts once this many seconds have passed (each trial compiles the
        whole step: tens of seconds for a training step on a GPU); the closest calls go first.
      timer: ``timer(step, args) -> seconds`` (default: jit, warm up, median of back-to-back
        calls); for a compiler trial it is called as ``timer(step, args, compiler_options=...)``.
      compiler_trials: XLA option sets to try the program under, one at a time, after the
        fallback trial and before the close calls (default: :data:`GPU_COMPILER_TRIALS` on a
        GPU, none elsewhere). The first that makes the program faster by more than
        ``min_gain`` lands in ``Tuning.compiler_options``.
    """
    step = getattr(step, "__wrapped__", step)      # a jitted step would not retrace
    timer = timer or (lambda f, a, **kw: _program_seconds(f, a, repeats, **kw))
    if compiler_trials is None:
        compiler_trials = GPU_COMPILER_TRIALS if jax.default_backend() == "gpu" else ()

    def timed(options: dict | None = None) -> float:
        # JAX caches a function's trace by its identity: a new one per trial retraces it.
        kwargs = {"compiler_options": options} if options else {}
        return timer(lambda *a: step(*a), args, **kwargs)

    start = time.perf_counter()
    invalidate()
    with path_choice.recording() as recorded:
        base = timed()
    recorded = dict(recorded)
    verdicts: dict[str, str] = {}
    best, trials = base, []
    kept_switches = []          # (key, was, path, program seconds) to remember

    def out_of_time() -> bool:
        return budget_s is not None and time.perf_counter() - start > budget_s

    options: dict = {}      # the XLA options kept: every later trial compiles under them

    def trial(switches: dict, try_options: dict | None = None) -> tuple[float, float | None, bool]:
        """The program with ``switches`` on top of the verdicts so far, compiled with
        ``try_options`` (else the options kept): its time, the incumbent's time taken again
        after it (where it beat the best so far), kept or not."""
        invalidate()
        with path_choice.overriding({**verdicts, **switches}):
            t = timed(options if try_options is None else try_options)
        again = None
        if t < best * (1.0 - min_gain):
            invalidate()
            with path_choice.overriding(dict(verdicts)):
                again = timed(options)
        return t, again, again is not None and t < again * (1.0 - min_gain)

    candidates = close_calls(recorded, margin)
    fallback = fallbacks(recorded)
    if fallback and not out_of_time():
        t, again, kept = trial(fallback)
        chosen = sum(recorded[k][0].times_us.get(recorded[k][0].name, math.nan) for k in fallback)
        alone = sum(recorded[k][0].times_us.get(p, math.nan) for k, p in fallback.items())
        if len(fallback) == 1:      # one site: the trial is that site's own switch
            (key, path), = fallback.items()
            trials.append(Trial(key, recorded[key][0].name, path, (chosen, alone), t, kept, again))
            candidates = [c for c in candidates if (c[0], c[2]) != (key, path)]
        else:
            trials.append(Trial(EVERY_SITE, "their own choices", "their fallbacks", (chosen, alone),
                                t, kept, again))
        if kept:
            verdicts.update(fallback)
            best = t
            kept_switches += [(k, recorded[k][0].name, p, again, t) for k, p in fallback.items()]
            # Each site may still do better on its own choice, or on a close alternative.
            candidates = ([(k, p, recorded[k][0].name, *(recorded[k][0].times_us.get(n, math.nan)
                                                          for n in (p, recorded[k][0].name)))
                           for k, p in fallback.items()]
                          + [c for c in candidates if c[2] != fallback.get(c[0])])
        elif again is not None:
            best = again
    for candidate in compiler_trials:
        if out_of_time():
            break
        t, again, kept = trial({}, dict(candidate))
        trials.append(Trial(COMPILER_OPTIONS, "XLA's defaults", _options_label(candidate),
                            (math.nan, math.nan), t, kept, again))
        if kept:
            options, best = dict(candidate), t
            break       # the first option set that wins: each trial compiles the whole step
        if again is not None:
            best = again
    for key, was, path, was_us, path_us in candidates[:max_trials]:
        if out_of_time():
            break
        was = verdicts.get(key, was)        # the path the site is on now
        if was == path:
            continue
        t, again, kept = trial({key: path})
        trials.append(Trial(key, was, path, (was_us, path_us), t, kept, again))
        if kept:
            verdicts[key], best = path, t
            kept_switches.append((key, was, path, again, t))
        elif again is not None:
            best = again        # the incumbent's latest time: what the next switch must beat
    for key, was, path, was_s, program_s in kept_switches:
        if verdicts.get(key) == path:
            path_choice.remember_program_verdict(key, path, {was: was_s * 1e6,
                                                             path: program_s * 1e6})
    invalidate()
    return Tuning(base, tuple(trials), verdicts, best, options)
