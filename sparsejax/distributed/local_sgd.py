"""The outer loop of DiLoCo and SparseLoCo: H local inner steps per replica, then one exchange.

    loop = LocalSGD(mesh, compressor=optim.sparseloco.chunked_topk(4096, density=0.01),
                    outer_optimizer=optim.sparseloco.sparseloco_outer(), inner_steps=50)
    state = loop.init(state)                  # a TrainState-like: .params, .opt_state, .replace
    step = loop.wrap(train_step, total_steps=1000)
    for batch in batches:
        state, metrics = step(state, batch)   # inner step; every H steps also the outer step

Each device of the mesh's ``axis`` (one per process on CPU: 4 processes × 1 device) is a
replica. ``state.params`` stays the shared parameters θ; ``state.opt_state`` becomes a
:class:`LocalSGDState` holding each replica's local parameters and inner optimizer state
(a leading replica axis, sharded over ``axis``), its error-feedback accumulator, and the
outer optimizer's state. Inner steps are ``train_step`` (any optax optimizer inside) run
per replica under ``shard_map``: no communication. Every ``inner_steps`` steps (and at the
last step) the outer step runs in two programs:

1. *encode* (per replica): Δ = θ − θ_local → error feedback → the message (indices, packed
   values, levels; or the float32 Δ for DiLoCo);
2. *exchange and apply*: the messages are all-gathered over ``axis``, decoded and averaged
   (:func:`sparsejax.optim.sparseloco.average_messages`), the outer optimizer updates θ, and
   every replica restarts from it (its inner optimizer state carries over).

Between them the host reads the size of the message arrays this process holds (the arrays
the all-gather sends, by part), so the bytes logged are measured from what is sent, beside
what DDP would have sent in the same steps (the gradient at every step). The scalar metrics
are averaged over replicas only at the steps ``log_at`` names.
"""

from __future__ import annotations

import json
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparsejax.optim import sparseloco

__all__ = ["LocalSGD", "LocalSGDState", "OuterRecord", "make_local_sgd", "METHODS"]

METHODS = ("none", "diloco", "sparseloco")


class LocalSGDState(NamedTuple):
    """What the outer loop keeps in ``state.opt_state``.

    Attributes:
      local_params: each replica's parameters in the current round (leading replica axis).
      inner: each replica's inner optimizer state (leading replica axis).
      error: each replica's :class:`~sparsejax.optim.sparseloco.ErrorFeedbackState`.
      outer: the outer optimizer's state (the same on every replica).
    """

    local_params: Any
    inner: Any
    error: Any
    outer: Any


class OuterRecord(NamedTuple):
    """One outer step as logged: bytes this worker sent, and what DDP would have sent."""

    step: int
    outer_step: int
    inner_steps: int
    sent_bytes: int
    sent_parts: dict
    ddp_bytes: int

    def line(self) -> str:
        parts = " + ".join(f"{k} {_kb(v)}" for k, v in self.sent_parts.items())
        return (f"outer step {self.outer_step} (step {self.step}): sent {_kb(self.sent_bytes)} per worker "
                f"({parts}); DDP would have sent {_kb(self.ddp_bytes)} "
                f"({self.inner_steps} steps × {_kb(self.ddp_bytes // max(self.inner_steps, 1))}), "
                f"{self.ddp_bytes / max(self.sent_bytes, 1):.0f}× more")


def _kb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _squeeze(tree):
    return jax.tree.map(lambda x: x[0], tree)


def _unsqueeze(tree):
    return jax.tree.map(lambda x: x[None], tree)


def _shard_map(f, mesh, in_specs, out_specs):
    # Outputs marked P() are equal on every replica by construction (computed from the
    # all-gathered messages in the same order), which the replication check cannot see.
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


class LocalSGD:
    """DiLoCo / SparseLoCo outer loop over the replicas along ``mesh.shape[axis]``.

    Args:
      mesh: the device mesh; every device along ``axis`` is a replica (other axes size 1).
      compressor: how a pseudo-gradient becomes a message
        (:func:`~sparsejax.optim.sparseloco.chunked_topk` or ``full_precision``).
      outer_optimizer: the optax optimizer applied to the averaged pseudo-gradient.
      inner_steps: H, inner steps between outer steps.
      error_decay: β of the error feedback (0 with full precision: nothing is left unsent).
      axis: the mesh axis of the replicas.
      log_path: a JSONL file process 0 appends one record per outer step to.
      echo: called with each outer step's log line on process 0 (default ``print``).
    """

    def __init__(self, mesh: Mesh, *, compressor: sparseloco.Compressor,
                 outer_optimizer: optax.GradientTransformation, inner_steps: int,
                 error_decay: float = 0.0, axis: str = "data", log_path: str | None = None,
                 echo: Callable[[str], None] | None = print):
        if inner_steps < 1:
            raise ValueError(f"inner_steps={inner_steps} must be at least 1")
        others = {a: s for a, s in mesh.shape.items() if a != axis and s != 1}
        if axis not in mesh.shape or others:
            raise ValueError(f"the outer loop needs a mesh whose only axis larger than 1 is "
                             f"{axis!r} (one replica per device), got {dict(mesh.shape)}")
        self.mesh, self.axis, self.replicas = mesh, axis, mesh.shape[axis]
        self.compressor, self.outer_optimizer = compressor, outer_optimizer
        self.inner_steps = inner_steps
        self.error_feedback = sparseloco.error_feedback(compressor, error_decay)
        self.log_path, self.echo = log_path, echo
        self.records: list[OuterRecord] = []

    # ------------------------------------------------------------------ state

    def init(self, state):
        """``state`` (one replica's view: shared params, inner optimizer state) → the loop's state."""
        replicate = lambda t: jax.tree.map(
            lambda x: jnp.broadcast_to(jnp.asarray(x)[None], (self.replicas,) + jnp.shape(x)), t)
        loop_state = LocalSGDState(local_params=replicate(state.params),
                                   inner=replicate(state.opt_state),
                                   error=replicate(self.error_feedback.init(state.params)),
                                   outer=self.outer_optimizer.init(state.params))
        return state.replace(opt_state=loop_state)

    def specs(self, state):
        """PartitionSpecs: per-replica parts along ``axis``, the rest replicated."""
        everywhere = jax.tree.map(lambda _: P(), state)
        per_replica = lambda t: jax.tree.map(lambda _: P(self.axis), t)
        ls = state.opt_state
        return everywhere.replace(opt_state=LocalSGDState(
            per_replica(ls.local_params), per_replica(ls.inner), per_replica(ls.error),
            jax.tree.map(lambda _: P(), ls.outer)))

    def shardings(self, state):
        return jax.tree.map(lambda spec: NamedSharding(self.mesh, spec), self.specs(state),
                            is_leaf=lambda x: isinstance(x, P))

    # ------------------------------------------------------------------ programs

    def _programs(self, train_step, state):
        axis, mesh = self.axis, self.mesh
        specs = self.specs(state)
        shardings = self.shardings(state)

        def inner(state, batch, average_metrics):
            ls = state.opt_state
            replica = state.replace(params=_squeeze(ls.local_params), opt_state=_squeeze(ls.inner))
            new, metrics = train_step(replica, batch)
            metrics = (jax.lax.pmean(metrics, axis) if average_metrics else _unsqueeze(metrics))
            ls = ls._replace(local_params=_unsqueeze(new.params), inner=_unsqueeze(new.opt_state))
            return state.replace(step=new.step, opt_state=ls), metrics

        def inner_program(average_metrics):
            body = lambda s, b: inner(s, b, average_metrics)
            mapped = _shard_map(body, mesh, (specs, P(axis)), (specs, P() if average_metrics else P(axis)))
            return jax.jit(mapped, out_shardings=(shardings, None), donate_argnums=0)

        def encode(state):
            ls = state.opt_state
            delta = jax.tree.map(lambda shared, local: shared.astype(jnp.float32) - local.astype(jnp.float32),
                                 state.params, _squeeze(ls.local_params))
            messages, error = self.error_feedback.update(delta, _squeeze(ls.error))
            return _unsqueeze(messages), _unsqueeze(error)

        def exchange_and_apply(state, messages, error):
            ls = state.opt_state
            gathered = jax.tree.map(lambda m: jax.lax.all_gather(m, axis, tiled=True), messages)
            average = sparseloco.average_messages(self.compressor, gathered, state.params)
            updates, outer = self.outer_optimizer.update(average, ls.outer, state.params)
            params = optax.apply_updates(state.params, updates)
            ls = LocalSGDState(local_params=_unsqueeze(params), inner=ls.inner, error=error, outer=outer)
            return state.replace(params=params, opt_state=ls)

        encode_program = jax.jit(_shard_map(encode, mesh, (specs,), (P(axis), P(axis))))
        apply_program = jax.jit(_shard_map(exchange_and_apply, mesh, (specs, P(axis), P(axis)), specs),
                                out_shardings=shardings, donate_argnums=(0, 2))
        return {True: inner_program(True), False: inner_program(False)}, encode_program, apply_program

    # ------------------------------------------------------------------ driving

    def wrap(self, train_step: Callable, *, total_steps: int,
             log_at: Callable[[int], bool] = lambda step: True) -> Callable:
        """``(state, batch) -> (state, metrics)``: one inner step; the outer step when due.

        ``train_step(state, batch) -> (state, metrics)`` is one replica's step (not jitted);
        ``log_at(step)`` says after which steps the metrics are read (averaged over replicas).
        """
        programs, counter = {}, {}

        def step(state, batch):
            if not programs:
                programs["inner"], programs["encode"], programs["apply"] = self._programs(train_step, state)
                counter["step"] = int(jax.device_get(state.step))
            after = counter["step"] + 1
            state, metrics = programs["inner"][bool(log_at(after))](state, batch)
            counter["step"] = after
            if after % self.inner_steps == 0 or after == total_steps:
                state = self.sync(state, after, programs)
            return state, metrics

        return step

    def sync(self, state, step: int, programs) -> Any:
        """The outer step after ``step``: encode, measure, exchange, apply; logs the bytes."""
        messages, error = programs["encode"](state)
        parts = _measured_bytes(messages)
        state = programs["apply"](state, messages, error)
        round_steps = step - ((step - 1) // self.inner_steps) * self.inner_steps
        gradient_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
        record = OuterRecord(step=step, outer_step=-(-step // self.inner_steps), inner_steps=round_steps,
                             sent_bytes=sum(parts.values()), sent_parts=parts,
                             ddp_bytes=round_steps * gradient_bytes)
        self.records.append(record)
        if jax.process_index() == 0:
            if self.echo is not None:
                self.echo(record.line())
            if self.log_path:
                with open(self.log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({**record._asdict(), "compressor": self.compressor.name}) + "\n")
        return state


def _measured_bytes(messages) -> dict:
    """Bytes of one replica's message by part, read from the arrays this process holds."""
    local_replicas = None
    parts: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(messages)[0]:
        shards = leaf.addressable_shards
        local_replicas = len(shards) if local_replicas is None else local_replicas
        name = str(getattr(path[-1], "name", "values")) if path else "values"
        name = {"codes": "values"}.get(name, name)
        parts[name] = parts.get(name, 0) + sum(s.data.nbytes for s in shards)
    return {k: v // max(local_replicas or 1, 1) for k, v in parts.items()}


def make_local_sgd(method: str, mesh: Mesh, *, inner_steps: int, outer_lr: float = 0.0,
                   outer_momentum: float = 0.9, density: float = 0.01, chunk_size: int = 4096,
                   value_bits: int = 2, error_decay: float = 0.95, axis: str = "data",
                   log_path: str | None = None, echo: Callable[[str], None] | None = print) -> LocalSGD:
    """The outer loop train.py's flags describe: ``diloco`` or ``sparseloco`` (``outer_lr`` 0
    picks the method's default: 0.7 for DiLoCo, 1.0 for SparseLoCo)."""
    if method == "diloco":
        compressor = sparseloco.full_precision()
        outer = sparseloco.diloco_outer(outer_lr or 0.7, outer_momentum)
        error_decay = 0.0
    elif method == "sparseloco":
        compressor = sparseloco.chunked_topk(chunk_size, density=density, value_bits=value_bits)
        outer = sparseloco.sparseloco_outer(outer_lr or 1.0)
    else:
        raise ValueError(f"unknown outer method {method!r}: use none, diloco or sparseloco")
    return LocalSGD(mesh, compressor=compressor, outer_optimizer=outer, inner_steps=inner_steps,
                    error_decay=error_decay, axis=axis, log_path=log_path, echo=echo)
