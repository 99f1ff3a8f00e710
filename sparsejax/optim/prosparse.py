"""ProSparse's progressive regularisation factor, as an optax schedule.

ProSparse (Song et al., 2024) trains a ReLU-substituted model with an L1 penalty on the
FFN activations whose factor rises in stages, each stage along a quarter sine from the
previous stage's factor to its own, so sparsity grows without a jump in the loss.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax.numpy as jnp
import optax


def prosparse_l1_schedule(stages: Sequence[tuple[int, float]], start: float = 0.0) -> optax.Schedule:
    """``step -> factor``: in stage ``i`` (``stages[i] = (steps, factor)``) the factor rises
    from the previous stage's (``start`` before the first) to ``factor`` as
    ``prev + (factor - prev) * sin(pi/2 * t / steps)``; after the last stage it stays there.
    """
    stages = list(stages)
    if not stages:
        raise ValueError("prosparse_l1_schedule: stages must list (steps, factor) pairs")
    for i, (steps, factor) in enumerate(stages):
        if int(steps) != steps or steps < 1:
            raise ValueError(f"prosparse_l1_schedule: stage {i} has steps={steps!r}; give a "
                             "positive integer")
        if factor < 0:
            raise ValueError(f"prosparse_l1_schedule: stage {i} has factor={factor!r}; "
                             "factors must be >= 0")
    bounds, begin = [], 0
    prev = float(start)
    for steps, factor in stages:
        bounds.append((begin, int(steps), prev, float(factor)))
        begin += int(steps)
        prev = float(factor)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        value = jnp.asarray(prev, jnp.float32)          # after the last stage
        for begin, steps, lo, hi in reversed(bounds):
            t = jnp.clip((count - begin) / steps, 0.0, 1.0)
            inside = lo + (hi - lo) * jnp.sin(0.5 * math.pi * t)
            value = jnp.where(count < begin + steps, inside, value)
        return value

    return schedule
