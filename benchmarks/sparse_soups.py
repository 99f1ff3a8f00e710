"""Sparse Model Soups vs the best single model vs plain IMP, on digits, one command.

    python benchmarks/sparse_soups.py                 # the recorded CPU run (8 seeds, ~10 min on 2 cores)
    python benchmarks/sparse_soups.py --smoke         # a one-minute check that it runs
    python benchmarks/sparse_soups.py --model lm --d_model 256 --n_layers 4 --d_ff 768 \
        --batch_size 64 --seq_len 256 --pretrain_steps 2000 --steps 500 --eval_batches 64 \
        --seeds 0 1 2                                 # train.py's LM, for a GPU session

train.py's MLP-Mixer (its model, its loss, its optimizer: AdamW behind a clip, warm-up then
cosine decay, restarted every cycle) on scikit-learn's digits. Per seed:

1. dense pre-training (``--pretrain_steps``);
2. three prune-retrain cycles to 50 / 75 / 90% (global magnitude ranking over the
   mixer-block kernels, ``presets.SPARSE_WEIGHTS``; masks nested), ``--steps`` steps per
   copy per cycle, run three ways from the same dense model:
   * SMS (uniform): m = ``--copies`` copies per cycle, each with its own batch order,
     trained together (``jax.vmap``), averaged (uniform soup); the next cycle starts from it;
   * SMS (greedy): the same, merged by the greedy soup (picked on the validation half);
   * plain IMP: one model per cycle, the same steps as one copy (its batch order is copy 0's).

The held-out images are split in two: a validation half picks the best single copy and
the greedy soup's ingredients, the test half (reported) is used for nothing else.
"best single" is the copy of the SMS (uniform) cycle with the lowest validation loss,
i.e. the model a one-model-per-run search would have kept. Goal (the paper's claim):
the uniform soup's test loss below the best single model's at every sparsity.

With ``--model lm`` the same three runs use train.py's LM on its offline corpus (Python's
own source, bytes); the held-out split is halved into validation and test windows, and
the result goes to sparse_soups_lm.md.

Writes benchmarks/results/sparse_soups.md (or $OUT/sparse_soups.md) and prints the table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # train.py; the package comes from the install (or device_env.sh)
    sys.path.append(ROOT)

import train  # noqa: E402
import sparsejax as sj  # noqa: E402
from sparsejax.training import data, imp_soups, presets  # noqa: E402

SPARSITIES = (0.5, 0.75, 0.9)


def build(args):
    """train.py's pieces for ``--model``: model, loss, optimizer, batches, evaluation.

    Built once for every seed, so the compiled steps are shared (the seed enters through
    ``init(seed)`` and ``batches_for(seed)``)."""
    lm = args.model == "lm"
    cfg = train.Config(model=args.model, data="stdlib" if lm else "digits", recipe="dense",
                       steps=args.steps, batch_size=args.batch_size,
                       learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
                       weight_decay=args.weight_decay, d_model=args.d_model,
                       n_layers=args.n_layers, n_heads=args.n_heads, d_ff=args.d_ff,
                       seq_len=args.seq_len, dtype=args.dtype)
    if lm:
        corpus = data.load_text_data("stdlib")
        half = corpus.valid.size // 2
        val_tokens, test_tokens = corpus.valid[:half], corpus.valid[half:]
        splits = {
            "val": lambda: data.lm_eval_batches(val_tokens, cfg.batch_size, cfg.seq_len,
                                                args.eval_batches),
            "test": lambda: data.lm_eval_batches(test_tokens, cfg.batch_size, cfg.seq_len,
                                                 args.eval_batches)}
        order_for = lambda seed: data.LMBatches(corpus.train, cfg.batch_size, cfg.seq_len, seed=seed)
        n_out = corpus.vocab_size
        sizes = (f"{corpus.train.size} train tokens", f"{min(half, args.eval_batches * cfg.batch_size * cfg.seq_len)} validation tokens",
                 f"{min(test_tokens.size, args.eval_batches * cfg.batch_size * cfg.seq_len)} test tokens")
    else:
        digits = data.load_digits(valid_fraction=0.4, seed=0)
        half = len(digits.valid_labels) // 2
        val = (digits.valid_images[:half], digits.valid_labels[:half])
        test = (digits.valid_images[half:], digits.valid_labels[half:])
        splits = {"val": lambda: data.image_eval_batches(*val, 128),
                  "test": lambda: data.image_eval_batches(*test, 128)}
        order_for = lambda seed: data.ImageBatches(digits.train_images, digits.train_labels,
                                                   cfg.batch_size, seed=seed)
        n_out = digits.num_classes
        sizes = (f"{len(digits.train_labels)} train", f"{half} validation",
                 f"{len(test[1])} test images")
    model, _ = train.build_model(cfg, n_out)
    inputs = jnp.asarray(train.model_inputs(order_for(0).batch(0)))
    params = jax.jit(model.init)(jax.random.key(0), inputs)
    sfn = sj.sparsify(model.apply, sj.Recipe([sj.Prune(presets.SPARSE_WEIGHTS[args.model], 0.0)]))
    sparams, sstate = sfn.init(params, inputs)
    init = lambda seed: sfn.init(jax.jit(model.init)(jax.random.key(seed), inputs), inputs)[0]
    dense = presets.get("dense")

    def loss_fn(p, masks, batch):
        return train.loss_and_metrics(sfn(p, {"masks": masks}, train.model_inputs(batch)), batch)

    def optimizer_for(steps):
        def make(hparams):
            c = dataclasses.replace(cfg, steps=steps, **hparams)
            return train.make_optimizer(c, dense, sfn, sparams, sstate)
        return make

    def batches_for(seed):
        orders = {}

        def batches(copy, cycle, position):
            key = 10_000 * seed + 100 * cycle + copy
            if key not in orders:
                orders[key] = order_for(key)
            return orders[key].batch(position)
        return batches

    metrics = jax.jit(lambda p, m, b: loss_fn(p, m, b)[1])

    def on(split, p, m):
        total, weight = {}, 0.0
        for b in splits[split]():
            r = jax.device_get(metrics(p, m, b))
            weight += float(r["weight"])
            for k, v in r.items():
                if k != "weight":
                    total[k] = total.get(k, 0.0) + float(v) * float(r["weight"])
        return {k: v / weight for k, v in total.items()}

    def evaluate(p, m):
        v, t = on("val", p, m), on("test", p, m)
        return {**v, **{f"test_{k}": x for k, x in t.items()}}

    return dict(init=init, loss_fn=loss_fn, pretrain_optimizer=optimizer_for(args.pretrain_steps),
                cycle_optimizer=optimizer_for(args.steps), batches_for=batches_for,
                evaluate=evaluate, layouts=sfn.layouts, where=presets.masked_where(sfn),
                sizes=sizes, model_config=model.config.to_dict() if lm else "MLP-Mixer (train.py's)")


def run_seed(args, b: dict, seed: int) -> dict:
    params = b["init"](seed)
    batches = b["batches_for"](seed)
    masks = sj.optim.magnitude_masks(params, 0.0, layouts=b["layouts"], where=b["where"])
    stacked, _ = imp_soups.retrain_copies(
        params, masks, loss_fn=b["loss_fn"], make_optimizer=b["pretrain_optimizer"],
        batches=batches, steps=args.pretrain_steps, copies=1, cycle=0)
    dense = imp_soups.unstack(stacked, 1)[0]
    dense_metrics = b["evaluate"](dense, masks)
    out = {"dense": dense_metrics, "sizes": b["sizes"]}
    runs = {"SMS (uniform)": (args.copies, "uniform"), "SMS (greedy)": (args.copies, "greedy"),
            "IMP": (1, "uniform")}
    for name, (copies, merge) in runs.items():
        config = imp_soups.SoupConfig(sparsities=SPARSITIES, steps=args.steps, copies=copies,
                                      merge=merge, distribution="global")
        t0 = time.time()
        result = imp_soups.run_imp_soups(
            dense, config, loss_fn=b["loss_fn"], make_optimizer=b["cycle_optimizer"],
            batches=batches, evaluate=b["evaluate"], masks=masks, layouts=b["layouts"],
            where=b["where"], log=lambda line: print(f"  seed {seed} {name}: {line}", file=sys.stderr))
        out[name] = result.cycles
        out[name + " time"] = time.time() - t0
        # the soup stays exactly as sparse as its mask: every pruned entry is exactly zero
        pruned_zero = jax.tree.map(
            lambda p, m: None if m is None else bool(jnp.all(jnp.where(m, 0.0, p) == 0)),
            result.params, result.masks, is_leaf=lambda x: x is None)
        out[name + " exact"] = all(jax.tree.leaves(pruned_zero))
        out[name + " sparsity"] = result.cycles[-1].sparsity
    return out


def fmt(values, digits=4):
    values = np.asarray(values, np.float64)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--pretrain_steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=200, help="retraining steps per copy per cycle")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--learning_rate", type=float, default=3e-3)
    ap.add_argument("--warmup_steps", type=int, default=20)
    ap.add_argument("--weight_decay", type=float, default=0.0)
    ap.add_argument("--model", choices=("mixer", "lm"), default="mixer",
                    help="mixer: digits (the recorded CPU run); lm: train.py's LM on its stdlib "
                         "corpus (for a GPU session; results go to sparse_soups_lm.md)")
    ap.add_argument("--d_model", type=int, default=128, help="LM size (--model lm)")
    ap.add_argument("--n_layers", type=int, default=2)
    ap.add_argument("--n_heads", type=int, default=4)
    ap.add_argument("--d_ff", type=int, default=384)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--dtype", default="float32", help="LM computation dtype")
    ap.add_argument("--eval_batches", type=int, default=32,
                    help="LM: batches in each of the validation and test halves")
    ap.add_argument("--smoke", action="store_true", help="tiny steps, one seed: checks it runs")
    args = ap.parse_args()
    if args.smoke:
        args.seeds, args.pretrain_steps, args.steps, args.warmup_steps = [0], 30, 20, 5
        if args.model == "lm":
            args.d_model, args.n_layers, args.d_ff, args.seq_len, args.eval_batches = 32, 1, 64, 32, 2
    logging.set_verbosity(logging.ERROR)
    t_start = time.time()
    per_seed = []
    pieces = build(args)
    for seed in args.seeds:
        per_seed.append(run_seed(args, pieces, seed))
        print(f"seed {seed} done ({time.time() - t_start:.0f} s)", file=sys.stderr)
    wall = time.time() - t_start
    n = len(args.seeds)

    def col(name, pick):
        return [[pick(r[name][c]) for r in per_seed] for c in range(len(SPARSITIES))]

    test = lambda m: m["test_loss"]
    has_acc = "test_accuracy" in per_seed[0]["dense"]
    acc = lambda m: m["test_accuracy"]
    uniform = col("SMS (uniform)", lambda c: c.uniform)
    best = col("SMS (uniform)", lambda c: c.ingredients[c.best_single])
    oracle = col("SMS (uniform)", lambda c: min(c.ingredients, key=lambda m: m["test_loss"]))
    mean_ing = col("SMS (uniform)", lambda c: {k: float(np.mean([i[k] for i in c.ingredients]))
                                               for k in c.ingredients[0]})
    greedy = col("SMS (greedy)", lambda c: c.merged)
    imp = col("IMP", lambda c: c.merged)
    dense_loss = [r["dense"]["test_loss"] for r in per_seed]
    dense_acc = [r["dense"]["test_accuracy"] for r in per_seed] if has_acc else None

    table = ["| sparsity | plain IMP | best single (SMS cycle) | best single by test (oracle) | "
             "mean ingredient | uniform soup (SMS) | greedy soup (SMS) |",
             "|---|---|---|---|---|---|---|"]
    for c, s in enumerate(SPARSITIES):
        cells = [fmt([test(m) for m in rows[c]]) +
                 (f" / {100 * np.mean([acc(m) for m in rows[c]]):.1f}%" if has_acc else "")
                 for rows in (imp, best, oracle, mean_ing, uniform, greedy)]
        table.append(f"| {s:.0%} | " + " | ".join(cells) + " |")
    chosen = [[list(r["SMS (greedy)"][c].greedy_chosen) for r in per_seed] for c in range(len(SPARSITIES))]

    goals, paired = [], []
    for c, s in enumerate(SPARSITIES):
        soup = float(np.mean([test(m) for m in uniform[c]]))
        single = float(np.mean([test(m) for m in best[c]]))
        diff = np.asarray([test(a) - test(b) for a, b in zip(uniform[c], best[c])])
        sem = float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
        wins = int(np.sum(diff < 0))
        met = "met" if soup < single else "not met"
        goals.append(f"- {s:.0%}: uniform soup {soup:.4f} vs best single {single:.4f} "
                     f"(test loss, mean of {n} seeds; soup lower in {wins}/{n}; paired difference "
                     f"{diff.mean():+.4f} ± {sem:.4f} s.e.): {met}")
        paired.append(f"| {s:.0%} | " + " | ".join(f"{d:+.4f}" for d in diff) + " |")
    extra = []
    for c, s in enumerate(SPARSITIES):
        g = float(np.mean([test(m) for m in greedy[c]]))
        i = float(np.mean([test(m) for m in imp[c]]))
        u = float(np.mean([test(m) for m in uniform[c]]))
        extra.append(f"- {s:.0%}: plain IMP {i:.4f}, SMS uniform {u:.4f}, SMS greedy {g:.4f} "
                     f"(greedy soups' copies per seed: {chosen[c]})")
    exact = all(r[k + " exact"] for r in per_seed for k in ("SMS (uniform)", "SMS (greedy)", "IMP"))
    reached = sorted({round(r[k + " sparsity"], 4) for r in per_seed
                      for k in ("SMS (uniform)", "SMS (greedy)", "IMP")})

    lm = args.model == "lm"
    kind = jax.devices()[0].device_kind
    device = "CPU" if jax.devices()[0].platform == "cpu" else kind
    device_long = (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores "
                   "visible, shared)" if device == "CPU" else f"{len(jax.devices())}× {kind}")
    cmd = "python benchmarks/sparse_soups.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    sizes = per_seed[0]["sizes"]
    md = [
        "# Sparse Model Soups: IMP with soups vs the best single model vs plain IMP "
        f"({'LM' if lm else 'digits'}, {device})",
        "",
        f"Command: `{cmd}` (from the repository root)",
        "",
        f"Device: {device_long}, JAX {jax.__version__}, Python {platform.python_version()}. "
        f"Wall time {wall:.0f} s.",
        "",
        (f"train.py's LM ({pieces['model_config']}) on its stdlib corpus (" if lm else
         "train.py's MLP-Mixer on scikit-learn's digits (") +
        f"{sizes[0]} / {sizes[1]} / {sizes[2]}), AdamW lr {args.learning_rate} (warm-up {args.warmup_steps}, cosine "
        f"to 10%, restarted each cycle), weight decay {args.weight_decay}, batch {args.batch_size}. "
        f"Dense pre-training {args.pretrain_steps} steps, then 3 cycles to "
        f"{'/'.join(f'{s:.0%}' for s in SPARSITIES)} (global magnitude, nested masks on the "
        f"{'block' if lm else 'mixer-block'} kernels), {args.steps} steps per copy per cycle; SMS retrains m = {args.copies} "
        "copies per cycle (different batch orders, trained together under jax.vmap); plain IMP "
        "retrains one (copy 0's batch order, the same steps as one copy). Seeds "
        f"{args.seeds} (init and batch orders; the split is fixed). Validation picks the best "
        "single copy and the greedy soup; the table is the test split. The oracle column picks "
        "each cycle's copy by its test loss (no model selection can do better with one model).",
        "",
        f"Dense model after pre-training: test loss {fmt(dense_loss)}" +
        (f", accuracy {100 * np.mean(dense_acc):.1f}%." if has_acc else "."),
        "",
        "Test loss (mean ± std over seeds)" + (" / test accuracy (mean):" if has_acc else ":"),
        "",
        *table,
        "",
        "Goal (the paper's claim): the uniform soup beats the best single model of the same cycle "
        "at every sparsity:",
        "",
        *goals,
        "",
        "Per seed, uniform soup minus best single (test loss; negative: the soup is better):",
        "",
        "| sparsity | " + " | ".join(f"seed {x}" for x in args.seeds) + " |",
        "|---|" + "---|" * n,
        *paired,
        "",
        "Every method, test loss at the end of each cycle (each SMS run continues from its own soup):",
        "",
        *extra,
        "",
        f"Every final model (soups included) has each pruned weight exactly zero: {exact}; "
        f"sparsity of the masked weights at the end: {reached}.",
        "",
        "Time per run (s, last seed): " + ", ".join(
            f"{k} {per_seed[-1][k + ' time']:.0f}" for k in ("SMS (uniform)", "SMS (greedy)", "IMP")),
        "",
    ]
    out_dir = os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results")
    name = ("sparse_soups_lm" if lm else "sparse_soups") + ("_smoke.md" if args.smoke else ".md")
    if args.smoke and not os.environ.get("OUT"):
        out_dir = os.path.join("/tmp")
    with open(os.path.join(out_dir, name), "w") as f:
        f.write("\n".join(md))
    print("\n".join(table + [""] + goals + [""] + extra))


if __name__ == "__main__":
    main()
