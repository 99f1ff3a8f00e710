"""Timing and error helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def median_seconds(fn, *args, calls: int = 10, repeats: int = 15, warmup: int = 3) -> float:
    """Median over ``repeats`` of the mean time of ``calls`` back-to-back calls, after warm-up.

    Back-to-back calls keep the device queue full, so launch gaps of one call do not count.
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


def rel_err(a, b) -> float:
    """``‖a − b‖ / ‖b‖`` in float64; NaN when ``a`` has a non-finite entry."""
    a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
    if not np.isfinite(a).all():
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
