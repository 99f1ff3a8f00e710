"""The quality table: every sparsity method on train.py's Transformer LM, one command.

    python benchmarks/quality_table.py                      # the recorded table (CPU, ~40 min)
    python benchmarks/quality_table.py --steps 60 --seeds 0 --rows dense spark8   # a smoke run

Every row trains train.py's LM (``train.train_and_evaluate``) on the default
offline corpus (Python's own source, byte level) with the same model, steps,
batches and learning-rate schedule, so every row sees the same tokens; rows
differ only in the sparsity preset (``sparsejax.training.presets``). Two rows are built
here because no preset expresses them:

* ``monarch4_proj``: a dense run for the first half of the steps, then its final
  weights are projected onto Monarch factors (``--init_from``) and fine-tuned for
  the second half: the same total steps and tokens as every other row.
* ``group_lasso50``: the FFN hidden neurons (gate and up columns, down row) are
  channel groups under proximal AdamW with a group-lasso penalty for the first
  three quarters of the steps; then the 50% of channels with the smallest norms
  in each layer are set to zero (most already are), cut out with
  ``sparsejax.optim.remove_zero_groups`` into a model of half the FFN width, and
  that model trains for the last quarter.

Columns: eval loss (mean ± std over seeds), parameters and forward FLOPs per token
counting only kept weights (masked rows still multiply zeros under XLA; Monarch
and the shrunk model really are smaller), the sparsity reached, and this CPU's
median step time. GPU step and decode times are left for a GPU run.

Writes benchmarks/results/quality_table.{md,json,png} and prints the table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import serialization

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # train.py; the package comes from the install (or device_env.sh)
    sys.path.append(ROOT)

import train  # noqa: E402
from sparsejax import optim  # noqa: E402
from sparsejax.training import presets  # noqa: E402

# (row name, how it is trained, one-line description); presets by name, two built here.
ROWS = [
    ("dense", "preset", "dense"),
    ("gmp50", "preset", "GMP to 50% (cubic, 10%-75% of steps)"),
    ("gmp80", "preset", "GMP to 80%"),
    ("gmp90", "preset", "GMP to 90%"),
    ("static90", "preset", "static random masks 90% (ERK)"),
    ("set90", "preset", "SET 90% (ERK)"),
    ("rigl90", "preset", "RigL 90% (ERK)"),
    ("nm24", "preset", "2:4 with SR-STE"),
    ("nm24_pgf", "preset", "2:4 with Progressive Gradient Flow"),
    ("group_lasso50", "group_lasso", "group-lasso prox to 50% FFN channels, then physically shrunk"),
    ("monarch4", "preset", "Monarch nblocks 4 on FFNs, from scratch"),
    ("monarch4_proj", "projection", "dense, then projected onto Monarch nblocks 4 and fine-tuned"),
    ("spark8", "preset", "Spark statistical top-k, 8% of FFN neurons"),
]
ROW_NAMES = [name for name, _, _ in ROWS]

# What "close to dense" means in the trend checks: relative eval-loss gap.
CLOSE_TO_DENSE = 0.02        # SR-STE 2:4 and Spark 8%
MONARCH_WITHIN = 0.05        # "within a few percent"
NOT_MEASURED_GPU = "not measured (GPU run pending)"
MASK_RULES = ("Prune", "NM", "Block", "Channels")


# ----------------------------------------------------------------------------- configs


def base_config(args, recipe: str, seed: int, workdir: str, steps: int | None = None) -> train.Config:
    steps = args.steps if steps is None else steps
    return train.Config(
        model="lm", data="stdlib", recipe=recipe, steps=steps, batch_size=args.batch_size,
        seq_len=args.seq_len, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
        d_ff=args.d_ff, learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
        seed=seed, workdir=workdir, mesh="data:1", eval_every=steps, checkpoint_every=steps,
        keep_checkpoints=1, log_every=max(steps // 20, 1), eval_batches=args.eval_batches)


def _fresh(path: str) -> str:
    # train.py resumes from a workdir's checkpoints: every run here starts clean.
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def _median_step_ms(history: list[dict]) -> float | None:
    """Median wall time per step between log points, the first interval (compile) dropped."""
    per_step = [(b["time"] - a["time"]) / (b["step"] - a["step"])
                for a, b in zip(history[1:], history[2:]) if b["step"] > a["step"]]
    return 1e3 * float(np.median(per_step)) if per_step else None


# ----------------------------------------------------------------------------- accounting


def _dense_totals(run: train.Prepared) -> tuple[int, int]:
    config = run.model.config
    return config.num_params(), config.flops_per_token(run.cfg.seq_len)


def _final_dense_params(workdir: str) -> dict:
    with open(os.path.join(workdir, train.FINAL_PARAMS), "rb") as f:
        return serialization.msgpack_restore(f.read())


def _leaf(tree: dict, path: str):
    for part in path.split("/"):
        tree = tree[part]
    return np.asarray(tree)


def account(run: train.Prepared, result: dict, workdir: str) -> dict:
    """Kept parameters, ideal FLOPs per token and the sparsity reached, from the report and the
    final weights (masked weights are exact zeros in the params train.py writes)."""
    dense_params, dense_flops = _dense_totals(run)
    tokens_per_call = run.cfg.batch_size * run.cfg.seq_len
    report = result["report"]
    final = _final_dense_params(workdir)
    params, flops = dense_params, dense_flops
    masked_total = masked_zero = 0
    factor_before = factor_after = 0
    for row in report.rows:
        name = row.rule.split("(")[0]
        if name in MASK_RULES:
            zeros = int(np.sum(_leaf(final, row.path) == 0))
            masked_total += row.params_before
            masked_zero += zeros
            params -= zeros
            # a weight is one multiply-add per token at each of its sites
            flops -= zeros * (row.flops_before // (row.params_before * tokens_per_call))
        else:  # factorizations (Monarch): smaller by construction
            factor_before += row.params_before
            factor_after += row.params_after
            params -= row.params_before - row.params_after
            flops -= (row.flops_before - row.flops_after) // tokens_per_call
    out = {"params": int(params), "flops_per_token": int(flops),
           "dense_params": dense_params, "dense_flops_per_token": dense_flops}
    if masked_total:
        out["sparsity"] = masked_zero / masked_total
        out["sparsity_of"] = "weights of the masked kernels that are zero"
    elif factor_before:
        out["sparsity"] = 1.0 - factor_after / factor_before
        out["sparsity_of"] = f"FFN parameters removed ({factor_after} of {factor_before} kept)"
    else:
        out["sparsity"] = 0.0
        out["sparsity_of"] = "-"
    return out


def spark_accounting(run: train.Prepared, result: dict, out: dict) -> dict:
    """Spark keeps every weight; per token, only the fired neurons' up columns and down rows
    are needed. Measures the kept fraction on an eval batch and counts those FLOPs."""
    _, sfn, _ = train.create_state(run)
    state = result["state"]
    masks = optim.forward_masks(state.sstate, state.opt_state)
    batch = next(iter(run.eval_batches()))
    measured = sfn.measure_activations(state.params, {"masks": masks},
                                       jnp.asarray(train.model_inputs(batch)))
    config = run.model.config
    kept = [float(np.mean(np.asarray(m["after"]))) for m in measured if m.get("kind") == "ffn"]
    kept_frac = float(np.mean(kept)) if kept else 1.0
    per_layer_saved = 2 * 2 * config.d_model * config.d_ff * (1.0 - kept_frac)
    out = dict(out)
    out["flops_per_token"] = int(out["dense_flops_per_token"] - config.n_layers * per_layer_saved)
    out["sparsity"] = 1.0 - kept_frac
    out["sparsity_of"] = (f"FFN activations that are zero (measured on one eval batch; "
                          f"{kept_frac:.1%} fire)")
    return out


# ----------------------------------------------------------------------------- rows


def run_preset(args, name: str, seed: int, root: str) -> dict:
    workdir = _fresh(os.path.join(root, f"{name}_s{seed}"))
    run = train.prepare(base_config(args, name, seed, workdir))
    t0 = time.perf_counter()
    result = train.train_and_evaluate(run)
    wall = time.perf_counter() - t0
    acc = account(run, result, workdir)
    if name.startswith("spark"):
        acc = spark_accounting(run, result, acc)
    return {"eval_loss": float(result["eval"]["loss"]), "wall_s": wall,
            "step_ms": _median_step_ms(result["history"]), **acc}


def run_projection(args, seed: int, root: str) -> dict:
    """Dense for the first half of the steps, Monarch (projected) for the second half."""
    first = args.steps // 2
    dense_dir = _fresh(os.path.join(root, f"monarch4_proj_dense_s{seed}"))
    t0 = time.perf_counter()
    dense = train.train_and_evaluate(base_config(args, "dense", seed, dense_dir, steps=first))
    workdir = _fresh(os.path.join(root, f"monarch4_proj_s{seed}"))
    cfg = dataclasses.replace(base_config(args, "monarch4_proj", seed, workdir,
                                          steps=args.steps - first), init_from=dense_dir)
    run = train.prepare(cfg)
    result = train.train_and_evaluate(run)
    wall = time.perf_counter() - t0
    return {"eval_loss": float(result["eval"]["loss"]), "wall_s": wall,
            "step_ms": _median_step_ms(result["history"]),
            "eval_loss_dense_half": float(dense["eval"]["loss"]), **account(run, result, workdir)}


def ffn_channel_groups(n_layers: int):
    """One group per FFN hidden neuron: its gate and up columns and its down row."""
    return [optim.channels((f"params/layers_{i}/mlp/gate/kernel", -1),
                           (f"params/layers_{i}/mlp/up/kernel", -1),
                           (f"params/layers_{i}/mlp/down/kernel", 0)) for i in range(n_layers)]


def _lr_schedule(cfg: train.Config):
    # train.make_optimizer's cosine schedule, so this row sees the same learning rates.
    warmup = min(cfg.warmup_steps, cfg.steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, cfg.steps,
                                              end_value=cfg.learning_rate * 0.1)


def _channel_norms(params, n_layers: int) -> list[np.ndarray]:
    norms = []
    for i in range(n_layers):
        mlp = params["params"][f"layers_{i}"]["mlp"]
        sq = (np.sum(np.square(np.asarray(mlp["gate"]["kernel"])), 0)
              + np.sum(np.square(np.asarray(mlp["up"]["kernel"])), 0)
              + np.sum(np.square(np.asarray(mlp["down"]["kernel"])), 1))
        norms.append(np.sqrt(sq))
    return norms


def _keep_top_channels(params, n_layers: int, keep: int):
    """Zeros every FFN channel outside the ``keep`` largest norms of its layer."""
    params = jax.tree.map(np.array, params)
    for i, norm in enumerate(_channel_norms(params, n_layers)):
        drop = np.argsort(-norm, kind="stable")[keep:]
        mlp = params["params"][f"layers_{i}"]["mlp"]
        mlp["gate"]["kernel"][:, drop] = 0.0
        mlp["up"]["kernel"][:, drop] = 0.0
        mlp["down"]["kernel"][drop, :] = 0.0
    return params


def run_group_lasso(args, seed: int, root: str) -> dict:
    workdir = _fresh(os.path.join(root, f"group_lasso50_s{seed}"))
    cfg = base_config(args, "dense", seed, workdir)
    run = train.prepare(cfg)
    model, n_layers = run.model, cfg.n_layers
    params = jax.jit(model.init)(jax.random.key(cfg.seed), jnp.asarray(train.model_inputs(run.example)))
    schedule = _lr_schedule(cfg)
    prox_steps = (3 * cfg.steps) // 4
    groups = ffn_channel_groups(n_layers)

    def make_step(model, tx):
        def loss_fn(p, batch):
            return train.loss_and_metrics(model.apply(p, train.model_inputs(batch)), batch)

        @jax.jit
        def step(p, opt_state, batch):
            (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, batch)
            updates, opt_state = tx.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, metrics
        return step, jax.jit(lambda p, batch: loss_fn(p, batch)[1])

    def evaluate(eval_step, p):
        total = weight = 0.0
        for batch in run.eval_batches():
            m = jax.device_get(eval_step(p, batch))
            total += float(m["loss"]) * float(m["weight"])
            weight += float(m["weight"])
        return total / max(weight, 1.0)

    t0 = time.perf_counter()
    history = []
    # Phase 1: proximal AdamW, the penalty pushing whole FFN neurons to zero.
    prox = optim.prox_adamw(schedule, optim.group_lasso(args.group_lasso_weight, groups))
    tx = optax.chain(optax.clip_by_global_norm(1.0), prox)
    step, eval_step = make_step(model, tx)
    opt_state = tx.init(params)
    for t in range(prox_steps):
        params, opt_state, metrics = step(params, opt_state, run.train_batches.batch(t))
        if (t + 1) % cfg.log_every == 0:
            jax.block_until_ready(params)
            history.append({"step": t + 1, "time": time.perf_counter()})
    norms = _channel_norms(jax.device_get(params), n_layers)
    zeroed_by_prox = [float(np.mean(n == 0)) for n in norms]
    keep = cfg.d_ff // 2
    if any(np.sum(n > 0) < keep for n in norms):
        raise RuntimeError(f"group_lasso50: the prox zeroed more than half the FFN channels of a "
                           f"layer ({zeroed_by_prox}); lower --group_lasso_weight "
                           f"({args.group_lasso_weight})")
    cut = _keep_top_channels(jax.device_get(params), n_layers, keep)
    loss_before_cut = evaluate(eval_step, params)
    loss_cut = evaluate(eval_step, cut)
    small, kept = optim.remove_zero_groups(cut, groups)
    if any(v != keep for v in kept.values()):
        raise RuntimeError(f"group_lasso50: expected {keep} channels per layer, kept {kept}")
    small_cfg = dataclasses.replace(cfg, d_ff=keep)
    small_model, _ = train.build_model(small_cfg, run.model.config.vocab_size)
    small = jax.tree.map(jnp.asarray, small)
    _, small_eval = make_step(small_model, optax.identity())
    loss_small = evaluate(small_eval, small)
    # The cut model computes what the zeroed one does: a check on remove_zero_groups.
    if abs(loss_small - loss_cut) > 1e-4 * max(1.0, abs(loss_cut)):
        raise RuntimeError(f"group_lasso50: shrunk model loss {loss_small} != zeroed model {loss_cut}")
    # Phase 2: the physically smaller model trains for the remaining steps, continuing the schedule.
    tx2 = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(lambda t: schedule(t + prox_steps), weight_decay=cfg.weight_decay))
    step2, _ = make_step(small_model, tx2)
    opt_state2 = tx2.init(small)
    for t in range(prox_steps, cfg.steps):
        small, opt_state2, metrics = step2(small, opt_state2, run.train_batches.batch(t))
        if (t + 1) % cfg.log_every == 0:
            jax.block_until_ready(small)
            history.append({"step": t + 1, "time": time.perf_counter()})
    loss = evaluate(small_eval, small)
    wall = time.perf_counter() - t0
    dense_params, dense_flops = _dense_totals(run)
    small_config = small_model.config
    # the step time reported is the prox phase (its bisection makes it the slower one)
    return {"eval_loss": loss, "wall_s": wall, "step_ms": _median_step_ms(history[:len(history) // 2]),
            "params": small_config.num_params(),
            "flops_per_token": small_config.flops_per_token(cfg.seq_len),
            "dense_params": dense_params, "dense_flops_per_token": dense_flops,
            "sparsity": 0.5, "sparsity_of": ("FFN channels removed; the prox alone zeroed "
                                             + ", ".join(f"{z:.0%}" for z in zeroed_by_prox)
                                             + " per layer"),
            "zeroed_by_prox": zeroed_by_prox, "eval_loss_before_cut": loss_before_cut,
            "eval_loss_after_cut": loss_cut, "group_lasso_weight": args.group_lasso_weight}


def run_row(args, name: str, seed: int, root: str) -> dict:
    kind = dict((n, k) for n, k, _ in ROWS)[name]
    if kind == "preset":
        return run_preset(args, name, seed, root)
    if kind == "projection":
        return run_projection(args, seed, root)
    return run_group_lasso(args, seed, root)


# ----------------------------------------------------------------------------- outputs


def environment(argv: list[str]) -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"
    device = jax.devices()[0]
    return {"command": "python benchmarks/quality_table.py " + " ".join(argv),
            "device": f"{device.platform.upper()} ({device.device_kind}; "
                      f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "python": platform.python_version(), "commit": git("rev-parse", "HEAD"),
            "tree_dirty": bool(git("status", "--porcelain", "--", "benchmarks/quality_table.py",
                                   "train.py", "sparsejax", "compiler", "models"))}


def summarize(results: dict) -> dict:
    out = {}
    for name, runs in results.items():
        losses = np.array([r["eval_loss"] for r in runs])
        first = runs[0]
        steps = [r["step_ms"] for r in runs if r.get("step_ms")]
        sparsity_of = first["sparsity_of"]
        if "zeroed_by_prox" in first:
            sparsity_of = ("FFN channels removed; the prox alone had zeroed "
                           + "; ".join("/".join(f"{z:.0%}" for z in r["zeroed_by_prox"])
                                       + f" (seed {r['seed']})" for r in runs)
                           + " per layer")
        out[name] = {"mean": float(losses.mean()), "std": float(losses.std(ddof=1)) if len(losses) > 1 else None,
                     "n": len(losses), "params": first["params"],
                     "flops_per_token": first["flops_per_token"],
                     "sparsity": float(np.mean([r["sparsity"] for r in runs])),
                     "sparsity_of": sparsity_of,
                     "step_ms": float(np.median(steps)) if steps else None}
    return out


def trend_checks(s: dict) -> list[tuple[str, bool | None, str]]:
    """(claim, holds, evidence) for each trend the papers report."""
    def have(*names):
        return all(n in s for n in names)

    def gap(name):
        return s[name]["mean"] / s["dense"]["mean"] - 1.0

    def pm(name):
        std = s[name]["std"]
        return f"{s[name]['mean']:.4f}" + ("" if std is None else f" ± {std:.4f}")

    checks = []
    if have("rigl90", "set90", "static90"):
        r, st, sc = (s[n]["mean"] for n in ("rigl90", "set90", "static90"))
        def resolved(a, b):
            # two seeds resolve a gap only when it exceeds both rows' seed spread
            spread = max(s[a]["std"] or 0.0, s[b]["std"] or 0.0)
            gap_ab = abs(s[a]["mean"] - s[b]["mean"])
            return (f"gap {gap_ab:.4f}, larger seed std {spread:.4f}: "
                    + ("the gap exceeds the seed spread" if gap_ab > spread
                       else "within seed noise"))
        checks.append(("RigL ≥ SET at 90% (eval loss RigL ≤ SET)", r <= st,
                       f"RigL {pm('rigl90')} vs SET {pm('set90')}; {resolved('rigl90', 'set90')}"))
        checks.append(("SET ≥ static at 90% (eval loss SET ≤ static)", st <= sc,
                       f"SET {pm('set90')} vs static {pm('static90')}; {resolved('set90', 'static90')}"))
    if have("dense", "nm24"):
        checks.append((f"SR-STE 2:4 close to dense (within {CLOSE_TO_DENSE:.0%})",
                       abs(gap("nm24")) <= CLOSE_TO_DENSE,
                       f"2:4 SR-STE {pm('nm24')} vs dense {pm('dense')}: {gap('nm24'):+.1%}"))
    for name, label in (("monarch4", "from scratch"), ("monarch4_proj", "dense → projected")):
        if have("dense", name):
            ffn_kept = 1.0 - s[name]["sparsity"]
            checks.append((f"Monarch nblocks 4 ({label}) within {MONARCH_WITHIN:.0%} of dense at about "
                           "half the FFN params", abs(gap(name)) <= MONARCH_WITHIN,
                           f"{pm(name)} vs dense {pm('dense')}: {gap(name):+.1%}; FFN params kept "
                           f"{ffn_kept:.0%}"))
    if have("dense", "spark8"):
        checks.append((f"Spark 8% close to dense (within {CLOSE_TO_DENSE:.0%})",
                       abs(gap("spark8")) <= CLOSE_TO_DENSE,
                       f"Spark {pm('spark8')} vs dense {pm('dense')}: {gap('spark8'):+.1%}"))
    return checks


def _si(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.0f}"


def table_lines(s: dict, results: dict) -> list[str]:
    desc = {n: d for n, _, d in ROWS}
    dense = s.get("dense")
    lines = ["| row | method | seeds | eval loss (mean ± std) | vs dense | params (kept) | "
             "FLOPs/token (kept) | sparsity reached | CPU step (ms) | H100 train step | H100 decode |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ROW_NAMES:
        if name not in s:
            continue
        r = s[name]
        std = "" if r["std"] is None else f" ± {r['std']:.4f}"
        rel = "—" if dense is None or name == "dense" else f"{r['mean'] / dense['mean'] - 1:+.1%}"
        pr = "" if dense is None else f" ({r['params'] / dense['params']:.2f}×)"
        fr = "" if dense is None else f" ({r['flops_per_token'] / dense['flops_per_token']:.2f}×)"
        sp = "—" if r["sparsity_of"] == "-" else f"{r['sparsity']:.1%} ({r['sparsity_of']})"
        step = "—" if r["step_ms"] is None else f"{r['step_ms']:.0f}"
        lines.append(f"| {name} | {desc[name]} | {r['n']} | {r['mean']:.4f}{std} | {rel} | "
                     f"{_si(r['params'])}{pr} | {_si(r['flops_per_token'])}{fr} | {sp} | {step} | "
                     f"{NOT_MEASURED_GPU} | {NOT_MEASURED_GPU} |")
    return lines


def plot(s: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in ROW_NAMES if n in s]
    means = [s[n]["mean"] for n in names]
    errs = [s[n]["std"] or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    colors = ["#444444" if n == "dense" else "#3b75af" for n in names]
    ax.bar(range(len(names)), means, yerr=errs, capsize=4, color=colors)
    if "dense" in s:
        ax.axhline(s["dense"]["mean"], color="#444444", lw=1, ls="--", label="dense")
        ax.legend(loc="upper left")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    lo = min(means) - 0.1 * (max(means) - min(means) + 1e-3)
    ax.set_ylim(max(0.0, lo - max(errs)), max(m + e for m, e in zip(means, errs)) * 1.01)
    ax.set_ylabel("eval loss (nats/byte)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def variant_lines(variants, s: dict) -> list[str]:
    """A table of variants measured once and not kept (each beside the row it varies)."""
    if not variants:
        return []
    lines = ["## Variants measured and not kept", "",
             "| variant | of row | seeds | eval loss (mean ± std) | the row now | measured with |",
             "|---|---|---|---|---|---|"]
    for v in variants:
        losses = np.asarray([r["eval_loss"] for r in v["runs"]])
        row = s.get(v["row"])
        now = f"{row['mean']:.4f} ± {row['std']:.4f}" if row and row["std"] is not None else "—"
        spread = f" ± {losses.std(ddof=1):.4f}" if len(losses) > 1 else ""   # as summarize()
        lines.append(f"| {v['name']} | {v['row']} | {len(losses)} | {losses.mean():.4f}{spread} | "
                     f"{now} | `{v['command']}` at commit {v['commit']} |")
    lines.append("")
    lines += [f"- {v['name']}: {v['why']}" for v in variants]
    return lines + [""]


def write_outputs(args, argv, results, env, total_wall, reruns=(), variants=()) -> str:
    s = summarize(results)
    checks = trend_checks(s)
    out = args.out
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tokens = args.steps * args.batch_size * args.seq_len
    setup = (f"LM d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, gated FFN d_ff "
             f"{args.d_ff}, byte vocabulary; seq {args.seq_len}, batch {args.batch_size}, "
             f"{args.steps} steps ({tokens:,} training tokens) for every row; AdamW lr "
             f"{args.learning_rate}, {args.warmup_steps} warm-up steps, cosine to 10%, gradient clip 1.0; "
             f"eval loss over {args.eval_batches} held-out batches ({args.eval_batches * args.batch_size * args.seq_len:,} tokens); "
             f"seeds {args.seeds} (seed sets the init, masks and batch order).")
    md = ["# Quality table: sparsity methods on train.py's Transformer LM", "",
          f"Command: `{env['command'].strip()}` (from the repository root)", "",
          f"Device: {env['device']}; JAX {env['jax']}, flax {env['flax']}, optax {env['optax']}, "
          f"Python {env['python']}; commit {env['commit'][:12]}"
          + (" (with uncommitted changes)" if env["tree_dirty"] else "") + ".", "",
          setup, "", *[f"Rows {', '.join(r['rows'])} were rerun with `{r['command']}` at commit "
                       f"{r['commit']} ({r['why']}); the table takes {', '.join(r['replaced'])} from "
                       f"that run{' (static90 reproduced its recorded losses exactly)' if r.get('static90_reproduced') else ''}."
                       for r in reruns],
          *([""] if reruns else []), *table_lines(s, results), "",
          "Params and FLOPs count kept weights only (embedding and head included; FLOPs are forward "
          "matmul FLOPs per token with attention at the full sequence length). Masked rows still "
          "run dense matmuls under XLA: their FLOPs are what a sparse kernel could skip. Monarch and "
          "the shrunk group-lasso model are really smaller. Spark keeps every weight; its FLOPs count "
          "the full gate projection and only the fired neurons' up columns and down rows. "
          "CPU step is the median wall time of a training step on this (shared) machine; it is not "
          "a speed claim. H100 columns wait for a GPU session.", "",
          "## Trends the papers report", ""]
    for claim, holds, evidence in checks:
        md.append(f"- {claim}: **{'holds' if holds else 'does not hold'}** ({evidence})")
    md += ["", *variant_lines(variants, s), "![eval loss per row](quality_table.png)", "",
           f"Wall time: {total_wall / 60:.1f} min.", ""]
    with open(out, "w") as f:
        f.write("\n".join(md))
    base = os.path.splitext(out)[0]
    plot(s, base + ".png", f"eval loss, {args.steps} steps × {args.batch_size}×{args.seq_len} tokens, "
                           f"seeds {', '.join(map(str, args.seeds))} (bars: std over seeds)")
    with open(base + ".json", "w") as f:
        json.dump({"environment": env, "setup": vars(args), "summary": s,
                   "trends": [{"claim": c, "holds": h, "evidence": e} for c, h, e in checks],
                   "runs": results, "wall_s": total_wall, "reruns": list(reruns),
                   **({"variants": list(variants)} if variants else {})}, f, indent=1)
    return "\n".join(table_lines(s, results) + [""] +
                     [f"- {c}: {'holds' if h else 'does not hold'} ({e})" for c, h, e in checks])


# ----------------------------------------------------------------------------- main


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", default=ROW_NAMES, choices=ROW_NAMES)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--d_model", type=int, default=64)
    ap.add_argument("--n_layers", type=int, default=2)
    ap.add_argument("--n_heads", type=int, default=4)
    ap.add_argument("--d_ff", type=int, default=192)
    ap.add_argument("--learning_rate", type=float, default=3e-3)
    ap.add_argument("--warmup_steps", type=int, default=50)
    ap.add_argument("--eval_batches", type=int, default=16)
    ap.add_argument("--group_lasso_weight", type=float, default=1e-4,
                    help="group-lasso penalty of the group_lasso50 row")
    ap.add_argument("--workdir", default="", help="where runs write (default: a temporary folder)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "quality_table.md"))
    args = ap.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "eval_batches"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.steps < 4:
        ap.error("--steps must be at least 4 (the projection and group-lasso rows split the steps)")
    return args


def render(json_path: str, out: str) -> str:
    """Rewrites the Markdown, PNG and JSON from a recorded JSON (no training).

    A JSON may list ``reruns``: rows trained again later (command, commit, why,
    which rows replaced the recorded ones); the Markdown says so above the table. It may
    list ``variants``: a row trained another way and not kept (name, row, runs, command,
    commit, why), tabled beside the row.
    """
    with open(json_path) as f:
        saved = json.load(f)
    args = argparse.Namespace(**{**saved["setup"], "out": out})
    env = saved["environment"]
    argv = env["command"].split()[2:]
    return write_outputs(args, argv, saved["runs"], env, saved["wall_s"], saved.get("reruns", ()),
                         saved.get("variants", ()))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--render"]:
        # python benchmarks/quality_table.py --render results.json [out.md]
        json_path = argv[1]
        out = argv[2] if len(argv) > 2 else os.path.splitext(json_path)[0] + ".md"
        print(render(json_path, out))
        return
    args = parse(argv)
    logging.set_verbosity(logging.WARNING)
    env = environment(argv)
    root = args.workdir or tempfile.mkdtemp(prefix="quality_table_")
    results: dict[str, list[dict]] = {}
    t0 = time.perf_counter()
    for name in [n for n in ROW_NAMES if n in args.rows]:
        for seed in args.seeds:
            r = run_row(args, name, seed, root)
            r["seed"] = seed
            results.setdefault(name, []).append(r)
            print(f"[quality_table] {name} seed {seed}: eval loss {r['eval_loss']:.4f}, "
                  f"{r['wall_s']:.0f}s ({(time.perf_counter() - t0) / 60:.1f} min so far)",
                  file=sys.stderr, flush=True)
    table = write_outputs(args, argv, results, env, time.perf_counter() - t0)
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)
    print(table)


if __name__ == "__main__":
    main()
