"""Path choice for decode sites, measured the way a decode step runs: weights not in cache.

A decode GEMV is memory-bound, so a measurement that reruns it on one weight
measures the L2 cache (60 MB on an H200), not memory: a 42 MB weight stays
resident and XLA's dense GEMV looks several times faster than it is in a model
whose weights stream from HBM. :func:`choose_streaming` times every candidate
over enough copies of the weight to exceed the cache (separate buffers, one jit
looping over them) and reports per-copy times.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from sparsejax.kernels import path_choice

__all__ = ["choose_streaming", "L2_BYTES"]

L2_BYTES = 60e6


def _copies(spec) -> int:
    nbytes = math.prod(spec.shape) * jnp.dtype(spec.dtype).itemsize
    return max(1, min(32, math.ceil(2.5 * L2_BYTES / max(nbytes, 1))))


def choose_streaming(op: str, signature: str, candidates, arg_specs, *,
                     weight_args: tuple[int, ...], baseline: str | None = None,
                     check: bool = False) -> path_choice.Choice:
    """:func:`path_choice.choose` with every candidate timed over enough different input
    sets that the arguments ``weight_args`` (ShapeDtypeStructs: the weight, or the
    alternative forms of it that different candidates read) stream from memory, as in
    a model. The choice's times are per input set; ``check``: see
    :func:`path_choice.choose`."""
    copies = min(_copies(arg_specs[i]) for i in weight_args)
    return path_choice.choose(op, f"{signature}|streamed", candidates, arg_specs,
                              baseline=baseline, check=check, copies=copies)
