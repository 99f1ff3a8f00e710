"""Train a sparse model: model + data + recipe + optimizer + checkpoints + logs.

    python train.py                                   # an LM pruned to 90 percent (GMP) on Python's source
    python train.py --recipe=rigl90 --steps=2000      # any preset: python train.py --help
    python train.py --model=mixer --recipe=nm24       # MLP-Mixer on scikit-learn's digits
    python train.py --data=my_corpus.txt              # a text file, a folder of them, or .npy/.bin ids
    python train.py --mesh=data:4,fsdp:2              # data parallel × parameter-sharded
    python train.py --model=mixer --recipe=dense --soup_copies=4   # IMP with sparse model soups

Rerunning with the same --workdir resumes from its newest checkpoint (a finished
run is evaluated again and its summary rewritten); settings that change the run
(model, recipe, optimizer, schedule, steps, batch) must match. Everything a run
writes (metrics.jsonl, TensorBoard events, checkpoints, summary.txt, curves.png,
params.msgpack) goes to --workdir. More devices on one CPU: set
XLA_FLAGS=--xla_force_host_platform_device_count=8 before the command.
"""

from __future__ import annotations

import dataclasses
import functools
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
from sparsejax import distributed
from sparsejax.training import checkpointing, data, imp_soups, logging_utils, presets
from sparsejax.distributed import local_sgd
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
    tune_paths: bool = False           # time the whole step with close per-site path choices switched
    # --- IMP with Sparse Model Soups (sparsejax.imp_soups)
    soup_copies: int = 0               # > 0: prune-retrain cycles, this many copies averaged per cycle
    soup_sparsities: str = "0.5,0.75,0.9"
    soup_merge: str = "uniform"        # uniform | greedy
    soup_distribution: str = "global"  # global | uniform | erk
    soup_weight_decays: str = ""       # one per copy; empty: --weight_decay for all
    eval_every: int = 200
    eval_batches: int = 16
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    log_every: int = 20
    mesh: str = "data:-1"              # axis:size pairs over data and fsdp; -1 takes the remaining devices
    coordinator_address: str = ""      # multi-host: host:port of process 0
    num_processes: int = 1
    process_id: int = 0
    # --- across processes (sparsejax.distributed): joining, and the DiLoCo / SparseLoCo outer loop
    distributed_timeout: float = 60.0  # seconds to reach the coordinator before a clear error
    outer: str = "none"                # none (DDP: gradients every step) | diloco | sparseloco
    inner_steps: int = 50              # H: local steps per replica between outer steps
    outer_lr: float = 0.0              # 0: the method's default (0.7 diloco, 1.0 sparseloco)
    outer_momentum: float = 0.9        # diloco's outer Nesterov momentum
    outer_density: float = 0.01        # sparseloco: fraction of each chunk sent
    outer_chunk: int = 4096            # sparseloco: entries per top-k chunk
    outer_bits: int = 2                # sparseloco: bits per sent value (2, or 32 for float32)
    outer_ef_beta: float = 0.95        # sparseloco: error-feedback decay
    sigkill_at_step: int = 0           # testing: kill the process (SIGKILL) after this step


# Every flag's help, by group. absl's --help lists the main module's flags alphabetically, so
# each help starts with its group's tag and the usage text lists the groups (flags_overview).
_FLAG_GROUPS = {
    "model and data": {
        "model": "Which model: lm (a decoder-only Transformer LM), mixer (MLP-Mixer) or convnet; "
                 "mixer and convnet train on scikit-learn's digits.",
        "data": "Training text for --model=lm: stdlib (Python's own library source, no download), "
                "a text file, a folder of text files, or token ids in a .npy/.bin file; the "
                "vision models take digits.",
        "d_model": "LM width (embedding and residual size).",
        "n_layers": "Number of LM Transformer blocks.",
        "n_heads": "Attention heads per LM block; must divide --d_model.",
        "d_ff": "Hidden width of the LM's gated FFN.",
        "seq_len": "LM context length in tokens (bytes for stdlib).",
        "scan_layers": "Stack the LM blocks with nn.scan (one compiled block, stacked weights) "
                       "instead of unrolling them.",
        "dtype": "Computation dtype of the LM: float32 or bfloat16 (parameters stay float32).",
    },
    "sparsity and optimization": {
        "recipe": None,   # filled from the presets below
        "init_from": "The --workdir of a finished run whose final params.msgpack starts this "
                     "run (same model settings); required by recipes that project given weights "
                     "(monarch4_proj). Empty: random init.",
        "optimizer": "Any optax optimizer that takes learning_rate (adamw, adam, sgd, lion, ...); "
                     "always behind a global-norm gradient clip of 1.0.",
        "learning_rate": "Peak learning rate, reached after --warmup_steps.",
        "lr_schedule": "cosine (warm up, then cosine decay to 10% of the peak at --steps) or "
                       "constant (warm up, then the peak).",
        "warmup_steps": "Steps of linear warm-up from 0 to --learning_rate.",
        "weight_decay": "Decoupled weight decay, for optimizers that take one (adamw, lion, ...).",
        "steps": "Total training steps; the learning-rate and sparsity schedules are laid out "
                 "over them, so a resumed run must keep the same value.",
        "batch_size": "Global batch size (sequences or images per step, split over the devices "
                      "of --mesh).",
        "seed": "Seed of the init, the masks and the batch order.",
        "oneshot": "Prune the --init_from weights once before training, without retraining: "
                   "magnitude, wanda, sparsegpt or dsnot, on the masks of a fixed-mask --recipe "
                   "(e.g. nm24 or a .json recipe); --steps then fine-tune with the masks fixed. "
                   "Empty: no one-shot pruning.",
        "oneshot_batches": "Calibration batches from the training data for --oneshot.",
        "tune_paths": "Before training, time the whole training step with each close per-site "
                      "path choice switched (kernel or XLA, measured per site on a GPU or TPU) "
                      "and keep what makes the step faster (SparseFunction.tune); the verdicts "
                      "go to the path cache. Nothing to settle on a CPU.",
    },
    "run, logs and checkpoints": {
        "workdir": "Folder for everything the run writes; rerunning with the same folder "
                   "resumes from its newest checkpoint.",
        "eval_every": "Evaluate on held-out data every this many steps (and at the last step).",
        "eval_batches": "Held-out batches per evaluation (LM; the vision models use the whole "
                        "held-out split).",
        "checkpoint_every": "Save a checkpoint every this many steps (and at the last step).",
        "keep_checkpoints": "How many of the newest checkpoints to keep.",
        "log_every": "Print the progress line and log train metrics every this many steps.",
    },
    "devices and hosts": {
        "mesh": "Device mesh as axis:size pairs over data and fsdp, e.g. data:-1 (all devices "
                "data-parallel) or data:4,fsdp:2 (parameters and optimizer state sharded over "
                "fsdp); -1 takes the devices the other axis leaves. For several devices on one "
                "CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N.",
        "coordinator_address": "Multi-host runs: host:port of process 0 (empty: one host).",
        "num_processes": "Multi-host runs: number of processes.",
        "process_id": "Multi-host runs: this process's index, from 0.",
    },
}
# Fields of Config that are not command-line flags (tests set them in-process, or via the
# environment variable named here).
_HIDDEN_FIELDS = {"sigkill_at_step": "SPARSEJAX_TEST_SIGKILL_AT_STEP"}


def _recipe_help() -> str:
    names = "; ".join(f"{n}: {p.description}" for n, p in presets.PRESETS.items())
    return (f"Sparsity preset or a .json recipe file {{\"rules\": [...]}}. Presets: {names}.")


def flag_help() -> dict[str, tuple[str, str]]:
    """Each flag's (group, help sentence)."""
    out = {}
    for group, entries in _FLAG_GROUPS.items():
        for name, text in entries.items():
            out[name] = (group, _recipe_help() if name == "recipe" else text)
    return out


def flags_overview() -> str:
    """The usage text's list of flags by group (no '%': absl formats the usage text with it)."""
    lines = ["Flags by group (each flag's help below starts with its group):"]
    for group, entries in _FLAG_GROUPS.items():
        lines.append(f"  [{group}] " + " ".join(f"--{name}" for name in entries))
    return "\n".join(lines) + "\n"


def define_flags(config: Config) -> None:
    helps = flag_help()
    for field in dataclasses.fields(config):
        if field.name in _HIDDEN_FIELDS:
            continue
        default = getattr(config, field.name)
        define = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer,
                  float: flags.DEFINE_float, str: flags.DEFINE_string}[type(default)]
        group, text = helps[field.name]    # a new field without help fails here, by design
        define(field.name, default, f"[{group}] {text}")


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
    if cfg.init_from and not os.path.isfile(os.path.join(cfg.init_from, FINAL_PARAMS)):
        raise ValueError(f"--init_from {cfg.init_from}: no {FINAL_PARAMS} there (a run writes it when "
                         "it finishes): give the workdir of a finished run")
    for rule in presets.get(cfg.recipe).recipe(cfg.model):
        if isinstance(rule, sj.rules.Factorize) and rule.init == "project" and not cfg.init_from:
            raise ValueError(f"--recipe {cfg.recipe}: {rule.describe()} projects the weights it is "
                             "given onto its factors, so it needs --init_from=<workdir of a finished "
                             "dense run>; without it, it would project random weights (to train "
                             "factors from scratch use init='random', e.g. --recipe=monarch4)")
    oneshot_training.check_flags(cfg)
    soup_config(cfg)


def check_workdir(workdir: str) -> None:
    """--workdir must be a folder this process can create and write in."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test_{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"--workdir {workdir}: cannot write there ({e.strerror or e}); give a "
                         "folder you can write to") from None


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
        hint = ""
        if n > len(devices) and devices and devices[0].platform == "cpu":
            hint = (f"; on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={n} before "
                    "starting to get that many devices")
        raise ValueError(f"--mesh {spec!r} needs {n} devices; {len(devices)} are available{hint}")
    return Mesh(np.array(devices[:n]).reshape(sizes["data"], sizes["fsdp"]), ("data", "fsdp"))


def fsdp_sharding(mesh: Mesh, x) -> NamedSharding:
    """Shards a leaf's largest axis that the fsdp axis divides; replicates the rest, and masks.

    A mask (bool) is one byte an entry against its weight's four and the optimizer's eight:
    replicated, it costs little memory and the step needs no all-gather of it (sharded, each
    step gathered every mask beside its weight)."""
    shape, n = tuple(np.shape(x)), mesh.shape["fsdp"]
    if np.dtype(getattr(x, "dtype", np.float32)) == np.bool_:
        return NamedSharding(mesh, P())
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


def loss_fn(params, masks, batch, *, sfn, with_aux: bool = False):
    """The model's loss and metrics with ``masks`` in the forward pass; with ``with_aux``,
    also the activation L1 (``sfn.with_aux``) the loss may add, and the activation sparsity."""
    if not with_aux:
        logits = sfn(params, {"masks": masks}, model_inputs(batch))
        return loss_and_metrics(logits, batch)
    logits, aux = sfn.with_aux()(params, {"masks": masks}, model_inputs(batch))
    loss, metrics = loss_and_metrics(logits, batch)
    metrics["activation_sparsity"] = aux["activation_sparsity"]
    metrics["activation_l1"] = aux["activation_l1"]
    return loss, metrics


def compute_sharding(mesh: Mesh) -> NamedSharding | None:
    """The sharding the parameters take inside a step: with an fsdp axis, replicated (each
    step all-gathers them, computes on its share of the batch, and the gradients are reduced
    back to the shards), as FSDP does. Left to XLA's propagation, the sharded weights turned
    the matmuls model-parallel: 1.09× of one GPU on two H200s, against 1.8× data-parallel."""
    return NamedSharding(mesh, P()) if mesh.shape["fsdp"] > 1 else None


def _for_compute(params, sharding: NamedSharding | None):
    if sharding is None:
        return params
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), params)


def train_step(state: TrainState, batch, *, sfn, tx: optax.GradientTransformation,
               activation_l1=None, param_sharding: NamedSharding | None = None):
    """One optimizer step; the forward pass reads the masks from their owner (sstate or optimizer).

    ``activation_l1``: a schedule (step -> factor) of the activations' L1 added to the loss
    (ProSparse), or None. ``param_sharding``: see :func:`compute_sharding`.
    """
    # The masks take the parameters' compute sharding too: a mask left sharded while its weight
    # is gathered makes XLA multiply on the shard and all-gather the masked weight (and, under
    # SR-STE, the decay term of the backward pass) on top of the weight itself.
    masks = _for_compute(sj.optim.forward_masks(state.sstate, state.opt_state), param_sharding)

    def objective(params):
        params = _for_compute(params, param_sharding)
        loss, metrics = loss_fn(params, masks, batch, sfn=sfn, with_aux=activation_l1 is not None)
        if activation_l1 is not None:
            loss = loss + activation_l1(state.step) * metrics["activation_l1"]
        return loss, metrics

    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_masks = sj.optim.forward_masks(state.sstate, opt_state)
    if jax.tree.leaves(new_masks):        # nothing to show for a dense run
        metrics["sparsity"] = sj.optim.masked_sparsity(new_masks)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(state: TrainState, batch, *, sfn, with_aux: bool = False,
              param_sharding: NamedSharding | None = None):
    """Loss and metrics on one held-out batch, with the masks of this step."""
    masks = _for_compute(sj.optim.forward_masks(state.sstate, state.opt_state), param_sharding)
    params = _for_compute(state.params, param_sharding)
    return loss_fn(params, masks, batch, sfn=sfn, with_aux=with_aux)[1]


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
    # The schedule (steps, learning rate, warm-up, decay) is laid out over the whole run:
    # resuming with other values would change it mid-run, so they must match too.
    return {"model": model_config, "recipe": cfg.recipe, "optimizer": cfg.optimizer,
            "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "seed": cfg.seed, "data": cfg.data,
            "steps": cfg.steps, "learning_rate": cfg.learning_rate, "lr_schedule": cfg.lr_schedule,
            "warmup_steps": cfg.warmup_steps, "weight_decay": cfg.weight_decay,
            **outer_signature(cfg)}


FINAL_PARAMS = "params.msgpack"


def load_final_params(workdir: str, template):
    """The dense final params another run wrote (for --init_from), checked against ``template``."""
    path = os.path.join(workdir, FINAL_PARAMS)
    if not os.path.exists(path):
        raise ValueError(f"--init_from {workdir}: no {FINAL_PARAMS} there (it is written when a run ends)")
    try:
        with open(path, "rb") as f:
            saved = serialization.msgpack_restore(f.read())
    except Exception as e:   # noqa: BLE001 - any decoding failure means an unreadable file
        raise ValueError(f"--init_from {workdir}: cannot read {FINAL_PARAMS} ({type(e).__name__})") from None
    want = {p: tuple(x.shape) for p, x in _flat_state(serialization.to_state_dict(template)).items()}
    have = {p: tuple(np.shape(x)) for p, x in _flat_state(saved).items()}
    if want != have:
        diffs = [f"{p}: {have.get(p, 'absent')} there, {want.get(p, 'absent')} here"
                 for p in sorted(set(want) | set(have)) if want.get(p) != have.get(p)]
        raise ValueError(f"--init_from {workdir}: its {FINAL_PARAMS} holds a different model "
                         f"({'; '.join(diffs[:3])}{' ...' if len(diffs) > 3 else ''}); give the "
                         "workdir of a run with the same --model and model-size flags")
    return serialization.from_state_dict(template, saved)


def _flat_state(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat_state(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


# ----------------------------------------------------------------------------- training


class SetupError(ValueError):
    """Bad settings found while building the run (after ``prepare``): one line, nothing trained."""


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
    check_workdir(cfg.workdir)
    mesh = make_mesh(cfg.mesh, devices)
    if cfg.batch_size % (mesh.devices.size * jax.process_count()) and mesh.devices.size > 1:
        raise ValueError(f"--batch_size {cfg.batch_size} must be divisible by the {mesh.devices.size} "
                         f"devices of --mesh {cfg.mesh}")
    preset = presets.get(cfg.recipe)
    outer_loop(cfg, mesh, preset)   # checks the outer-loop flags before anything compiles
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
        try:
            params = load_final_params(cfg.init_from, params)
        except ValueError as e:
            raise SetupError(str(e)) from None
    sfn = sj.sparsify(model.apply, preset.recipe(cfg.model))
    try:
        sparams, sstate = sfn.init(params, example_inputs, rng=jax.random.fold_in(key, 1))
    except ValueError as e:
        raise SetupError(f"--recipe {cfg.recipe}: {e}") from None
    if cfg.oneshot:   # post-training pruning of the --init_from weights; training then fine-tunes
        sparams, sstate = oneshot_training.prune_run(cfg, run, sfn, sparams, sstate, loss_and_metrics)
    tx = make_optimizer(cfg, preset, sfn, sparams, sstate)
    opt_state = tx.init(sparams)
    if sj.optim.owns_masks(opt_state) != (preset.masks_from != "recipe"):
        # Masks have one owner: the forward pass would read the other one's (stale) copy.
        raise SetupError(f"--recipe {cfg.recipe}: its masks_from={preset.masks_from!r} but the "
                         f"optimizer {'owns' if sj.optim.owns_masks(opt_state) else 'holds no'} "
                         "masks; set masks_from to 'optimizer' where its wrap adds a mask-moving "
                         "transform (prune, rigl, ...), else 'recipe'")
    state = TrainState(step=jnp.zeros([], jnp.int32), params=sparams, opt_state=opt_state,
                       sstate=sstate)
    return state, sfn, tx


def train_and_evaluate(cfg: Config | Prepared, *, devices=None) -> dict:
    """Runs (or resumes) training; returns the final metrics and per-step history."""
    run = cfg if isinstance(cfg, Prepared) else prepare(cfg, devices=devices)
    if run.cfg.soup_copies:
        return train_soups(run, soup_config(run.cfg))
    cfg, mesh, preset, ckpt = run.cfg, run.mesh, run.preset, run.ckpt
    train_batches, eval_batches = run.train_batches, run.eval_batches
    items_per_example = run.items_per_example

    state, sfn, tx = create_state(run)
    outer = outer_loop(cfg, mesh, preset, echo=lambda line: progress.print(line))
    if outer is not None:                   # replicas keep their own params and inner state
        state = outer.init(state)

    state_sharding = (outer.shardings(state) if outer is not None else
                      jax.tree.map(lambda x: fsdp_sharding(mesh, x), state))
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    # Optimizers may start from the recipe's masks: copy, so no buffer is in the state twice
    # (the train step donates the state).
    state = jax.device_put(jax.tree.map(jnp.copy, state), state_sharding)

    position = 0
    try:
        restored = ckpt.restore(state)
    except ValueError as e:
        raise SetupError(f"{e}; move {ckpt.directory} aside to start afresh") from None
    if restored is not None:
        state, position = jax.device_put(restored.state, state_sharding), restored.data_position
    start = int(state.step)

    # The step functions are module-level; this run binds its model, optimizer and the
    # preset's activation L1 schedule (ProSparse), if any.
    l1 = preset.activation_l1(cfg.steps) if preset.activation_l1 is not None else None
    gathered = compute_sharding(mesh) if outer is None else None
    step_fn = step_plain = functools.partial(train_step, sfn=sfn, tx=tx, activation_l1=l1,
                                             param_sharding=gathered)
    eval_fn = functools.partial(eval_step, sfn=sfn, with_aux=l1 is not None,
                                param_sharding=gathered)

    def jit_step(compiler_options=None):
        return jax.jit(step_plain, in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, None), donate_argnums=0,
                       compiler_options=compiler_options)

    if outer is not None:
        step_fn = outer.wrap(step_fn, total_steps=cfg.steps,
                             log_at=lambda s: s % cfg.log_every == 0 or s == cfg.steps)
    else:
        step_fn = jit_step()
    eval_fn = jax.jit(eval_fn, in_shardings=(state_sharding, batch_sharding))

    def evaluate(state):
        totals, weight = {}, 0.0
        for batch in eval_batches():
            m = jax.device_get(eval_fn(state, _global_batch(batch, batch_sharding)))
            weight += float(m["weight"])
            for k, v in m.items():
                if k != "weight":
                    totals[k] = totals.get(k, 0.0) + float(v) * float(m["weight"])
        return {k: v / max(weight, 1.0) for k, v in totals.items()}

    writer = logging_utils.MetricsWriter(cfg.workdir, resume_step=start if restored else None)
    items_per_step = cfg.batch_size * items_per_example
    progress = logging_utils.ProgressLine(cfg.steps, items_per_step)
    history, last_eval, t_last, step_last = [], {}, time.perf_counter(), start
    if restored is not None and start >= cfg.steps:
        progress.print(f"the run in {cfg.workdir} finished at step {start}: evaluating it again")
    elif restored is not None:
        progress.print(f"resumed from step {start} in {cfg.workdir}")
    if cfg.tune_paths and outer is None and start < cfg.steps:
        # Before the jitted step is first traced, so that it takes the verdicts. The tuner runs
        # the step on one batch and keeps none of its results.
        tuning = sfn.tune(step_plain, state,
                          _global_batch(train_batches.batch(position), batch_sharding),
                          repeats=5, budget_s=300.0)
        progress.print("path tuning: " + tuning.summary())
        if tuning.compiler_options:     # the step compiled faster under these XLA options
            step_fn = jit_step(tuning.compiler_options)
    unread = None      # (step, metrics) of a logged step whose values are not yet read

    def read_log():
        # Reading a step's metrics waits for that step. It is done after the next step is
        # dispatched, so the device never idles while the host logs and builds a batch.
        nonlocal unread, t_last, step_last
        if unread is None:
            return
        logged, values = unread
        unread = None
        values = {k: float(v) for k, v in jax.device_get(values).items() if k != "weight"}
        now = time.perf_counter()
        rate = items_per_step * (logged - step_last) / max(now - t_last, 1e-9)
        t_last, step_last = now, logged
        history.append({"step": logged, "time": now, **values})
        writer.write(logged, {**values, "items_per_s": rate})
        progress.update(logged, values)

    for step in range(start + 1, cfg.steps + 1):
        batch = _global_batch(train_batches.batch(position), batch_sharding)
        state, metrics = step_fn(state, batch)
        position += 1
        read_log()
        if step % cfg.log_every == 0 or step == cfg.steps:
            unread = (step, metrics)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            read_log()
            last_eval = evaluate(state)
            writer.write(step, last_eval, split="eval")
            progress.print(f"step {step}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            ckpt.save(step, state, data_position=position)
        if cfg.sigkill_at_step and step == cfg.sigkill_at_step:
            read_log()
            ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)
    read_log()
    if not last_eval:
        # A finished run rerun trains no step: its summary still gets every figure.
        last_eval = evaluate(state)
        progress.print(f"step {int(state.step)}: eval " +
                       ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
    ckpt.close()
    progress.close()
    writer.close()

    masks = sj.optim.forward_masks(state.sstate, state.opt_state)
    summary = logging_utils.format_summary(
        {"step": int(state.step), "recipe": f"{cfg.recipe} ({preset.description})",
         **{f"eval_{k}": v for k, v in last_eval.items()}},
        sj.optim.masked_sparsity(jax.device_get(masks), by_path=True),
        summary_report(preset, sfn, masks))
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


def summary_report(preset, sfn, masks):
    """The report as the run uses it: where the optimizer owns the masks (GMP, SET, RigL...),
    the recipe's placeholder rule (e.g. ``Prune(..., sparsity=0.0)``) is replaced by the preset."""
    report = sfn.report({"masks": masks})
    if preset.masks_from == "recipe":
        return report
    owner = f"{preset.name}: {preset.description}"
    masked = set(sfn.masked_paths)
    return dataclasses.replace(report, rows=[
        dataclasses.replace(r, rule=owner) if r.path in masked else r for r in report.rows])


def _global_batch(batch: dict, sharding: NamedSharding) -> dict:
    """This process's rows of a batch, as global arrays laid out over the mesh."""
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# ----------------------------------------------------------------------------- sparse model soups


_FLAG_GROUPS["sparse model soups"] = {
    "soup_copies": "IMP with Sparse Model Soups when > 0: dense training for --steps (or the "
                   "--init_from weights), then one cycle per --soup_sparsities entry: prune by "
                   "magnitude, retrain this many copies for --steps steps each (each its own "
                   "batch order, trained together under vmap), average them into the next "
                   "cycle's start; needs --recipe=dense. 1 is plain IMP; 0: off.",
    "soup_sparsities": "Sparsity after each prune-retrain cycle, comma-separated and rising "
                       "(e.g. 0.5,0.75,0.9: three cycles).",
    "soup_merge": "uniform (the mean of the copies) or greedy (copies added in order of "
                  "held-out loss while it does not rise): the soup the next cycle starts from.",
    "soup_distribution": "How a cycle's sparsity is spread: global (one magnitude ranking over "
                         "every pruned weight), uniform (the same per layer) or erk.",
    "soup_weight_decays": "One weight decay per copy, comma-separated (copies that differ in "
                          "more than batch order); empty: every copy uses --weight_decay.",
}


def _floats(cfg: Config, name: str) -> tuple[float, ...]:
    text = getattr(cfg, name)
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--{name}={text!r}: write comma-separated numbers, e.g. "
                         f"{Config.soup_sparsities}") from None


def soup_config(cfg: Config) -> imp_soups.SoupConfig | None:
    """The --soup_* flags as the driver's settings (None when --soup_copies=0)."""
    if cfg.soup_copies == 0:
        return None
    if cfg.soup_copies < 0:
        raise ValueError(f"--soup_copies must be >= 0 (0: off), got {cfg.soup_copies}")
    if cfg.recipe != "dense":
        raise ValueError(f"--soup_copies={cfg.soup_copies} prunes a dense model by magnitude "
                         f"itself (IMP); use --recipe=dense, not --recipe={cfg.recipe}")
    if cfg.outer != "none" or cfg.oneshot or cfg.num_processes > 1:
        raise ValueError(f"--soup_copies={cfg.soup_copies} runs its own cycles in one process: "
                         "leave --outer, --oneshot and --num_processes unset")
    decays = _floats(cfg, "soup_weight_decays") or None
    if decays and "weight_decay" not in getattr(optax, cfg.optimizer).__code__.co_varnames:
        raise ValueError(f"--soup_weight_decays: --optimizer={cfg.optimizer} takes no weight "
                         "decay, so the copies would differ in batch order only; use adamw, lion, "
                         "... or leave --soup_weight_decays empty")
    sparsities = _floats(cfg, "soup_sparsities")
    try:
        return imp_soups.SoupConfig(
            sparsities=sparsities, steps=cfg.steps, copies=cfg.soup_copies,
            merge=cfg.soup_merge, distribution=cfg.soup_distribution, weight_decays=decays,
            pretrain_steps=0 if cfg.init_from else cfg.steps)
    except ValueError as e:
        raise ValueError(f"--soup_* flags: {e}") from None


def train_soups(run: Prepared, config: imp_soups.SoupConfig) -> dict:
    """IMP with Sparse Model Soups on train.py's model, data, loss and optimizer.

    Every cycle restarts the optimizer and its learning-rate schedule over --steps; each
    copy of each cycle reads its own stretch of the seeded training stream. Writes
    summary.txt, metrics.jsonl (split "soups", one record per cycle) and the final soup's
    params.msgpack; no checkpoints (a run is cycles of short retrains).
    """
    cfg = run.cfg
    inputs = jnp.asarray(model_inputs(run.example))
    params = jax.jit(run.model.init)(jax.random.key(cfg.seed), inputs)
    if cfg.init_from:
        try:
            params = load_final_params(cfg.init_from, params)
        except ValueError as e:
            raise SetupError(str(e)) from None
    sfn = sj.sparsify(run.model.apply, sj.Recipe([sj.Prune(presets.SPARSE_WEIGHTS[cfg.model], 0.0)]))
    sparams, sstate = sfn.init(params, inputs)

    def loss_fn(p, masks, batch):
        return loss_and_metrics(sfn(p, {"masks": masks}, model_inputs(batch)), batch)

    def make_tx(hparams):   # this copy's hyperparameters ({"weight_decay": ...}), traced
        return make_optimizer(dataclasses.replace(cfg, **hparams), run.preset, sfn, sparams, sstate)

    def batches(copy, cycle, position):
        return run.train_batches.batch((cycle * config.copies + copy) * cfg.steps + position)

    eval_step = jax.jit(lambda p, m, b: loss_fn(p, m, b)[1])

    def evaluate(p, masks):
        totals, weight = {}, 0.0
        for batch in run.eval_batches():
            m = jax.device_get(eval_step(p, masks, batch))
            weight += float(m["weight"])
            for k, v in m.items():
                if k != "weight":
                    totals[k] = totals.get(k, 0.0) + float(v) * float(m["weight"])
        return {k: v / max(weight, 1.0) for k, v in totals.items()}

    devices = list(run.mesh.devices.flat)
    spread = devices if len(devices) > 1 and config.copies % len(devices) == 0 else None
    result = imp_soups.run_imp_soups(sparams, config, loss_fn=loss_fn, make_optimizer=make_tx,
                                     batches=batches, evaluate=evaluate, layouts=sfn.layouts,
                                     where=presets.masked_where(sfn), devices=spread)
    with logging_utils.MetricsWriter(cfg.workdir) as writer:
        for c in result.cycles:
            writer.write(c.index * cfg.steps, {
                "sparsity": c.sparsity, "best_single_loss": c.ingredients[c.best_single]["loss"],
                "uniform_soup_loss": c.uniform["loss"], "greedy_soup_loss": c.greedy["loss"]},
                split="soups")
    final = result.cycles[-1].merged
    report, masked = sfn.report({"masks": result.masks}), set(sfn.masked_paths)
    summary = logging_utils.format_summary(
        {"cycles": len(result.cycles), "copies": config.copies, "merge": config.merge,
         **{f"eval_{k}": v for k, v in final.items()}},
        sj.optim.masked_sparsity(jax.device_get(result.masks), by_path=True),
        dataclasses.replace(report, rows=[
            dataclasses.replace(r, rule=f"IMP with {config.merge} soups of {config.copies}")
            if r.path in masked else r for r in report.rows]))
    if jax.process_index() == 0:
        with open(os.path.join(cfg.workdir, "summary.txt"), "w") as f:
            f.write(summary + "\n")
        with open(os.path.join(cfg.workdir, FINAL_PARAMS), "wb") as f:
            f.write(serialization.to_bytes(jax.device_get(result.params)))
    print(summary)
    return {"eval": final, "cycles": result.cycles, "params": result.params,
            "masks": result.masks, "sfn": sfn, "history": []}


# ----------------------------------------------------------------------------- across processes


_FLAG_GROUPS["devices and hosts"].update({
    "coordinator_address": "Multi-process runs: host:port of process 0 (or JAX_COORDINATOR_ADDRESS); "
                           "python -m sparsejax.distributed.launch starts N local processes.",
    "num_processes": "Multi-process runs: how many processes (or JAX_NUM_PROCESSES).",
    "process_id": "Multi-process runs: this process's index, 0 on the coordinator (or JAX_PROCESS_ID).",
    "distributed_timeout": "Seconds to join a multi-process run before a one-line error.",
    "outer": "none (DDP: gradients all-reduced every step), diloco or sparseloco (every device of "
             "the data axis is a replica that takes --inner_steps local steps between outer steps).",
    "inner_steps": "DiLoCo/SparseLoCo: H, local steps per replica between outer steps.",
    "outer_lr": "DiLoCo/SparseLoCo: outer learning rate (0: 0.7 for diloco, 1.0 for sparseloco).",
    "outer_momentum": "DiLoCo: outer Nesterov momentum.",
    "outer_density": "SparseLoCo: fraction of each chunk sent (top-k), e.g. 0.01-0.03.",
    "outer_chunk": "SparseLoCo: entries per top-k chunk of a flattened leaf (the last is zero-padded).",
    "outer_bits": "SparseLoCo: bits per sent value: 2 (sign + one of two levels) or 32 (float32).",
    "outer_ef_beta": "SparseLoCo: error-feedback decay beta in e <- beta e + delta.",
})


def outer_loop(cfg: Config, mesh: Mesh, preset, echo=print):
    """The DiLoCo / SparseLoCo outer loop the flags ask for (None for --outer=none)."""
    if cfg.outer not in local_sgd.METHODS:
        raise ValueError(f"--outer {cfg.outer!r}: use none, diloco or sparseloco")
    if cfg.outer == "none":
        return None
    if preset.masks_from != "recipe":
        raise ValueError(f"--outer={cfg.outer} with --recipe={cfg.recipe}: its masks are updated by the "
                         f"optimizer, which each replica would do on its own; use a recipe with "
                         f"fixed masks (e.g. dense, nm24)")
    if mesh.shape["fsdp"] != 1:
        raise ValueError(f"--outer={cfg.outer} with --mesh {cfg.mesh}: every device of the data axis "
                         f"is one replica; use --mesh=data:-1 (no fsdp)")
    try:
        return local_sgd.make_local_sgd(
            cfg.outer, mesh, inner_steps=cfg.inner_steps, outer_lr=cfg.outer_lr,
            outer_momentum=cfg.outer_momentum, density=cfg.outer_density, chunk_size=cfg.outer_chunk,
            value_bits=cfg.outer_bits, error_decay=cfg.outer_ef_beta,
            log_path=os.path.join(cfg.workdir, "outer_steps.jsonl"), echo=echo)
    except ValueError as e:
        raise ValueError(f"--outer={cfg.outer}: {e} (flags --inner_steps, --outer_density, "
                         f"--outer_chunk, --outer_bits, --outer_ef_beta)") from None


def outer_signature(cfg: Config) -> dict:
    """The outer-loop settings a checkpoint depends on (none for plain data parallelism)."""
    if cfg.outer == "none":
        return {}
    return {"outer": cfg.outer, "outer_density": cfg.outer_density,
            "outer_chunk": cfg.outer_chunk, "outer_bits": cfg.outer_bits}


# ----------------------------------------------------------------------------- entry point


def distributed_settings(cfg: Config) -> dict:
    """The flags every process of a multi-process run must share (all but its own id)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("process_id", "coordinator_address", "sigkill_at_step")}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
    cfg = Config(**{f.name: getattr(flags.FLAGS, f.name) for f in dataclasses.fields(Config)
                    if f.name not in _HIDDEN_FIELDS})
    for name, variable in _HIDDEN_FIELDS.items():
        if os.environ.get(variable):
            setattr(cfg, name, int(os.environ[variable]))
    try:
        distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id,
                               timeout_s=cfg.distributed_timeout)
        distributed.check_same_settings(distributed_settings(cfg), name="flags")
        run = prepare(cfg)
    except (ValueError, distributed.DistributedError) as e:
        sys.exit(f"train.py: {e}")
    try:
        train_and_evaluate(run)
    except SetupError as e:
        sys.exit(f"train.py: {e}")


if __name__ == "__main__":
    __doc__ = __doc__ + "\n" + flags_overview()
    define_flags(Config())
    app.run(main)
