"""What a one-shot method must produce: the sparsity structure of one ``(K, N)`` matrix.

``K`` is the matmul's input (reduction) axis, ``N`` its outputs, as in
:mod:`sparsejax.masks`. Three structures, each met exactly:

* ``"matrix"``: unstructured, the given fraction of the whole matrix pruned;
* ``"per_output"``: unstructured, the same fraction pruned in every output
  (Wanda's comparison group: each output column of ``W (K, N)``);
* ``"nm"``: ``n`` kept in every ``m`` consecutive inputs of every output.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import masks as mask_math

KINDS = ("matrix", "per_output", "nm")


@dataclasses.dataclass(frozen=True)
class Structure:
    kind: str
    sparsity: float
    n: int = 0
    m: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"structure kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "nm" and not 0 < self.n <= self.m:
            raise ValueError(f"N:M structure needs 0 < n <= m, got {self.n}:{self.m}")

    @classmethod
    def nm(cls, n: int, m: int) -> "Structure":
        return cls("nm", 1.0 - n / m, n, m)

    def static_key(self) -> "Structure":
        """What a compiled solver depends on: the kind and n:m, not an unstructured sparsity
        (that reaches the solvers as counts), so 50/60/70% share one compiled program."""
        return self if self.kind == "nm" else Structure(self.kind, 0.0)

    def describe(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        return f"{self.sparsity:.0%} {'per output' if self.kind == 'per_output' else 'unstructured'}"

    def keep(self, scores: jax.Array) -> jax.Array:
        """The exact mask of this structure keeping the highest ``scores`` (K, N)."""
        if self.kind == "matrix":
            return mask_math.unstructured_mask(scores, self.sparsity)
        if self.kind == "per_output":
            return mask_math.keep_fraction(scores.T, self.sparsity).T
        return mask_math.nm_mask(scores, self.n, self.m)

    def pruned_count(self, k: int, n: int) -> int:
        """Weights pruned in a ``(k, n)`` matrix (all outputs together)."""
        if self.kind == "matrix":
            return k * n - mask_math.kept_count(k * n, self.sparsity)
        if self.kind == "per_output":
            return n * (k - mask_math.kept_count(k, self.sparsity))
        return n * (k // self.m) * (self.m - self.n)

    def block_counts(self, k: int, n: int, block: int) -> np.ndarray:
        """Weights to prune in each block of ``block`` inputs (per output for "per_output"),
        spread so that the blocks add up to the exact total."""
        blocks = k // block
        total = self.pruned_count(k, n) // (n if self.kind == "per_output" else 1)
        edges = (np.arange(blocks + 1, dtype=np.int64) * total) // blocks
        return np.diff(edges).astype(np.int32)


def reconstruction_error(w: jax.Array, w_hat: jax.Array, gram: jax.Array) -> jax.Array:
    """``‖XW − XŴ‖²_F`` from the Gram ``XᵀX``: ``tr(ΔᵀGΔ)`` with ``Δ = W − Ŵ``."""
    delta = (w - w_hat).astype(jnp.float32)
    return jnp.sum(delta * jnp.matmul(gram, delta, precision=jax.lax.Precision.HIGHEST))


def output_energy(w: jax.Array, gram: jax.Array) -> jax.Array:
    """``‖XW‖²_F``: the scale reconstruction errors are reported relative to."""
    w = w.astype(jnp.float32)
    return jnp.sum(w * jnp.matmul(gram, w, precision=jax.lax.Precision.HIGHEST))
