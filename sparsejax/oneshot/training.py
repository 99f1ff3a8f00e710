"""``train.py --oneshot=METHOD --init_from=<dense run>``: prune a trained run, then fine-tune.

The run's recipe (a preset whose masks are fixed, such as ``nm24``, or a
``.json`` recipe of ``Prune``/``NM`` rules) says which weights and what
structure; the method (magnitude, wanda, sparsegpt, dsnot) chooses the masks
on ``--oneshot_batches`` training batches. The held-out loss is measured
before and after pruning and written, with the per-site report, to
``<workdir>/oneshot.txt``; training then continues for ``--steps`` steps with
the masks fixed.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sparsejax.oneshot.driver import METHODS, oneshot


def check_flags(cfg) -> None:
    """One-line errors for the one-shot flags, before anything is compiled."""
    if not cfg.oneshot:
        return
    if cfg.oneshot not in METHODS:
        raise ValueError(f"--oneshot={cfg.oneshot!r}: use one of {', '.join(METHODS)}")
    if not cfg.init_from:
        raise ValueError("--oneshot prunes a trained model: give --init_from=<workdir of a dense run>")
    if cfg.oneshot_batches < 1:
        raise ValueError(f"--oneshot_batches must be positive, got {cfg.oneshot_batches}")


def prune_run(cfg, run, sfn, sparams, sstate, loss_and_metrics: Callable) -> tuple[Any, dict]:
    """Prunes ``sparams`` (the ``--init_from`` weights) with ``--oneshot``; returns (params, sstate)."""
    check_flags(cfg)
    if run.preset.masks_from != "recipe":
        raise ValueError(f"--oneshot with --recipe={cfg.recipe}: that preset's masks are updated by "
                         "its optimizer; give a recipe with fixed masks (nm24 or a .json recipe of "
                         "Prune/NM rules)")
    inputs = lambda batch: batch["inputs"] if "inputs" in batch else batch["images"]
    calib = [(jnp.asarray(inputs(run.train_batches.batch(i))),) for i in range(cfg.oneshot_batches)]
    apply = jax.jit(run.model.apply)

    def evaluate(params) -> float:
        total = weight = 0.0
        for batch in run.eval_batches():
            _, m = loss_and_metrics(apply(params, jnp.asarray(inputs(batch))),
                                    jax.tree.map(jnp.asarray, batch))
            total += float(m["loss"]) * float(m["weight"])
            weight += float(m["weight"])
        return total / max(weight, 1.0)

    before = evaluate(sparams)
    result = oneshot(run.model.apply, sparams, calib, sfn.recipe, method=cfg.oneshot, progress=print)
    after = evaluate(result.params)
    lines = [f"one-shot {cfg.oneshot} on {cfg.init_from} with recipe {cfg.recipe}: eval loss "
             f"{before:.4f} -> {after:.4f} (perplexity {math.exp(before):.3f} -> {math.exp(after):.3f})",
             str(result.report)]
    print(lines[0])
    if jax.process_index() == 0:
        os.makedirs(cfg.workdir, exist_ok=True)
        with open(os.path.join(cfg.workdir, "oneshot.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return result.params, {**sstate, "masks": result.sstate["masks"]}
