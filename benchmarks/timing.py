"""Timing and error helpers shared by the benchmark scripts."""

from __future__ import annotations

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
