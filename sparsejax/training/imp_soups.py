"""Iterative magnitude pruning with Sparse Model Soups (Zimmer, Spiegel & Pokutta, 2023).

Each cycle: prune the current model by magnitude to the cycle's sparsity (nested
masks, :func:`sparsejax.optim.magnitude_masks`); retrain ``copies`` copies of it
with that mask fixed, each with its own batch order (and, if given, its own
weight decay); average them into one model (:mod:`sparsejax.soups`: uniform or
greedy), which has the same mask; start the next cycle from the soup. With
``copies=1`` this is plain IMP.

The copies train together: their params and optimizer states are stacked on a
leading axis and one ``jax.vmap``-ed step advances all of them (one compiled
program, one device), or, with ``devices``, that axis is sharded over a
one-axis mesh so each device trains ``copies / len(devices)`` of them.
``parallel="sequential"`` trains them one after another with the same step
(the slow twin the tests compare against).

The driver is model-agnostic: the caller gives the loss, the optimizer, the
batches of each copy and the held-out evaluation (train.py's ``--soup_*`` flags
and ``benchmarks/sparse_soups.py`` build them from train.py's pieces).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparsejax import soups
from sparsejax.optim import allocation, masking, pruning, schedules

__all__ = ["MERGES", "Cycle", "SoupConfig", "SoupRun", "retrain_copies", "run_imp_soups",
           "stack", "unstack"]

MERGES = ("uniform", "greedy")
PARALLEL = ("vmap", "sequential")

# (params, masks, batch) -> (loss, metrics): the training loss with the masks applied.
LossFn = Callable[[Any, Any, dict], tuple[jax.Array, dict]]
# (hyperparameters of one copy, e.g. {"weight_decay": traced scalar}) -> optimizer.
OptimizerFn = Callable[[dict], optax.GradientTransformation]
# (copy, cycle, position) -> a batch (numpy arrays); cycle 0 is the dense pre-training.
BatchFn = Callable[[int, int, int], dict]
# (params, masks) -> held-out metrics with at least "loss".
EvalFn = Callable[[Any, Any], dict]


@dataclasses.dataclass(frozen=True)
class SoupConfig:
    """Settings of an IMP-with-soups run.

    Attributes:
      sparsities: the sparsity each cycle prunes to (rising), e.g. (0.5, 0.75, 0.9).
      steps: retraining steps per copy per cycle.
      copies: models retrained per cycle (m); 1 is plain IMP.
      merge: "uniform" or "greedy" (by held-out loss): which soup the next cycle starts from.
      distribution: how a cycle's sparsity is spread: "global" (one magnitude ranking over
        every masked weight) or "uniform" (per layer), or "erk".
      weight_decays: one weight decay per copy (varied hyperparameters), or None to leave the
        optimizer's own; given to the optimizer function as ``{"weight_decay": ...}``.
      pretrain_steps: dense training before the first prune (0: the given params are trained).
      parallel: "vmap" (all copies in one step) or "sequential" (one after another).
    """

    sparsities: tuple[float, ...] = (0.5, 0.75, 0.9)
    steps: int = 100
    copies: int = 4
    merge: str = "uniform"
    distribution: str = "global"
    weight_decays: tuple[float, ...] | None = None
    pretrain_steps: int = 0
    parallel: str = "vmap"

    def __post_init__(self):
        sparsities = tuple(self.sparsities)
        if not sparsities:
            raise ValueError("sparsities must name at least one cycle's sparsity, e.g. (0.5, 0.75, 0.9)")
        for i, s in enumerate(sparsities):
            schedules.check_sparsity_arg(s, f"sparsities[{i}]")
        if any(b < a for a, b in zip(sparsities, sparsities[1:])):
            raise ValueError(f"sparsities must not fall from one cycle to the next (masks are "
                             f"nested), got {sparsities}")
        for name in ("steps", "copies"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.pretrain_steps, bool) or not isinstance(self.pretrain_steps, int) \
                or self.pretrain_steps < 0:
            raise ValueError(f"pretrain_steps must be a non-negative int, got {self.pretrain_steps!r}")
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}")
        allocation.check_distribution(self.distribution)
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.weight_decays is not None and len(self.weight_decays) != self.copies:
            raise ValueError(f"weight_decays must give one value per copy ({self.copies}), "
                             f"got {len(self.weight_decays)}: {tuple(self.weight_decays)}")
        object.__setattr__(self, "sparsities", tuple(float(s) for s in sparsities))


@dataclasses.dataclass
class Cycle:
    """One prune-retrain-average cycle.

    Attributes:
      index: 1 for the first prune (0 is the dense pre-training, when there is one).
      sparsity: fraction of the masked weights pruned in this cycle's models.
      ingredients: each retrained copy's held-out metrics (mask applied).
      best_single: index of the copy with the lowest held-out loss.
      uniform: the uniform soup's held-out metrics.
      greedy: the greedy soup's held-out metrics.
      greedy_chosen: copies in the greedy soup.
      merged: the metrics of the model the next cycle starts from (``merge``'s soup).
      train_loss: each copy's mean training loss over the cycle's last tenth of steps.
    """

    index: int
    sparsity: float
    ingredients: list[dict]
    best_single: int
    uniform: dict
    greedy: dict
    greedy_chosen: tuple[int, ...]
    merged: dict
    train_loss: list[float]


@dataclasses.dataclass
class SoupRun:
    """The result of :func:`run_imp_soups`: the final soup, its masks, every cycle."""

    params: Any
    masks: Any
    cycles: list[Cycle]
    pretrain: dict | None = None


def stack(trees: Sequence[Any]) -> Any:
    """Pytrees stacked on a new leading axis (``None`` leaves stay ``None``)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, n: int) -> list:
    """The ``n`` pytrees along ``tree``'s leading axis."""
    return [jax.tree.map(lambda x: x[i], tree) for i in range(n)]


def _hyperparams(config: SoupConfig, copies: int) -> dict:
    if config.weight_decays is None:
        return {}
    return {"weight_decay": jnp.asarray(config.weight_decays[:copies], jnp.float32)}


def _train_step(loss_fn: LossFn, make_optimizer: OptimizerFn):
    """One step of one copy, with the masks fixed: pruned weights stay exactly zero."""

    def step(params, opt_state, hparams, masks, batch):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, masks, batch)
        grads = masking.apply_masks(grads, masks)
        updates, opt_state = make_optimizer(hparams).update(grads, opt_state, params)
        params = masking.apply_masks(optax.apply_updates(params, updates), masks)
        return params, opt_state, metrics["loss"]

    return step


@functools.lru_cache(maxsize=32)
def _compiled(loss_fn: LossFn, make_optimizer: OptimizerFn):
    """The jitted init and steps for one (loss, optimizer) pair, kept across cycles and runs:
    masks are arguments, so a new cycle's masks reuse the compiled step."""
    step = _train_step(loss_fn, make_optimizer)
    init = jax.jit(lambda p, h: make_optimizer(h).init(p))
    step_all = jax.jit(jax.vmap(step, in_axes=(0, 0, 0, None, 0)), donate_argnums=(0, 1))
    return init, jax.jit(step), step_all


def retrain_copies(params: Any, masks: Any, *, loss_fn: LossFn, make_optimizer: OptimizerFn,
                   batches: BatchFn, steps: int, copies: int, cycle: int = 1,
                   hyperparams: dict | None = None, parallel: str = "vmap",
                   devices: Sequence[Any] | None = None) -> tuple[Any, np.ndarray]:
    """Trains ``copies`` copies of ``params`` for ``steps`` steps with ``masks`` fixed.

    Copy ``c`` reads ``batches(c, cycle, t)`` at step ``t`` and gets ``hyperparams``
    entries ``[c]`` (each a per-copy array); every copy's optimizer starts fresh.
    Returns the trained params stacked on a leading copy axis and the training
    losses, shape ``(steps, copies)``.
    """
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    hyperparams = dict(hyperparams or {})
    for name, value in hyperparams.items():
        if np.shape(value)[:1] != (copies,):
            raise ValueError(f"hyperparams[{name!r}] must hold one value per copy ({copies}), "
                             f"got shape {np.shape(value)}")
    masks = jax.tree.map(lambda m: None if m is None else jnp.asarray(m, bool), masks,
                         is_leaf=lambda x: x is None)
    params = masking.apply_masks(params, masks)
    init, step_one, step_all = _compiled(loss_fn, make_optimizer)

    def copy_batches(t):
        return [batches(c, cycle, t) for c in range(copies)]

    if parallel == "sequential":
        trained, losses = [], np.zeros((steps, copies), np.float32)
        for c in range(copies):
            h = {k: v[c] for k, v in hyperparams.items()}
            p, s = params, init(params, h)
            for t in range(steps):
                p, s, loss = step_one(p, s, h, masks, batches(c, cycle, t))
                losses[t, c] = float(loss)
            trained.append(p)
        return stack(trained), losses

    stacked = stack([params] * copies)
    opt_state = jax.vmap(init)(stacked, hyperparams)
    if devices is not None and len(devices) > 1:
        if copies % len(devices):
            raise ValueError(f"copies ({copies}) must be a multiple of the {len(devices)} devices "
                             "they are spread over")
        # The copy axis is sharded over a one-axis mesh; jit partitions the vmapped step.
        mesh = Mesh(np.asarray(devices), ("copies",))
        along = NamedSharding(mesh, P("copies"))
        replicated = NamedSharding(mesh, P())
        stacked, opt_state, hyperparams = jax.device_put(
            (stacked, opt_state, hyperparams),
            jax.tree.map(lambda x: along if np.ndim(x) else replicated, (stacked, opt_state, hyperparams)))
        put_batch = lambda b: jax.device_put(b, along)
    else:
        put_batch = lambda b: b
    losses = []
    for t in range(steps):
        batch = put_batch(stack([jax.tree.map(jnp.asarray, b) for b in copy_batches(t)]))
        stacked, opt_state, loss = step_all(stacked, opt_state, hyperparams, masks, batch)
        losses.append(loss)
    return stacked, np.asarray(jax.device_get(jnp.stack(losses)), np.float32)


def run_imp_soups(params: Any, config: SoupConfig, *, loss_fn: LossFn, make_optimizer: OptimizerFn,
                  batches: BatchFn, evaluate: EvalFn, masks: Any = None, layouts: Any = None,
                  where: Callable | None = None, devices: Sequence[Any] | None = None,
                  log: Callable[[str], None] | None = print) -> SoupRun:
    """Iterative magnitude pruning whose every retraining is a soup of ``config.copies`` copies.

    Args:
      params: the starting (dense, usually trained) params.
      config: cycles, copies, steps and merge rule.
      loss_fn: ``(params, masks, batch) -> (loss, metrics)``, the forward pass reading masks
        (e.g. a ``sparsify``-ed model called with ``{"masks": masks}``).
      make_optimizer: ``(hyperparams) -> optax`` optimizer, called per copy; its learning-rate
        schedule spans one cycle (``config.steps``) and restarts every cycle.
      batches: ``(copy, cycle, position) -> batch``; give copies different orders.
      evaluate: ``(params, masks) -> {"loss": ..., ...}`` on held-out data; it picks the best
        single copy and the greedy soup.
      masks: starting masks (params-structured, None at unmasked leaves); default all kept at
        the leaves ``layouts`` / ``where`` select (as in :func:`sparsejax.optim.prune`).
      devices: spread the copies over these devices (a multiple of their count).
      log: a function printing one line per cycle (None: quiet).
    """
    if not isinstance(config, SoupConfig):
        raise TypeError(f"config must be a SoupConfig, got {type(config).__name__}")
    if masks is None:
        masks = pruning.magnitude_masks(params, 0.0, layouts=layouts, where=where)
    say = log or (lambda line: None)
    retrain = dict(loss_fn=loss_fn, make_optimizer=make_optimizer, batches=batches,
                   parallel=config.parallel, devices=devices)
    pretrain = None
    if config.pretrain_steps:
        stacked, _ = retrain_copies(params, masks, steps=config.pretrain_steps, copies=1, cycle=0,
                                    **{**retrain, "devices": None})
        params = unstack(stacked, 1)[0]
        pretrain = {k: float(v) for k, v in evaluate(params, masks).items()}
        say(f"dense pre-training ({config.pretrain_steps} steps): held-out "
            + ", ".join(f"{k} {v:.4f}" for k, v in pretrain.items()))

    cycles = []
    hyperparams = _hyperparams(config, config.copies)
    for index, sparsity in enumerate(config.sparsities, start=1):
        masks = pruning.magnitude_masks(params, sparsity, masks=masks,
                                        distribution=config.distribution, layouts=layouts,
                                        where=where)
        stacked, losses = retrain_copies(params, masks, steps=config.steps, copies=config.copies,
                                         cycle=index, hyperparams=hyperparams, **retrain)
        ingredients = unstack(stacked, config.copies)
        shared = [masks] * config.copies

        def held_out(p):
            return {k: float(v) for k, v in evaluate(p, masks).items()}

        metrics = [held_out(soups.uniform_soup([p], [masks])) for p in ingredients]
        uniform = soups.uniform_soup(ingredients, shared)
        uniform_metrics = held_out(uniform)
        greedy = soups.greedy_soup(ingredients, shared, lambda p: held_out(p)["loss"],
                                   ingredient_losses=[m["loss"] for m in metrics])
        greedy_metrics = held_out(greedy.params)
        merged, merged_metrics = ((uniform, uniform_metrics) if config.merge == "uniform"
                                  else (greedy.params, greedy_metrics))
        best = int(np.argmin([m["loss"] for m in metrics]))
        tail = max(1, config.steps // 10)
        cycle = Cycle(index, float(masking.masked_sparsity(masks)), metrics, best, uniform_metrics,
                      greedy_metrics, greedy.chosen, merged_metrics,
                      [float(x) for x in losses[-tail:].mean(axis=0)])
        cycles.append(cycle)
        say(f"cycle {index} at {cycle.sparsity:.1%}: best single {metrics[best]['loss']:.4f}, "
            f"uniform soup {uniform_metrics['loss']:.4f}, greedy soup {greedy_metrics['loss']:.4f} "
            f"(copies {list(greedy.chosen)}); next cycle from the {config.merge} soup")
        params = merged
    return SoupRun(params, masks, cycles, pretrain)
