"""Magnitude pruning: keep the largest ``|W|`` (the baseline; no data needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.oneshot.structure import Structure


def magnitude_prune(w: jax.Array, structure: Structure) -> tuple[jax.Array, jax.Array]:
    """``(W ⊙ mask, mask)`` for ``w (K, N)``."""
    keep = structure.keep(jnp.abs(w))
    return jnp.where(keep, w, 0).astype(w.dtype), keep
