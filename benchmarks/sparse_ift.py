"""Sparse Iso-FLOP Transformations on the LM of train.py: dense vs each at equal FLOPs.

Rows: the dense LM, then Sparse Wide / Parallel / Factorized / Doped at s = 0.5 and
0.75, each applied by ``sparsify`` to the FFN weights (up, gate, down) of every
block of the same unmodified ``TransformerLM``. Every row trains the same steps on
the same batches (per seed) with the same optimizer; the FFN FLOPs per token,
counted at density from ``sfn.report()``, equal the dense model's (the table shows
the ratio). Held-out loss on the offline corpus (Python's own source, byte level).

  python benchmarks/sparse_ift.py            # CPU: the recorded table (about 20 min)
  python benchmarks/sparse_ift.py --large    # GPU (H200, <= 8 min): a bigger LM, more steps
  python benchmarks/sparse_ift.py --smoke    # seconds: the pipeline end to end

Prints the table last; writes it to --out (default: benchmarks/results/sparse_ift.md
on CPU) and to $OUT/sparse_ift.md when $OUT is set.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax as sj
from sparsejax.training import data
from sparsejax.models.transformer import TransformerConfig, TransformerLM, lm_loss

FFN = "*/mlp/*/kernel"
KINDS = {"Sparse Wide": sj.SparseWide, "Sparse Parallel": sj.SparseParallel,
         "Sparse Factorized": sj.SparseFactorized, "Sparse Doped": sj.SparseDoped}
SIZES = {   # d_model, n_layers, n_heads, d_ff, seq_len, batch, steps, eval batches, lr
    "cpu": dict(d_model=64, n_layers=2, n_heads=4, d_ff=128, seq_len=64, batch=16, steps=300,
                eval_batches=16, lr=3e-3),
    # 27 runs (9 rows x 3 seeds) in about 6-8 min on one H200: compiles dominate a run.
    "large": dict(d_model=256, n_layers=4, n_heads=4, d_ff=512, seq_len=256, batch=32,
                  steps=600, eval_batches=32, lr=1e-3),
    "smoke": dict(d_model=32, n_layers=1, n_heads=2, d_ff=32, seq_len=16, batch=4, steps=6,
                  eval_batches=2, lr=3e-3),
}


def rows(sparsities):
    out = [("dense", None, None)]
    for s in sparsities:
        out += [(f"{name} s={s}", rule, s) for name, rule in KINDS.items()]
    return out


def ffn_flops(sfn, dense_report=None):
    """(dense, after) FFN FLOPs per call from the report (sparse ones counted at density)."""
    rows = [r for r in sfn.report().rows if "mlp" in r.path]
    return sum(r.flops_before for r in rows), sum(r.flops_after for r in rows)


def train_one(cfg: TransformerConfig, rule, seed: int, text, size) -> dict:
    model = TransformerLM(cfg)
    batches = data.LMBatches(text.train, size["batch"], size["seq_len"], seed=seed)
    example = jnp.asarray(batches.batch(0)["inputs"])
    params = model.init(jax.random.key(seed), example)
    if rule is None:
        apply = lambda p, s, x: model.apply(p, x)
        sparams, sstate, flops = params, None, (1, 1)
    else:
        sfn = sj.sparsify(model.apply, rule)
        sparams, sstate = sfn.init(params, example, rng=jax.random.key(1000 + seed))
        apply, flops = sfn, ffn_flops(sfn)
    steps = size["steps"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, size["lr"], max(steps // 20, 1), steps,
                                                  size["lr"] * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))

    def loss(p, batch):
        return lm_loss(apply(p, sstate, batch["inputs"]), batch["targets"])

    @jax.jit
    def step(p, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(p, batch)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, value

    eval_loss = jax.jit(lambda p, b: jnp.sum(
        lm_loss(apply(p, sstate, b["inputs"]), b["targets"], b["weights"]) * jnp.sum(b["weights"])))
    opt_state = tx.init(sparams)
    start = time.perf_counter()
    for position in range(steps):
        batch = {k: jnp.asarray(v) for k, v in batches.batch(position).items()}
        sparams, opt_state, train_loss = step(sparams, opt_state, batch)
    total = count = 0.0
    for b in data.lm_eval_batches(text.valid, size["batch"], size["seq_len"], size["eval_batches"]):
        b = {k: jnp.asarray(v) for k, v in b.items()}
        total += float(eval_loss(sparams, b))
        count += float(jnp.sum(b["weights"]))
    return {"eval_loss": total / count, "train_loss": float(train_loss),
            "flops_ratio": flops[1] / flops[0], "seconds": time.perf_counter() - start}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--large", action="store_true", help="the GPU configuration")
    ap.add_argument("--smoke", action="store_true", help="a few steps, one seed (checks the script)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    size = dict(SIZES["large" if args.large else "smoke" if args.smoke else "cpu"])
    if args.steps:
        size["steps"] = args.steps
    seeds = args.seeds[:1] if args.smoke else args.seeds
    text = data.load_text_data("stdlib", max_bytes=400_000 if args.smoke else 4_000_000)
    cfg = TransformerConfig(vocab_size=text.vocab_size, d_model=size["d_model"],
                            n_layers=size["n_layers"], n_heads=size["n_heads"], d_ff=size["d_ff"],
                            scan_layers=True)
    began = time.perf_counter()
    results = {}

    def write(final: bool):
        wall = time.perf_counter() - began
        dense = np.array([x["eval_loss"] for x in results["dense"]])
        lines = ["| method | FFN FLOPs vs dense | eval loss (mean ± std) | vs dense | per seed eval loss | train s/run |",
                 "|---|---|---|---|---|---|"]
        for name, r in results.items():
            losses = np.array([x["eval_loss"] for x in r])
            lines.append(f"| {name} | {r[0]['flops_ratio']:.4f} | {losses.mean():.4f} ± {losses.std():.4f} "
                         f"| {losses.mean() - dense.mean():+.4f} | {', '.join(f'{x:.4f}' for x in losses)} "
                         f"| {np.mean([x['seconds'] for x in r]):.0f} |")
        claims = []
        for s in args.sparsities:
            if f"Sparse Wide s={s}" not in results:
                continue
            wide = np.array([x["eval_loss"] for x in results[f"Sparse Wide s={s}"]])
            spread = max(wide.max() - wide.min(), dense.max() - dense.min())
            holds = wide.max() < dense.min()
            claims.append(f"- Sparse Wide s={s} beats dense beyond the seeds' spread (its worst seed "
                          f"below dense's best): **{holds}** (mean {wide.mean():.4f} vs "
                          f"{dense.mean():.4f}, gap {dense.mean() - wide.mean():+.4f}, largest "
                          f"seed range {spread:.4f})")
        device = jax.devices()[0]
        setup = (f"TransformerLM (train.py's LM, nn.scan blocks) d_model {cfg.d_model}, {cfg.n_layers} "
                 f"layers, {cfg.n_heads} heads, d_ff {cfg.d_ff}, byte vocab {cfg.vocab_size}; seq_len "
                 f"{size['seq_len']}, batch {size['batch']}, {size['steps']} steps for every row, AdamW "
                 f"(lr {size['lr']}, warmup-cosine, weight decay 0.01, clip 1.0), seeds {seeds}; each "
                 f"transformation on the FFN weights of every block with static random masks; held-out "
                 f"loss (nats/byte) over {size['eval_batches']} batches of the stdlib corpus's held-out "
                 "split. FFN FLOPs from sfn.report(), sparse weights counted at density. ± is the "
                 "standard deviation over seeds (ddof 0).")
        command = "python benchmarks/sparse_ift.py" + (" --large" if args.large else "") + \
            (" --smoke" if args.smoke else "")
        text_out = "\n".join([
            "# Sparse Iso-FLOP Transformations: LM, dense vs each at equal FLOPs", "",
            f"Command: `{command}`", "",
            f"Device: {device.device_kind} ({platform.machine()}, {os.cpu_count()} cores visible), "
            f"JAX {jax.__version__}, Python {platform.python_version()}.", "",
            setup, "", *lines, "", "Claims:", *claims, "",
            f"Wall time: {wall:.0f} s." + ("" if final else " (partial: rows still running)"), ""])
        out = args.out or (None if (args.large or args.smoke) else "benchmarks/results/sparse_ift.md")
        for path in [out, os.path.join(os.environ["OUT"], "sparse_ift.md") if os.environ.get("OUT") else None]:
            if path:
                with open(path, "w") as f:
                    f.write(text_out)
        return text_out

    for name, rule_type, s in rows(args.sparsities):
        rule = None if rule_type is None else rule_type(FFN, s)
        results[name] = [train_one(cfg, rule, seed, text, size) for seed in seeds]
        r = results[name]
        print(f"{name}: eval loss {[round(x['eval_loss'], 4) for x in r]}, FFN FLOPs ratio "
              f"{r[0]['flops_ratio']:.4f}, {sum(x['seconds'] for x in r):.0f} s", flush=True)
        write(final=False)   # a run cut short still leaves every finished row
    print(write(final=True))


if __name__ == "__main__":
    main(sys.argv[1:])
