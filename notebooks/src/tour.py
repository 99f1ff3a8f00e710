# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown] slot="title"
# # A tour of sparsejax
#
# One transform, `sparsejax.sparsify(fn, recipe)`, rewrites any JAX function's program:
# weight masks (unstructured, N:M, blocks, channels), Monarch factorizations and Spark's
# statistical top-k on activations, without touching the model's code. This notebook takes
# small Flax models through it:
#
# 1. sparsify a Transformer LM with masks, N:M, Monarch and Spark top-k, and read `report()`;
# 2. look at the mask patterns each rule makes;
# 3. train a few hundred steps with a sparsity schedule and compare recipes;
# 4. lower block masks to the block-sparse kernel;
# 5. read the recorded benchmark results.
#
# It runs top to bottom on a CPU in a minute or two (small sizes, the kernels fall back to
# their plain-JAX twins) and picks bigger sizes on a GPU or TPU. Set the environment variable
# `SPARSEJAX_NOTEBOOK_SIZE=small` or `large` to choose yourself.


# %% [markdown] slot="notes"
# **Set-up.** From a clone of the repository: `pip install -e ".[dev]"` (CPU), or
# `pip install -e ".[gpu]"` on a CUDA machine, then open this notebook from `notebooks/`.
# `gpu.ipynb` and `tpu.ipynb` are this tour with each backend's notes.


# %% slot="device"
import jax
print("JAX", jax.__version__, "| backend:", jax.default_backend())
for d in jax.devices():
    print(" ", d.platform, d.device_kind)


# %% slot="setup"
import json
import os
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import sparsejax as sj
from sparsejax import optim
from sparsejax.training import data
from sparsejax.layout import WeightLayout
from sparsejax.models.transformer import TransformerConfig, TransformerLM, lm_loss

BACKEND = jax.default_backend()
SIZE = os.environ.get("SPARSEJAX_NOTEBOOK_SIZE") or ("small" if BACKEND == "cpu" else "large")
assert SIZE in ("small", "large"), SIZE
if SIZE == "small":      # a minute or two on two CPU cores
    LM = TransformerConfig(d_model=64, n_layers=2, n_heads=4, d_ff=192)
    LM_BATCH, LM_SEQ = 8, 64
    MLP_WIDTH, STEPS, BATCH = 256, 300, 64
    KERNEL_WIDTH, KERNEL_TOKENS, KERNEL_BLOCK = 256, 64, (64, 64)
else:                    # an accelerator
    LM = TransformerConfig(d_model=256, n_layers=4, n_heads=4, d_ff=768)
    LM_BATCH, LM_SEQ = 16, 256
    MLP_WIDTH, STEPS, BATCH = 1024, 1500, 128
    KERNEL_WIDTH, KERNEL_TOKENS, KERNEL_BLOCK = 8192, 8192, (128, 128)
print(f"sizes: {SIZE} (backend {BACKEND})")


def find_repo_root(start=pathlib.Path.cwd()):
    for folder in (start, *start.parents):
        if (folder / "benchmarks" / "results").is_dir():
            return folder
    return None


# %% [markdown]
# ## 1. Sparsify a Transformer LM
#
# `TransformerLM` (from `sparsejax.models`) is an ordinary Linen model: a decoder with
# RMSNorm, RoPE, causal attention and a gated (SwiGLU) FFN. Its weights are named by path,
# `params/layers_0/attn/q/kernel`, `params/layers_0/mlp/up/kernel`, ... A recipe is an
# ordered list of rules; for each weight the first rule whose glob matches wins:
#
# - `Monarch`: the FFN's `up` projection becomes two block-diagonal factors (projected from
#   the dense weight: the Frobenius-closest Monarch matrix);
# - `NM`: every attention projection keeps 2 of each 4 consecutive weights along the input axis;
# - `Prune`: every other matmul weight keeps its 20% largest-magnitude entries;
# - `SparkTopK`: activation rules select sites by program structure instead of weights:
#   here the FFN's gate pre-activation keeps its statistical top 25% per token.


# %%
corpus = data.load_stdlib_corpus(max_bytes=100_000)     # Python's own source, byte-level
lm_batches = data.LMBatches(corpus.train, batch_size=LM_BATCH, seq_len=LM_SEQ, seed=0)
tokens = jnp.asarray(lm_batches.batch(0)["inputs"])

lm = TransformerLM(LM)
lm_params = lm.init(jax.random.key(0), tokens)

recipe = sj.Recipe([
    sj.Monarch("*/mlp/up/kernel", nblocks=4),
    sj.NM("*/attn/*/kernel", n=2, m=4),
    sj.Prune("*kernel", sparsity=0.8),
    sj.SparkTopK(site="ffn", k_frac=0.25),
])
sparse_lm = sj.sparsify(lm.apply, recipe)
lm_sparams, lm_sstate = sparse_lm.init(lm_params, tokens)   # trace once, find sites, build state
logits = jax.jit(sparse_lm)(lm_sparams, lm_sstate, tokens)
print("logits", logits.shape, "| loss of the untrained model:",
      float(lm_loss(logits, jnp.asarray(lm_batches.batch(0)["targets"]))))


# %% [markdown]
# `report()` lists every rewritten weight (rule, layout, density, parameters and FLOPs
# before → after, and how the site is computed), the parameters no rule touched, and the
# activation sites. `measure_activations` runs one batch and records, per site and layer,
# how many activations fire without the rule (`before`: pre-activations above zero) and
# with it (`after`); the report then shows them too.


# %%
measured = sparse_lm.measure_activations(lm_sparams, lm_sstate, tokens)
print(sparse_lm.report())


# %%
ffn = [m for m in measured if m["kind"] == "ffn"]
layers = np.arange(len(ffn))
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar(layers - 0.2, [m["before"] for m in ffn], 0.4, label="before (> 0)")
ax.bar(layers + 0.2, [m["after"] for m in ffn], 0.4, label="after SparkTopK")
ax.axhline(0.25, color="k", ls="--", lw=1, label="target k_frac")
ax.set_xticks(layers, [f"layer {i}" for i in layers])
ax.set_ylabel("FFN activation density")
ax.set_title("Spark statistical top-k on the gate pre-activation")
ax.legend(fontsize=8)
fig.tight_layout()


# %% [markdown]
# ## 2. Mask patterns
#
# Every mask rule computes its mask on the weight's matrix view `(K, N)` (inputs × outputs,
# `y = x @ W`). Here the four mask rules and a Monarch projection act on the same weight, the
# first layer's FFN `gate` kernel. Black is kept. `NM(2, 4)` keeps 2 of every 4 consecutive
# entries down each column; `Block` keeps whole tiles (what the block-sparse kernel needs);
# `Channels` keeps whole output columns. `Monarch` replaces the weight by two block-diagonal
# factors with a permutation between them (their product is dense; its parameters and FLOPs are
# about 2/nblocks of the dense weight's): the last two panels show the factors' blocks.


# %%
path = "params/layers_0/mlp/gate/kernel"
w = lm_params["params"]["layers_0"]["mlp"]["gate"]["kernel"]
layout = WeightLayout.default(w.shape)       # Flax: the last axis is the output
rules = [sj.Prune("*", sparsity=0.75), sj.NM("*", n=2, m=4),
         sj.Block("*", sparsity=0.75, block=(16, 16)), sj.Channels("*", sparsity=0.75, axis="out")]
panels = {r.describe(): np.asarray(r.mask_for(path, w, layout)) for r in rules}

# Monarch: W ≈ P2ᵀ · blockdiag(w2) · P · blockdiag(w1); show the two block-diagonal factors.
factors = sj.monarch.project(w, 4)
w1, w2 = np.asarray(factors["w1"]), np.asarray(factors["w2"])
block_diag = lambda blocks: jax.scipy.linalg.block_diag(*[b.T for b in blocks])
panels[f"Monarch factor 1, w1 {w1.shape}"] = np.asarray(block_diag(w1)) != 0
panels[f"Monarch factor 2, w2 {w2.shape}"] = np.asarray(block_diag(w2)) != 0

fig, axes = plt.subplots(3, 2, figsize=(11, 7))
for ax, (name, m) in zip(axes.flat, panels.items()):
    ax.imshow(~m, cmap="gray", aspect="auto", interpolation="nearest")
    ax.set_title(f"{name}: kept {m.mean():.2f}", fontsize=8)
    ax.set_xticks([]); ax.set_yticks([])
fig.suptitle(f"{path} {tuple(w.shape)}: rows = inputs (K), columns = outputs (N); black = kept",
             fontsize=9)
fig.tight_layout()


# %% [markdown]
# ## 3. Training with a sparsity schedule
#
# An MLP on scikit-learn's 8×8 digits trains in seconds, so we can compare recipes. Each run
# uses the same data, steps and Adam; the sparsified function takes masks from its state
# argument, so the training step is written once:
#
# - **dense**: an empty recipe;
# - **GMP 80%**: `sj.optim.prune` with the cubic `gradual` schedule (Zhu & Gupta, 2017),
#   $s_t = s_f + (s_i - s_f)(1 - (t - t_0)/(t_1 - t_0))^3$, recomputes magnitude masks every
#   10 steps; the optimizer owns these masks, and `optim.forward_masks(sstate, opt_state)`
#   hands the sparsified function the masks of whichever owner holds them;
# - **N:M 2:4**: masks fixed at init from the random weights;
# - **Monarch**: the hidden layer as Monarch factors with 4 blocks, drawn at random;
# - **Spark top-k**: the hidden activations keep their statistical top 25% per example.


# %%
digits = data.load_digits()
batches = data.ImageBatches(digits.train_images, digits.train_labels, batch_size=BATCH, seed=0)
valid_x, valid_y = jnp.asarray(digits.valid_images), jnp.asarray(digits.valid_labels)


class MLP(nn.Module):
    width: int

    @nn.compact
    def __call__(self, images):
        x = images.reshape(images.shape[0], -1)
        x = nn.relu(nn.Dense(self.width, name="fc1")(x))
        x = nn.relu(nn.Dense(self.width, name="fc2")(x))
        return nn.Dense(10, name="head")(x)


mlp = MLP(MLP_WIDTH)
example = jnp.asarray(batches.batch(0)["images"])
mlp_params = mlp.init(jax.random.key(1), example)
schedule = optim.gradual(0.8, begin_step=STEPS // 10, end_step=STEPS * 2 // 3, frequency=10)


def xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train(recipe, pruning=False):
    sfn = sj.sparsify(mlp.apply, recipe)
    sparams, sstate = sfn.init(mlp_params, example)
    if pruning:   # the optimizer owns the masks and grows their sparsity on the schedule
        tx = optim.prune(optax.adam(1e-3), schedule, layouts=sfn.layouts,
                         initial_masks=sstate["masks"],
                         where=lambda path, _: sfn.rule_of(path) is not None)
    else:         # sparsify owns the recipe's fixed masks
        tx = optax.adam(1e-3)
    masks_of = lambda opt_state: optim.forward_masks(sstate, opt_state)   # from their owner
    opt_state = tx.init(sparams)

    def sparsity(masks):   # the fraction of masked-out weights (works inside jit); dense: 0
        value = optim.masked_sparsity(masks)
        return jnp.zeros([]) if value is None else value

    @jax.jit
    def step(params, opt_state, batch):
        loss_fn = lambda p: xent(sfn(p, {"masks": masks_of(opt_state)}, batch["images"]),
                                 batch["labels"])
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, (loss, sparsity(masks_of(opt_state)))

    history = []
    for t in range(STEPS):
        sparams, opt_state, metrics = step(sparams, opt_state, batches.batch(t))
        history.append(metrics)       # device arrays: no wait for the step to finish
    losses, sparsities = np.asarray(jax.device_get(history)).T
    logits = jax.jit(sfn)(sparams, {"masks": masks_of(opt_state)}, valid_x)
    return {"sfn": sfn, "params": sparams, "masks": masks_of(opt_state),
            "loss": losses, "sparsity": sparsities,
            "eval_loss": float(xent(logits, valid_y)),
            "eval_acc": float(jnp.mean(jnp.argmax(logits, -1) == valid_y))}


start = time.perf_counter()
runs = {
    "dense": train(sj.Recipe([])),
    # sparsity=0.0: every weight is kept at init; the optimizer raises the sparsity
    "GMP 80%": train(sj.Prune("*fc*/kernel", sparsity=0.0), pruning=True),
    "N:M 2:4": train(sj.NM("*fc*/kernel", n=2, m=4)),
    "Monarch": train(sj.Monarch("*fc2/kernel", nblocks=4, init="random")),
    "Spark top-k": train(sj.SparkTopK(site="ffn", k_frac=0.25)),
}
print(f"{len(runs)} runs of {STEPS} steps in {time.perf_counter() - start:.0f} s")
for name, r in runs.items():
    print(f"{name:12s} held-out loss {r['eval_loss']:.3f}  accuracy {r['eval_acc']:.3f}")


# %%
steps = np.arange(STEPS)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
ax1.plot(steps, np.asarray(schedule.sparsity(steps)), label="schedule target $s_t$")
ax1.plot(steps, runs["GMP 80%"]["sparsity"], "--", label="masks reached")
updates = steps[np.asarray(schedule.is_update(steps))]
ax1.plot(updates, np.asarray(schedule.sparsity(updates)), ".", ms=4, label="mask updates")
ax1.set(xlabel="step", ylabel="sparsity", title="gradual magnitude pruning to 80%")
ax1.legend(fontsize=8)

smooth = lambda y, n=20: np.convolve(y, np.ones(n) / n, mode="valid")
for name, r in runs.items():
    ax2.plot(smooth(r["loss"]), label=f"{name} (eval {r['eval_loss']:.2f})")
ax2.set(xlabel="step", ylabel="training loss (moving mean)", yscale="log", title="loss curves")
ax2.legend(fontsize=8)
fig.tight_layout()


# %% [markdown]
# Per-layer density at the end of training, read from each run's report (for Monarch,
# the factors' size relative to the dense weight), and the masks GMP grew:


# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5), gridspec_kw={"width_ratios": [3, 2]})
names = [n for n in runs if n != "dense" and runs[n]["sfn"].report().rows]
layer_names = ["params/fc1/kernel", "params/fc2/kernel", "params/head/kernel"]
for i, name in enumerate(names):
    r = runs[name]
    rows = {row.path: row.density for row in r["sfn"].report({"masks": r["masks"]}).rows}
    density = [rows.get(p, 1.0) for p in layer_names]
    ax1.bar(np.arange(3) + (i - 1) * 0.27, density, 0.27, label=name)
ax1.set_xticks(np.arange(3), [p.split("/")[1] for p in layer_names])
ax1.set(ylabel="kept fraction of the weight", title="per-layer density after training")
ax1.legend(fontsize=8)

gmp_mask = np.asarray(runs["GMP 80%"]["masks"]["params"]["fc1"]["kernel"])
ax2.imshow(~gmp_mask, cmap="gray", aspect="auto", interpolation="nearest")
ax2.set(title=f"GMP mask of fc1 (kept {gmp_mask.mean():.2f})", xlabel="output unit",
        ylabel="input pixel")
fig.tight_layout()
print(runs["GMP 80%"]["sfn"].report({"masks": runs["GMP 80%"]["masks"]}))


# %% [markdown] slot="lower"
# ## 4. From masks to speed: lowering
#
# Masks alone make nothing faster: XLA still multiplies the zeros. Once masks are fixed,
# `sfn.lower(sstate)` returns a copy whose `Block`-masked matmuls call the block-sparse kernel
# (Mosaic GPU on Hopper, Pallas TPU on a TPU) and whose report says, per site, which path ran
# and why. Elsewhere (here on a CPU) every site keeps the plain-JAX reference, which computes
# the same values; `interpret=True` runs the Pallas kernel in interpret mode, which is how
# the tests check it on a CPU.


# %% slot="lower_code"
class Wide(nn.Module):
    width: int
    dtype: str

    @nn.compact
    def __call__(self, x):
        dense = lambda name: nn.Dense(self.width, use_bias=False, dtype=self.dtype,
                                      param_dtype=self.dtype, name=name)
        return dense("out")(nn.relu(dense("hidden")(x)))


dtype = "float32" if BACKEND == "cpu" else "bfloat16"
wide = Wide(KERNEL_WIDTH, dtype)
x = jax.random.normal(jax.random.key(2), (KERNEL_TOKENS, KERNEL_WIDTH), dtype)
wide_params = wide.init(jax.random.key(3), x)
blocky = sj.sparsify(wide.apply, sj.Block("*kernel", sparsity=0.75, block=KERNEL_BLOCK))
b_params, b_state = blocky.init(wide_params, x)
fast = blocky.lower(b_state)
print(fast.report())

y_masked = jax.jit(blocky)(b_params, b_state, x)
y_lowered = jax.jit(fast)(b_params, b_state, x)
err = float(jnp.linalg.norm((y_lowered - y_masked).astype(jnp.float32))
            / jnp.linalg.norm(y_masked.astype(jnp.float32)))
print(f"lowered vs masked: relative error {err:.1e}")
assert err < (1e-5 if dtype == "float32" else 2e-2)


# %% [markdown]
# ## 5. Recorded speed
#
# Every benchmark in `benchmarks/` writes a Markdown result with its command, device and JAX
# version; `benchmarks/results/summary.json` gathers their numbers (each with the file and the
# line it was read from). Bars are speed-ups over the baseline measured in the same run; the
# tick marks the goal the benchmark set out to reach. `docs/benchmarks.md` has the commands
# and the reading of each.


# %%
root = find_repo_root()
summary_path = None if root is None else root / "benchmarks" / "results" / "summary.json"
if summary_path is None or not summary_path.exists():
    print("benchmarks/results/summary.json not found: open this notebook from the repository")
else:
    # Speed entries only (quality entries carry "metric"/"value" instead of "speedup").
    entries = [e for e in json.loads(summary_path.read_text())["entries"] if "speedup" in e]
    labels = [f"{e['benchmark']}: {e['case']}" for e in entries]
    speed = np.array([e["speedup"] for e in entries])
    goals = [e["goal"] for e in entries]
    colors = ["tab:gray" if g is None else ("tab:green" if s >= g else "tab:red")
              for s, g in zip(speed, goals)]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(entries) + 1.2))
    rows = np.arange(len(entries))[::-1]
    ax.barh(rows, speed, color=colors)
    for row, g in zip(rows, goals):
        if g is not None:
            ax.plot([g, g], [row - 0.4, row + 0.4], "k-", lw=1.5)
    ax.axvline(1.0, color="k", lw=0.8, ls=":")
    ax.set_yticks(rows, labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up over the baseline (log; green: goal met, red: missed, tick: goal)")
    devices = sorted({e["device"] for e in entries})
    ax.set_title("recorded results on " + ", ".join(devices), fontsize=9)
    fig.tight_layout()
    met = sum(1 for s, g in zip(speed, goals) if g is not None and s >= g)
    print(f"{met} of {sum(g is not None for g in goals)} goals met")


# %% [markdown]
# ## Where next
#
# - `docs/index.md`: every page of the documentation.
# - `docs/compiler.md`: rules, paths, sites, gradient modes, the report, lowering.
# - `docs/architecture.md`: where a new rule, pass, kernel or optimizer goes.
# - `docs/benchmarks.md`: every recorded result and the command that reproduces it.
