"""A dense LM trained with train.py's own loop, for benchmarks that start from one.

``train_dense_lm(args)`` trains train.py's LM dense on its corpus with ``args``' sizes
(d_model, n_layers, n_heads, d_ff, steps, batch_size, seq_len, learning_rate, eval_batches,
calib_batches, workdir) and returns the run, its params, calibration batches the run never
saw, the held-out batches and a perplexity function (used by activation_quality.py).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # train.py; the package comes from the install (or device_env.sh)
    sys.path.append(ROOT)

import train  # noqa: E402
from sparsejax.models import transformer  # noqa: E402


class DenseLM(NamedTuple):
    run: Any
    model: Any
    params: Any
    n_params: int
    calib: list
    evals: list
    perplexity: Callable
    train_seconds: float


def train_dense_lm(args) -> DenseLM:
    """Trains train.py's LM dense (its corpus, its loop) with ``args``' sizes; returns the run,
    its params, calibration batches (training-split positions the run never saw), the
    held-out batches and ``perplexity(params, apply=None)`` on them."""
    workdir = args.workdir or tempfile.mkdtemp(prefix="dense_lm_")
    cfg = train.Config(recipe="dense", steps=args.steps, batch_size=args.batch_size,
                       seq_len=args.seq_len, d_model=args.d_model, n_layers=args.n_layers,
                       n_heads=args.n_heads, d_ff=args.d_ff, learning_rate=args.learning_rate,
                       eval_every=args.steps, checkpoint_every=args.steps, log_every=max(args.steps // 10, 1),
                       eval_batches=args.eval_batches, workdir=workdir)
    run = train.prepare(cfg)
    t0 = time.time()
    trained = train.train_and_evaluate(run)
    train_seconds = time.time() - t0
    params = jax.device_get(trained["sfn"].dense_params(trained["state"].params, trained["state"].sstate))
    model = run.model
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

    # Calibration: training-split batches the dense run never saw (positions after its last step).
    calib = [(jnp.asarray(run.train_batches.batch(args.steps + 1000 + i)["inputs"]),)
             for i in range(args.calib_batches)]
    evals = list(run.eval_batches())
    apply = jax.jit(model.apply)

    def perplexity(p, apply_fn=None):
        total, weight = 0.0, 0.0
        for b in evals:
            w = jnp.asarray(b["weights"])
            logits = (apply_fn or apply)(p, jnp.asarray(b["inputs"]))
            loss = transformer.lm_loss(logits, jnp.asarray(b["targets"]), w)
            total += float(loss) * float(jnp.sum(w))
            weight += float(jnp.sum(w))
        return math.exp(total / weight)

    return DenseLM(run, model, params, n_params, calib, evals, perplexity, train_seconds)


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       text=True).strip()
    except Exception:
        return "unknown"

