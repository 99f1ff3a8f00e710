"""Sparsity schedules: what sparsity the masks have at a step, and when they change.

A :class:`SparsitySchedule` answers two questions for a (possibly traced) step:
``sparsity(step)`` and ``is_update(step)`` (whether masks are recomputed at that
step). Constructors:

* :func:`one_shot`: prune once, at ``step``.
* :func:`gradual`: gradual magnitude pruning (Zhu & Gupta, 2017),
  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** power`` (power 3 by
  default), masks recomputed every ``frequency`` steps from ``begin_step`` and at
  ``end_step``, where ``s_f`` is reached exactly.
* :func:`iterative`: iterative magnitude pruning, ``rounds`` rounds of
  ``round_length`` steps; after round ``r`` the sparsity is
  ``1 - (1 - s_f) ** (r / rounds)`` (a constant fraction of the survivors goes
  each round). Pair it with ``prune(..., rewind_step=...)`` for rewinding.

Plus the scalar schedules that dynamic sparse training and progressive N:M use:
:func:`cosine_drop_fraction`, :func:`linear_decay`, :func:`exponential_decay`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

__all__ = [
    "SparsitySchedule",
    "one_shot",
    "gradual",
    "iterative",
    "cosine_drop_fraction",
    "linear_decay",
    "exponential_decay",
    "check_sparsity_arg",
    "check_steps",
]


def check_sparsity_arg(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a sparsity in [0, 1), got {value!r}")
    return float(value)


def check_steps(begin: int, end: int, begin_name: str = "begin_step",
                end_name: str = "end_step") -> None:
    for v, n in ((begin, begin_name), (end, end_name)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{n} must be a non-negative int, got {v!r}")
    if end < begin:
        raise ValueError(f"the schedule ends before it begins: {end_name}={end} < {begin_name}={begin}")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class SparsitySchedule:
    """Target sparsity per step and the steps where masks are recomputed (jit-able)."""

    sparsity_fn: Callable
    update_fn: Callable
    final_sparsity: float
    last_update_step: int
    description: str

    def sparsity(self, step):
        return self.sparsity_fn(jnp.asarray(step))

    def is_update(self, step):
        return self.update_fn(jnp.asarray(step))

    def __repr__(self) -> str:
        return f"SparsitySchedule({self.description})"


def one_shot(sparsity: float, step: int = 0) -> SparsitySchedule:
    """Prune to ``sparsity`` once, at ``step`` (0: at the first update)."""
    s = check_sparsity_arg(sparsity, "sparsity")
    check_steps(step, step, "step", "step")
    return SparsitySchedule(
        sparsity_fn=lambda t: jnp.where(t >= step, s, 0.0),
        update_fn=lambda t: t == step,
        final_sparsity=s, last_update_step=step,
        description=f"one_shot({s}, step={step})")


def gradual(final_sparsity: float, begin_step: int, end_step: int, frequency: int = 100,
            initial_sparsity: float = 0.0, power: float = 3.0) -> SparsitySchedule:
    """Gradual magnitude pruning's polynomial (cubic) schedule from ``s_i`` to ``s_f``."""
    s_f = check_sparsity_arg(final_sparsity, "final_sparsity")
    s_i = check_sparsity_arg(initial_sparsity, "initial_sparsity")
    check_steps(begin_step, end_step)
    frequency = _positive_int(frequency, "frequency")
    span = max(end_step - begin_step, 1)

    def sparsity_fn(t):
        progress = jnp.clip((t - begin_step) / span, 0.0, 1.0)
        return s_f + (s_i - s_f) * (1.0 - progress) ** power

    def update_fn(t):
        on_grid = (t >= begin_step) & (t <= end_step) & ((t - begin_step) % frequency == 0)
        return on_grid | (t == end_step)

    return SparsitySchedule(
        sparsity_fn, update_fn, s_f, end_step,
        f"gradual({s_i} -> {s_f}, steps {begin_step}..{end_step} every {frequency}, power {power})")


def iterative(final_sparsity: float, rounds: int, round_length: int,
              begin_step: int = 0) -> SparsitySchedule:
    """Iterative pruning: after round ``r`` of ``rounds``, sparsity ``1 - (1 - s_f)**(r/rounds)``."""
    s_f = check_sparsity_arg(final_sparsity, "final_sparsity")
    rounds = _positive_int(rounds, "rounds")
    round_length = _positive_int(round_length, "round_length")
    check_steps(begin_step, begin_step, "begin_step", "begin_step")
    last = begin_step + rounds * round_length

    def round_of(t):
        return jnp.clip((t - begin_step) // round_length, 0, rounds)

    def sparsity_fn(t):
        r = round_of(t).astype(jnp.float32)
        return 1.0 - (1.0 - s_f) ** (r / rounds)

    def update_fn(t):
        return (t > begin_step) & (t <= last) & ((t - begin_step) % round_length == 0)

    return SparsitySchedule(sparsity_fn, update_fn, s_f, last,
                            f"iterative({s_f}, {rounds} rounds of {round_length} from {begin_step})")


def cosine_drop_fraction(initial: float, end_step: int) -> Callable:
    """RigL's drop fraction ``initial / 2 * (1 + cos(pi * t / end_step))``, 0 after ``end_step``."""
    if not 0.0 <= initial <= 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1], got {initial!r}")
    _positive_int(end_step, "end_step")

    def fn(t):
        t = jnp.asarray(t, jnp.float32)
        value = 0.5 * initial * (1.0 + jnp.cos(jnp.pi * jnp.minimum(t, end_step) / end_step))
        return jnp.where(t < end_step, value, 0.0)

    return fn


def linear_decay(begin_step: int, end_step: int) -> Callable:
    """1 before ``begin_step``, falling linearly to 0 at ``end_step``."""
    check_steps(begin_step, end_step)
    span = max(end_step - begin_step, 1)
    return lambda t: jnp.clip(1.0 - (jnp.asarray(t, jnp.float32) - begin_step) / span, 0.0, 1.0)


def exponential_decay(begin_step: int, end_step: int, rate: float = 5.0) -> Callable:
    """1 before ``begin_step``, ``exp(-rate * progress)`` after, exactly 0 from ``end_step``."""
    check_steps(begin_step, end_step)
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate!r}")
    span = max(end_step - begin_step, 1)

    def fn(t):
        progress = jnp.clip((jnp.asarray(t, jnp.float32) - begin_step) / span, 0.0, 1.0)
        return jnp.where(progress >= 1.0, 0.0, jnp.exp(-rate * progress))

    return fn

