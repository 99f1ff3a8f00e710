"""Activation sparsity quality: TEAL / CATS / CHESS thresholds and Spark top-k without training,
and a ProSparse fine-tune, on a dense LM trained in the script. One command:

    python benchmarks/activation_quality.py            # the recorded CPU run (<= 15 min)
    python benchmarks/activation_quality.py --smoke    # a quick end-to-end check
    python benchmarks/activation_quality.py --large    # a larger model, for a GPU

Trains train.py's LM dense (``benchmarks/dense_lm.train_dense_lm``: its corpus,
Python's own source at byte level, and its loop), then reports held-out perplexity with
activation sparsity at 25 / 40 / 50 / 65%:

* TEAL: thresholds on the input of every q/k/v/o/gate/up/down matmul, each calibrated
  to the target on training-split batches the run never saw;
* CATS: thresholds on |silu(gate)| in each FFN;
* CHESS: channel-wise thresholds on silu(gate) (weighted by E|up|) plus the input of
  the attention output projection;
* SparkTopK: statistical top-k of the FFN pre-activation keeping 1 - target.

Then ProSparse: ReLU substituted for SiLU, fine-tuned from the dense weights with an
L1 penalty on the FFN activations whose factor rises in sine-shaped stages
(``prosparse_l1_schedule``), evaluated with ReLU and with a shifted ReLU (FATReLU).
The sparsity column is what the thresholds give on the calibration batches (their
mean over sites and layers), or for ProSparse/Spark the measured fraction of zero FFN
activations on a held-out batch.

Writes benchmarks/results/activation_quality.{md,json} (or $OUT/) and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "benchmarks")):
    if p not in sys.path:   # train.py, dense_lm.py; the package comes from the install
        sys.path.append(p)

import sparsejax as sj  # noqa: E402
from dense_lm import commit as _commit, train_dense_lm  # noqa: E402
from sparsejax.models import transformer  # noqa: E402
from sparsejax.optim import prosparse_l1_schedule  # noqa: E402
from sparsejax.rules import CATS, CHESS, TEAL, ReLUActivation, SparkTopK  # noqa: E402

LEVELS = (0.25, 0.40, 0.50, 0.65)
METHODS = ("TEAL", "CATS", "CHESS", "SparkTopK")
GOAL_PROSPARSE_SPARSITY, GOAL_PROSPARSE_PPL = 0.85, 0.05


def rule_for(method: str, s: float):
    if method == "TEAL":
        return TEAL(sparsity=s)
    if method == "CATS":
        return CATS(sparsity=s)
    if method == "CHESS":
        return CHESS(sparsity=s)
    return SparkTopK(k_frac=1.0 - s)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d_model", type=int, default=128)
    ap.add_argument("--n_layers", type=int, default=2)
    ap.add_argument("--n_heads", type=int, default=4)
    ap.add_argument("--d_ff", type=int, default=384)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--learning_rate", type=float, default=3e-3)
    ap.add_argument("--calib_batches", type=int, default=4)
    ap.add_argument("--eval_batches", type=int, default=8)
    ap.add_argument("--ft_steps", type=int, default=600, help="ProSparse fine-tuning steps")
    ap.add_argument("--ft_learning_rate", type=float, default=1e-3)
    ap.add_argument("--l1", type=float, default=2.0, help="final L1 factor of ProSparse's stages")
    ap.add_argument("--fatrelu", type=float, default=0.05, help="ProSparse's shifted-ReLU threshold")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--smoke", action="store_true", help="tiny and quick: checks the script end to end")
    ap.add_argument("--large", action="store_true", help="a larger model (GPU)")
    args = ap.parse_args()
    if args.smoke:
        args.d_model, args.n_layers, args.d_ff, args.steps, args.ft_steps = 32, 1, 64, 20, 12
        args.calib_batches, args.eval_batches, args.seq_len, args.batch_size = 1, 1, 32, 4
    if args.large:
        args.d_model, args.n_layers, args.n_heads, args.d_ff = 512, 8, 8, 2048
        args.steps, args.ft_steps, args.batch_size, args.seq_len = 3000, 1500, 32, 256
        args.calib_batches, args.eval_batches = 8, 32
    logging.set_verbosity(logging.WARNING)
    t_start = time.time()
    dense = train_dense_lm(args)
    model, params, calib, evals = dense.model, dense.params, dense.calib, dense.evals
    dense_ppl = dense.perplexity(params)
    print(f"dense: {dense.n_params / 1e6:.2f}M parameters, perplexity {dense_ppl:.3f} "
          f"({dense.train_seconds:.0f} s of training)", flush=True)
    probe = calib[0][0]

    results = {}
    for method in METHODS:
        for s in LEVELS:
            sfn = sj.sparsify(model.apply, [rule_for(method, s)])
            sp, ss = sfn.init(params, probe)
            if method == "SparkTopK":
                measured = float(np.mean([1.0 - r["after"] for r in sfn.measure_activations(
                    sp, ss, jnp.asarray(evals[0]["inputs"])) if r["kind"] == "ffn"]))
            else:
                ss = sfn.calibrate(sp, ss, calib)
                measured = float(np.mean([np.mean(v["measured"]) for v in sfn._threshold_info.values()]))
            run_fn = jax.jit(lambda p, x, sfn=sfn, ss=ss: sfn(p, ss, x))
            ppl = dense.perplexity(sp, run_fn)
            results[(method, s)] = {"ppl": ppl, "sparsity": measured}
            print(f"{method:<9} {s:.0%}: ppl {ppl:.3f} (sparsity {measured:.1%})", flush=True)

    # ProSparse: ReLU substitution + progressive L1 on the FFN activations, from the dense model.
    t0 = time.time()
    sfn = sj.sparsify(model.apply, [ReLUActivation()])
    sp, ss = sfn.init(params, probe)
    relu_ppl = dense.perplexity(sp, jax.jit(lambda p, x: sfn(p, ss, x)))
    with_aux = sfn.with_aux()
    third = max(args.ft_steps // 3, 1)
    factor = prosparse_l1_schedule([(third, args.l1 / 4), (third, args.l1 / 2),
                                    (args.ft_steps - 2 * third, args.l1)])

    def finetune(p, forward, label):
        """``args.ft_steps`` of AdamW on ``forward(p, inputs) -> (logits, aux)``'s LM loss plus
        ``factor(step) * aux["activation_l1"]`` (when aux has it), on batches the dense run
        never saw (the same for every call)."""
        opt = optax.adamw(args.ft_learning_rate, weight_decay=0.0)
        opt_state = opt.init(p)

        @jax.jit
        def step(p, opt_state, batch, count):
            def loss_fn(p):
                logits, aux = forward(p, batch["inputs"])
                lm = transformer.lm_loss(logits, batch["targets"], batch["weights"])
                return lm + factor(count) * aux.get("activation_l1", 0.0), (lm, aux)
            (_, (lm, aux)), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
            updates, opt_state = opt.update(g, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, lm, aux

        for i in range(args.ft_steps):
            b = dense.run.train_batches.batch(args.steps + 5000 + i)
            batch = {"inputs": jnp.asarray(b["inputs"]), "targets": jnp.asarray(b["targets"]),
                     "weights": jnp.asarray(b.get("weights", np.ones(b["targets"].shape, np.float32)))}
            p, opt_state, lm, aux = step(p, opt_state, batch, i)
            if i % max(args.ft_steps // 6, 1) == 0 or i == args.ft_steps - 1:
                sparsity = aux.get("activation_sparsity")
                print(f"{label} step {i}: lm loss {float(lm):.3f}, L1 factor {float(factor(i)):.3f}"
                      + ("" if sparsity is None else f", FFN sparsity {float(sparsity):.1%}"), flush=True)
        return p

    sp = finetune(sp, lambda p, x: with_aux(p, ss, x), "prosparse")
    ft_seconds = time.time() - t0
    # The control: the dense model fine-tuned the same steps on the same batches, without
    # ReLU or L1 (the dense run is short, so extra steps alone lower the perplexity).
    control = finetune(params, lambda p, x: (model.apply(p, x), {}), "dense control")
    control_ppl = dense.perplexity(control)
    print(f"dense fine-tuned the same steps: ppl {control_ppl:.3f}", flush=True)
    prosparse = {}
    for label, t in (("ReLU", 0.0), (f"FATReLU {args.fatrelu}", args.fatrelu)):
        f = sj.sparsify(model.apply, [ReLUActivation(threshold=t)])
        _, fss = f.init(params, probe)
        aux_fn = jax.jit(f.with_aux())
        sparsity = float(np.mean([float(aux_fn(sp, fss, jnp.asarray(b["inputs"]))[1]["activation_sparsity"])
                                  for b in evals]))
        ppl = dense.perplexity(sp, jax.jit(lambda p, x, f=f, fss=fss: f(p, fss, x)))
        prosparse[label] = {"ppl": ppl, "sparsity": sparsity}
        print(f"ProSparse {label}: ppl {ppl:.3f}, FFN sparsity {sparsity:.1%}", flush=True)

    command = "python benchmarks/activation_quality.py" + (" --smoke" if args.smoke else "") + \
        (" --large" if args.large else "")
    lines = ["# Activation sparsity quality", "",
             f"Command: `{command}` · device: {jax.devices()[0].device_kind} "
             f"({platform.processor() or platform.machine()}) · JAX {jax.__version__} · "
             f"commit {_commit()} · wall time {(time.time() - t_start) / 60:.1f} min.", "",
             f"Model: train.py's LM, d_model {args.d_model}, {args.n_layers} layers, d_ff {args.d_ff} "
             f"(SwiGLU), {dense.n_params / 1e6:.2f}M parameters, trained dense for {args.steps} steps "
             f"of {args.batch_size}×{args.seq_len} tokens on the stdlib corpus (byte level). "
             f"Calibration: {args.calib_batches}×{args.batch_size} training-split sequences. "
             f"Perplexity on {len(evals)} held-out batches.", "",
             f"Dense perplexity: {dense_ppl:.3f}", "",
             "Without training (perplexity; in brackets the sparsity the rule gives: thresholds "
             "on the calibration batches, mean over sites and layers; Spark on a held-out batch). "
             "TEAL: inputs of q/k/v/o/gate/up/down; CATS: silu(gate); CHESS: silu(gate) "
             "channel-wise + the o projection's input; SparkTopK: the gate pre-activation.", "",
             "| target sparsity | " + " | ".join(METHODS) + " |",
             "|---|" + "---|" * len(METHODS)]
    for s in LEVELS:
        lines.append(f"| {s:.0%} | " + " | ".join(
            f"{results[(m, s)]['ppl']:.3f} ({results[(m, s)]['sparsity']:.1%})" for m in METHODS) + " |")
    lines += ["", f"ProSparse: ReLU substituted for SiLU (perplexity {relu_ppl:.3f} before "
              f"fine-tuning), then {args.ft_steps} steps of AdamW (lr {args.ft_learning_rate}) on "
              f"the LM loss + λ·mean|relu(gate)|, λ rising in three sine-shaped stages to "
              f"{args.l1} ({ft_seconds:.0f} s).", "",
              f"Control: the dense model fine-tuned the same {args.ft_steps} steps on the same "
              f"batches without ReLU or L1: perplexity {control_ppl:.3f} (the dense run is short, "
              "so extra steps alone lower perplexity; the fair comparison is against this).", "",
              "| ProSparse | perplexity | vs dense | vs dense fine-tuned equally | FFN activation sparsity |",
              "|---|---|---|---|---|"]
    for label, r in prosparse.items():
        lines.append(f"| {label} | {r['ppl']:.3f} | {r['ppl'] / dense_ppl - 1:+.1%} | "
                     f"{r['ppl'] / control_ppl - 1:+.1%} | {r['sparsity']:.1%} |")
    best = max(prosparse.values(), key=lambda r: r["sparsity"])
    met = best["sparsity"] >= GOAL_PROSPARSE_SPARSITY and best["ppl"] <= control_ppl * (1 + GOAL_PROSPARSE_PPL)
    lines += ["", f"- ProSparse goal (issue 18: >= 85% FFN activation sparsity, perplexity within 5% "
              f"of dense; here against the equally fine-tuned dense control): {best['sparsity']:.1%} "
              f"at {best['ppl'] / control_ppl - 1:+.1%}: {'met' if met else 'not met'}"]
    table = "\n".join(lines) + "\n"
    out_dir = os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results")
    name = "activation_quality_smoke" if args.smoke else "activation_quality"
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, name + ".md"), "w") as f:
        f.write(table)
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump({"dense_ppl": dense_ppl, "args": vars(args), "relu_ppl": relu_ppl,
                   "results": {f"{m} {s}": v for (m, s), v in results.items()},
                   "prosparse": prosparse, "dense_finetuned_ppl": control_ppl}, f, indent=1)
    print(table)


if __name__ == "__main__":
    main()
