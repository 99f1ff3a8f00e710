"""Wanda (Sun et al., 2024): prune by ``|W_jn| · ‖X_j‖₂``, no weight update.

The score weighs each weight by the norm of the input channel it multiplies,
so a small weight on a loud channel outranks a large weight on a quiet one.
Wanda compares scores within each output (``Structure("per_output", s)``);
the matrix-wide and N:M structures use the same score.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.oneshot.structure import Structure


def wanda_scores(w: jax.Array, input_norm: jax.Array) -> jax.Array:
    """``|W| · ‖X_j‖₂`` for ``w (K, N)`` and the per-input-channel norms ``(K,)``."""
    return jnp.abs(w.astype(jnp.float32)) * input_norm.astype(jnp.float32)[:, None]


def wanda_prune(w: jax.Array, input_norm: jax.Array,
                structure: Structure) -> tuple[jax.Array, jax.Array]:
    """``(W ⊙ mask, mask)``."""
    keep = structure.keep(wanda_scores(w, input_norm))
    return jnp.where(keep, w, 0).astype(w.dtype), keep
