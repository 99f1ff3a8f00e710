"""Timing and error helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.kernels.path_choice import enqueue_seconds, median_seconds  # noqa: F401  (one timing helper)


def rel_err(a, b) -> float:
    """``‖a − b‖ / ‖b‖`` in float64; NaN when ``a`` has a non-finite entry."""
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    if not np.isfinite(a).all():
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def interleaved_seconds(runs, *, calls: int = 10, repeats: int = 15, warmup: int = 2,
                        steady: bool = False) -> list[float]:
    """Median seconds per call of each ``(fn, args)`` in ``runs``, timed in turn within each
    repeat (A B A B ...): a drift of the device's clocks over the seconds a comparison takes
    moves every time alike, so their ratios hold where times taken one after another do not
    (the same Spark FFN variant measured 36.8 and 53.2 µs in two runs on one H200).

    Each turn starts from an empty queue, so the first call's enqueue and the last call's wait
    add ``1 / calls`` of them to the mean, the more the costlier a call is to dispatch.
    ``steady=True`` takes each turn's time as ``(T(2 calls) - T(calls)) / calls`` instead: the
    fixed costs are in both and cancel, leaving the rate of back-to-back calls once the queue
    runs (a decode loop's, where the host keeps ahead of the device)."""
    for fn, args in runs:
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))

    def turn(fn, args):
        # One repeat of median_seconds: the mean of ``calls`` back-to-back calls.
        once = median_seconds(fn, *args, calls=calls, repeats=1, warmup=0)
        if not steady:
            return once
        twice = median_seconds(fn, *args, calls=2 * calls, repeats=1, warmup=0)
        return 2 * twice - once           # (T(2c) - T(c)) / c from the two means

    times = [[turn(fn, args) for fn, args in runs] for _ in range(repeats)]
    return [statistics.median(t) for t in zip(*times)]
