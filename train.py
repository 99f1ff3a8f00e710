"""Train a sparse model: model + data + recipe + optimizer + checkpoints + logs.

    python train.py                                   # a 90%-sparse (GMP) LM on Python's own source
    python train.py --recipe=rigl90 --steps=2000      # any preset: python train.py --help
    python train.py --model=mixer --recipe=nm24       # MLP-Mixer on scikit-learn's digits
    python train.py --data=my_corpus.txt              # a text file, a folder of them, or .npy/.bin ids
    python train.py --mesh=data:4,fsdp:2              # data parallel × parameter-sharded

Rerunning with the same --workdir resumes from its newest checkpoint. Everything a
run writes (metrics.jsonl, TensorBoard events, checkpoints, summary.txt,
curves.png) goes to --workdir.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import serialization, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sparsejax as sj
from sparsejax import checkpointing, data, logging_utils, presets
from sparsejax.models import transformer, vision
from sparsejax.oneshot import training as oneshot_training


@dataclasses.dataclass
class Config:
    """Everything a run depends on. Each field is also a command-line flag."""

    model: str = "lm"                  # lm | mixer | convnet
    data: str = "stdlib"               # stdlib | a text file or folder | .npy/.bin token ids (lm); digits (vision)
    recipe: str = "gmp90"              # a preset name (see --help) or a .json recipe file
    optimizer: str = "adamw"           # any optax optimizer taking learning_rate
    learning_rate: float = 3e-3
    lr_schedule: str = "cosine"        # cosine | constant
    warmup_steps: int = 50
    weight_decay: float = 0.0
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 384
    scan_layers: bool = False
    dtype: str = "float32"             # computation dtype of the LM (bfloat16 on accelerators)
    seed: int = 0
    workdir: str = "workdir"
    init_from: str = ""                # a workdir whose final params start this run (e.g. dense -> Monarch)
    oneshot: str = ""                  # prune the --init_from params first: magnitude | wanda | sparsegpt | dsnot
    oneshot_batches: int = 8           # calibration batches for --oneshot
    eval_every: int = 200
    eval_batches: int = 16
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    log_every: int = 20
    mesh: str = "data:-1"              # axis:size pairs over data and fsdp; -1 takes the remaining devices
    coordinator_address: str = ""      # multi-host: host:port of process 0
    num_processes: int = 1
    process_id: int = 0
    sigkill_at_step: int = 0           # testing: kill the process (SIGKILL) after this step


def define_flags(config: Config) -> None:
    for field in dataclasses.fields(config):
        default = getattr(config, field.name)
        define = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer,
                  float: flags.DEFINE_float, str: flags.DEFINE_string}[type(default)]
        define(field.name, default, _HELP.get(field.name, field.name.replace("_", " ")))


_HELP = {
    "recipe": "sparsity preset: " + "; ".join(f"{n} ({p.description})"
                                              for n, p in presets.PRESETS.items()) + "; or a .json file",
    "mesh": "device mesh, e.g. data:-1 or data:4,fsdp:2 (fsdp shards parameters)",
}


# ----------------------------------------------------------------------------- checks


def check_config(cfg: Config) -> None:
    """One-line errors for bad settings, before anything is compiled."""
    if cfg.model not in ("lm", "mixer", "convnet"):
        raise ValueError(f"unknown model {cfg.model!r}: use lm, mixer or convnet")
    presets.get(cfg.recipe)
    if not hasattr(optax, cfg.optimizer):
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use an optax optimizer name such as adamw")
    if cfg.lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}: use cosine or constant")
    for name in ("steps", "batch_size", "seq_len", "eval_every", "checkpoint_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(cfg, name)}")
    if cfg.init_from and not os.path.isdir(cfg.init_from):
        raise ValueError(f"--init_from {cfg.init_from} is not a directory: give the workdir of a finished run")
    oneshot_training.check_flags(cfg)


def make_mesh(spec: str, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh from "data:4,fsdp:2"; -1 takes what the other axis leaves."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": -1, "fsdp": 1}
    for part in filter(None, spec.split(",")):
        name, _, size = part.partition(":")
        if name not in sizes or not size.lstrip("-").isdigit():
            raise ValueError(f"--mesh {spec!r}: write axis:size pairs over data and fsdp, e.g. data:4,fsdp:2")
        sizes[name] = int(size)
    if sizes["data"] == -1:
        sizes["data"] = len(devices) // max(sizes["fsdp"], 1)
    if sizes["fsdp"] == -1:
        sizes["fsdp"] = len(devices) // max(sizes["data"], 1)
    n = sizes["data"] * sizes["fsdp"]
    if n < 1 or n > len(devices):
        raise ValueError(f"--mesh {spec!r} needs {n} devices; {len(devices)} are available")
    return Mesh(np.array(devices[:n]).reshape(sizes["data"], sizes["fsdp"]), ("data", "fsdp"))


def fsdp_sharding(mesh: Mesh, x) -> NamedSharding:
    """Shards a leaf's largest axis that the fsdp axis divides; replicates the rest."""
    shape, n = tuple(np.shape(x)), mesh.shape["fsdp"]
    candidates = [i for i, s in enumerate(shape) if n > 1 and s % n == 0 and s >= n]
    if not candidates:
        return NamedSharding(mesh, P())
    axis = max(candidates, key=lambda i: shape[i])
    return NamedSharding(mesh, P(*[("fsdp" if i == axis else None) for i in range(len(shape))]))


# ----------------------------------------------------------------------------- model and data


def build_model(cfg: Config, vocab_size: int):
    if cfg.model == "lm":
        config = transformer.TransformerConfig(
            vocab_size=vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
            d_ff=cfg.d_ff, scan_layers=cfg.scan_layers, dtype=cfg.dtype)
        return transformer.TransformerLM(config), {"model": "lm", **config.to_dict()}
    if cfg.model == "mixer":
        config = vision.MixerConfig()
        return vision.MLPMixer(config), config.to_dict()
    config = vision.ConvNetConfig()
    return vision.ConvNet(config), config.to_dict()


def load_data(cfg: Config):
    """(train batches, eval batch function, vocab size, example batch, items per example)."""
    pc, pi = jax.process_count(), jax.process_index()
    if cfg.model == "lm":
        corpus = data.load_text_data(cfg.data)
        corpus.check_seq_len(cfg.seq_len)
        train = data.LMBatches(corpus.train, cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                               process_index=pi, process_count=pc)
        evals = lambda: data.lm_eval_batches(corpus.valid, cfg.batch_size, cfg.seq_len,
                                             cfg.eval_batches, process_index=pi, process_count=pc)
        return train, evals, corpus.vocab_size, train.batch(0), cfg.seq_len
    if cfg.data not in ("stdlib", "digits"):
        raise ValueError(f"--data {cfg.data!r}: the vision models train on digits")
    digits = data.load_digits()
    train = data.ImageBatches(digits.train_images, digits.train_labels, cfg.batch_size,
                              seed=cfg.seed, process_index=pi, process_count=pc)
    evals = lambda: data.image_eval_batches(digits.valid_images, digits.valid_labels,
                                            cfg.batch_size, process_index=pi, process_count=pc)
    return train, evals, digits.num_classes, train.batch(0), 1


def model_inputs(batch):
    return batch["inputs"] if "inputs" in batch else batch["images"]


def loss_and_metrics(logits, batch):
    """Mean loss (cross-entropy, nats) and its weight; accuracy for classifiers."""
    weights = batch.get("weights")
    if "targets" in batch:
        w = jnp.ones(batch["targets"].shape, jnp.float32) if weights is None else weights
        loss = transformer.lm_loss(logits, batch["targets"], w)
        return loss, {"loss": loss, "weight": jnp.sum(w)}
    labels = batch["labels"]
    w = jnp.ones(labels.shape, jnp.float32) if weights is None else weights
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) * w)
    return loss, {"loss": loss, "weight": jnp.sum(w), "accuracy": correct / jnp.maximum(jnp.sum(w), 1.0)}


# ----------------------------------------------------------------------------- state


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: Any
    opt_state: Any
    sstate: Any


def make_optimizer(cfg: Config, preset, sfn, sparams, sstate) -> optax.GradientTransformation:
    warmup = min(cfg.warmup_steps, cfg.steps - 1)
    if cfg.lr_schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, cfg.steps,
                                                end_value=cfg.learning_rate * 0.1)
    else:
        lr = optax.linear_schedule(0.0, cfg.learning_rate, max(warmup, 1))
    factory = getattr(optax, cfg.optimizer)
    kwargs = {"weight_decay": cfg.weight_decay} if "weight_decay" in factory.__code__.co_varnames else {}
    inner = optax.chain(optax.clip_by_global_norm(1.0), factory(learning_rate=lr, **kwargs))
    if preset.wrap is None:
        return inner
    return preset.wrap(inner, sfn, sparams, sstate, cfg.steps)


def signature(cfg: Config, model_config: dict) -> dict:
    """What must match for a checkpoint to be resumed."""
    return {"model": model_config, "recipe": cfg.recipe, "optimizer": cfg.optimizer,
            "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "seed": cfg.seed, "data": cfg.data}


FINAL_PARAMS = "params.msgpack"


def load_final_params(workdir: str, template):
    """The dense final params another run wrote (for --init_from)."""
    path = os.path.join(workdir, FINAL_PARAMS)
    if not os.path.exists(path):
        raise ValueError(f"--init_from {workdir}: no {FINAL_PARAMS} there (it is written when a run ends)")
    with open(path, "rb") as f:
        return serialization.from_bytes(template, f.read())


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass
class Prepared:
    """A run's settings checked and its inputs loaded; nothing compiled yet."""

    cfg: Config
    mesh: Mesh
    preset: Any
    train_batches: Any
    eval_batches: Any
    example: dict
    items_per_example: int
    model: Any
    ckpt: checkpointing.Checkpointer


def prepare(cfg: Config, *, devices=None) -> Prepared:
    """Every check on the settings and data; raises a one-line ValueError on bad input."""
    check_config(cfg)
    mesh = make_mesh(cfg.mesh, devices)
    if cfg.batch_size % (mesh.devices.size * jax.process_count()) and mesh.devices.size > 1:
        raise ValueError(f"--batch_size {cfg.batch_size} must be divisible by the {mesh.devices.size} "
                         f"devices of --mesh {cfg.mesh}")
    preset = presets.get(cfg.recipe)
    train_batches, eval_batches, vocab, example, items_per_example = load_data(cfg)
    model, model_config = build_model(cfg, vocab)
    ckpt = checkpointing.Checkpointer(os.path.join(cfg.workdir, "checkpoints"),
                                      signature=signature(cfg, model_config),
                                      max_to_keep=cfg.keep_checkpoints)
    return Prepared(cfg, mesh, preset, train_batches, eval_batches, example, items_per_example,
                    model, ckpt)


def create_state(run: Prepared):
    """The initial train state, the sparsified model and the optimizer, from explicit keys."""
    cfg, model, preset = run.cfg, run.model, run.preset
    key = jax.random.key(cfg.seed)
    example_inputs = jnp.asarray(model_inputs(run.example))
    params = jax.jit(model.init)(key, example_inputs)
    if cfg.init_from:
        params = load_final_params(cfg.init_from, params)
    sfn = sj.sparsify(model.apply, preset.recipe(cfg.model))
    sparams, sstate = sfn.init(params, example_inputs, rng=jax.random.fold_in(key, 1))
    if cfg.oneshot:   # post-training pruning of the --init_from weights; training then fine-tunes
        sparams, sstate = oneshot_training.prune_run(cfg, run, sfn, sparams, sstate, loss_and_metrics)
    tx = make_optimizer(cfg, preset, sfn, sparams, sstate)
    state = TrainState(step=jnp.zeros([], jnp.int32), params=sparams, opt_state=tx.init(sparams),
                       sstate=sstate)
    return state, sfn, tx


def train_and_evaluate(cfg: Config | Prepared, *, devices=None) -> dict:
    """Runs (or resumes) training; returns the final metrics and per-step history."""
    run = cfg if isinstance(cfg, Prepared) else prepare(cfg, devices=devices)
    cfg, mesh, preset, ckpt = run.cfg, run.mesh, run.preset, run.ckpt
    train_batches, eval_batches = run.train_batches, run.eval_batches
    items_per_example = run.items_per_example

    state, sfn, tx = create_state(run)

    state_sharding = jax.tree.map(lambda x: fsdp_sharding(mesh, x), state)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    # Optimizers may start from the recipe's masks: copy, so no buffer is in the state twice
    # (the train step donates the state).
    state = jax.device_put(jax.tree.map(jnp.copy, state), state_sharding)

    position = 0
    restored = ckpt.restore(state)
    if restored is not None:
        state, position = jax.device_put(restored.state, state_sharding), restored.data_position
    start = int(state.step)

    def loss_fn(params, masks, batch):
        logits = sfn(params, {"masks": masks}, model_inputs(batch))
        return loss_and_metrics(logits, batch)

    def train_step(state: TrainState, batch):
        masks = presets.forward_masks(preset, state.sstate, state.opt_state)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, masks, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["sparsity"] = _sparsity(presets.forward_masks(preset, state.sstate, opt_state))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def eval_step(state: TrainState, batch):
        masks = presets.forward_masks(preset, state.sstate, state.opt_state)
        return loss_fn(state.params, masks, batch)[1]

    train_step = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                         out_shardings=(state_sharding, None), donate_argnums=0)
    eval_step = jax.jit(eval_step, in_shardings=(state_sharding, batch_sharding))

    def evaluate(state):
        totals, weight = {}, 0.0
        for batch in eval_batches():
            m = jax.device_get(eval_step(state, _global_batch(batch, batch_sharding)))
            weight += float(m["weight"])
            for k, v in m.items():
                if k != "weight":
                    totals[k] = totals.get(k, 0.0) + float(v) * float(m["weight"])
        return {k: v / max(weight, 1.0) for k, v in totals.items()}

    writer = logging_utils.MetricsWriter(cfg.workdir, resume_step=start if restored else None)
    items_per_step = cfg.batch_size * items_per_example
    progress = logging_utils.ProgressLine(cfg.steps, items_per_step)
    history, last_eval, t_last, step_last = [], {}, time.perf_counter(), start
    if restored is not None:
        progress.print(f"resumed from step {start} in {cfg.workdir}")
    for step in range(start + 1, cfg.steps + 1):
        batch = _global_batch(train_batches.batch(position), batch_sharding)
        state, metrics = train_step(state, batch)
        position += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "weight"}
            now = time.perf_counter()
            rate = items_per_step * (step - step_last) / max(now - t_last, 1e-9)
            t_last, step_last = now, step
            history.append({"step": step, "time": now, **metrics})
            writer.write(step, {**metrics, "items_per_s": rate})
            progress.update(step, metrics)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last_eval = evaluate(state)
            writer.write(step, last_eval, split="eval")
            progress.print(f"step {step}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            ckpt.save(step, state, data_position=position)
        if cfg.sigkill_at_step and step == cfg.sigkill_at_step:
            ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt.close()
    progress.close()
    writer.close()

    masks = presets.forward_masks(preset, state.sstate, state.opt_state)
    summary = logging_utils.format_summary(
        {"step": int(state.step), **{f"eval_{k}": v for k, v in last_eval.items()}},
        logging_utils.mask_sparsity(jax.device_get(masks)), sfn.report({"masks": masks}))
    if jax.process_index() == 0:
        with open(os.path.join(cfg.workdir, "summary.txt"), "w") as f:
            f.write(summary + "\n")
        dense = jax.device_get(sfn.dense_params(state.params, {"masks": masks}))
        with open(os.path.join(cfg.workdir, FINAL_PARAMS), "wb") as f:
            f.write(serialization.to_bytes(dense))
        logging_utils.plot_curves(os.path.join(cfg.workdir, logging_utils.METRICS_FILE),
                                  os.path.join(cfg.workdir, "curves.png"),
                                  title=f"{cfg.model} · {cfg.recipe}")
    print(summary)
    # The report reads the masks the run ended with (for GMP or RigL they live in the optimizer).
    return {"eval": last_eval, "history": history, "state": state, "sfn": sfn,
            "report": sfn.report({"masks": masks})}


def _sparsity(masks) -> jax.Array:
    """Fraction of masked weights that are pruned (0 with no masks)."""
    leaves = [m for m in jax.tree.leaves(masks) if m is not None]
    if not leaves:
        return jnp.zeros([])
    total = sum(m.size for m in leaves)
    return 1.0 - sum(jnp.sum(m.astype(jnp.float32)) for m in leaves) / total


def _global_batch(batch: dict, sharding: NamedSharding) -> dict:
    """This process's rows of a batch, as global arrays laid out over the mesh."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ----------------------------------------------------------------------------- entry point


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
    cfg = Config(**{f.name: getattr(flags.FLAGS, f.name) for f in dataclasses.fields(Config)})
    if cfg.coordinator_address:
        jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id)
    try:
        run = prepare(cfg)
    except ValueError as e:
        sys.exit(f"train.py: {e}")
    train_and_evaluate(run)


if __name__ == "__main__":
    define_flags(Config())
    app.run(main)
