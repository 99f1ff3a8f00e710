"""Named sparsity presets: a recipe plus the optimizer wrapper that goes with it.

A preset turns "train this model 90% sparse with RigL" into the two pieces the
library is made of: the :class:`~sparsejax.Recipe` that ``sparsify`` rewrites the
model with, and a function wrapping any optax optimizer in the sparsity
transform that updates the masks (``sparsejax.optim``). train.py, the
notebooks and the results tables all use these.

Masks have one owner per preset (:attr:`Preset.masks_from`): ``"recipe"`` (fixed by
``sparsify``, in ``sstate``) or ``"optimizer"`` (moved by the wrapper's transform). The
forward pass reads them through :func:`sparsejax.optim.forward_masks`, whichever the owner.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from typing import Any, Callable

import jax.numpy as jnp
import optax

from sparsejax import optim, rules
from sparsejax.rules import Recipe

# The weights each model family sparsifies: hidden layers, not embeddings or heads.
SPARSE_WEIGHTS = {
    "lm": "re:.*layers.*/kernel",
    "mixer": "re:.*mixer_.*/kernel",
    "convnet": "re:.*conv_[1-9].*/kernel",
}
FFN_WEIGHTS = {
    "lm": "re:.*mlp/.*/kernel",
    "mixer": "re:.*channel_mixing/.*/kernel",
    "convnet": "re:.*conv_[1-9].*/kernel",
}

WrapFn = Callable[[optax.GradientTransformation, Any, Any, dict, int], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named recipe and its optimizer wrapper.

    Attributes:
      name: the preset's name.
      description: one line for --help and summaries.
      recipe: model family -> Recipe.
      wrap: (inner optimizer, sfn, sparams, sstate, total steps) -> optimizer; None keeps
        the inner one.
      masks_from: who owns the masks: "recipe" (fixed by sparsify, in sstate) or "optimizer"
        (moved by the transform ``wrap`` adds: GMP, SET, RigL, Progressive Gradient Flow's
        decaying masks). train.py checks the optimizer agrees.
      activation_l1: total steps -> schedule of the factor on the FFN activations' L1
        (``sfn.with_aux``) added to the training loss; None adds nothing.
    """

    name: str
    description: str
    recipe: Callable[[str], Recipe]
    wrap: WrapFn | None = None
    masks_from: str = "recipe"
    activation_l1: Callable[[int], Callable] | None = None


def masked_where(sfn) -> Callable[[str, Any], bool]:
    """The optimizer-side twin of a recipe's mask rules: mask exactly what sfn masks."""
    masked = {path for path in sfn.masked_paths}
    return lambda path, leaf: path in masked


def _gmp(sparsity: float) -> Preset:
    def wrap(inner, sfn, sparams, sstate, steps):
        schedule = optim.gradual(sparsity, begin_step=steps // 10, end_step=(3 * steps) // 4,
                                 frequency=max(steps // 40, 1))
        return optim.prune(inner, schedule, layouts=sfn.layouts, where=masked_where(sfn),
                           initial_masks=sstate["masks"])
    return Preset(f"gmp{round(sparsity * 100)}",
                  f"gradual magnitude pruning to {sparsity:.0%} (cubic schedule, 10%-75% of steps)",
                  lambda model: Recipe([rules.Prune(SPARSE_WEIGHTS[model], 0.0)]), wrap, "optimizer")


def _dst(name: str, grow: str, sparsity: float) -> Preset:
    def wrap(inner, sfn, sparams, sstate, steps):
        return optim.dynamic_sparse(inner, sparsity, grow=grow, end_step=(3 * steps) // 4,
                                    update_every=max(steps // 20, 1), distribution="erk",
                                    layouts=sfn.layouts, where=masked_where(sfn))
    label = "RigL (grow by gradient)" if grow == "gradient" else "SET (grow at random)"
    # Straight-through gradients: growth needs the gradient at weights that are pruned now.
    return Preset(name, f"{label} at {sparsity:.0%}, ERK layer sparsities",
                  lambda model: Recipe([rules.Prune(SPARSE_WEIGHTS[model], 0.0, gradient="ste")]),
                  wrap, "optimizer")


def _static(sparsity: float) -> Preset:
    def wrap(inner, sfn, sparams, sstate, steps):
        masks = optim.random_masks(sparams, sparsity, distribution="erk", layouts=sfn.layouts,
                                   where=masked_where(sfn))
        fixed = optim.SparsitySchedule(lambda t: jnp.asarray(sparsity), lambda t: t < 0, sparsity,
                                       0, f"fixed random masks at {sparsity}")
        return optim.prune(inner, fixed, layouts=sfn.layouts, where=masked_where(sfn),
                           initial_masks=masks)
    return Preset(f"static{round(sparsity * 100)}", f"static random masks at {sparsity:.0%} (ERK)",
                  lambda model: Recipe([rules.Prune(SPARSE_WEIGHTS[model], 0.0)]), wrap, "optimizer")


def _pgf(n: int, m: int) -> Preset:
    def wrap(inner, sfn, sparams, sstate, steps):
        return optim.progressive_nm(inner, n, m, decay="exponential", begin_step=0,
                                    end_step=(3 * steps) // 4, layouts=sfn.layouts,
                                    where=masked_where(sfn))
    return Preset(f"nm{n}{m}_pgf", f"{n}:{m} with Progressive Gradient Flow (decaying mask strength)",
                  lambda model: Recipe([rules.NM(SPARSE_WEIGHTS[model], n, m, gradient="ste")]),
                  wrap, "optimizer")


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("dense", "no sparsity", lambda model: Recipe([])),
    _gmp(0.5), _gmp(0.8), _gmp(0.9),
    _static(0.9),
    _dst("set90", "random", 0.9),
    _dst("rigl90", "gradient", 0.9),
    Preset("nm24", "2:4 along the reduction axis, trained with SR-STE",
           lambda model: Recipe([rules.NM(SPARSE_WEIGHTS[model], 2, 4, gradient="srste")])),
    _pgf(2, 4),
    Preset("monarch4", "Monarch factors (nblocks 4) on the FFN weights, from scratch",
           lambda model: Recipe([rules.Monarch(FFN_WEIGHTS[model], 4, init="random")])),
    Preset("monarch4_proj", "Monarch (nblocks 4) on the FFN weights, projected from the given weights",
           lambda model: Recipe([rules.Monarch(FFN_WEIGHTS[model], 4, init="project")])),
    Preset("spark8", "Spark statistical top-k: 8% of FFN neurons active per token",
           lambda model: Recipe([rules.SparkTopK(site="ffn", k_frac=0.08)])),
    Preset("block90", "90% sparse 32×32 blocks by magnitude, masks fixed at init",
           lambda model: Recipe([rules.Block(SPARSE_WEIGHTS[model], 0.9, block=(32, 32))])),
    Preset("sparse_wide50", "Sparse Wide (Sparse-IFT): FFN 2x wider at 50% sparsity, same FLOPs",
           lambda model: Recipe([rules.SparseWide(FFN_WEIGHTS[model], 0.5)])),
]}


def _prosparse_l1(total_steps: int):
    """ProSparse's three sine-shaped stages of the L1 factor, over the run's first 90%."""
    from sparsejax.optim import prosparse_l1_schedule
    stage = max(int(total_steps * 0.3), 1)
    return prosparse_l1_schedule([(stage, 0.5), (stage, 1.0), (stage, 2.0)])


PRESETS["prosparse"] = Preset(
    "prosparse", "ProSparse: ReLU in every FFN, L1 on its activations rising in sine-shaped stages",
    lambda model: Recipe([rules.ReLUActivation()]), activation_l1=_prosparse_l1)


_RULES = {name: getattr(rules, name) for name in
          ("Prune", "NM", "Block", "Channels", "Monarch", "BlockDiagonal", "SparkTopK",
           "SparseWide", "SparseParallel", "SparseFactorized", "SparseDoped")}


def recipe_from_json(path: str) -> Preset:
    """A preset from a JSON file: ``{"rules": [{"rule": "Prune", "pattern": "*", ...}, ...]}``.

    Masks from such a recipe are fixed at init (use a named preset for schedules).
    """
    try:
        with open(path) as f:
            spec = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"recipe file {path}: cannot read it as JSON ({e})") from None
    where = f"recipe file {path}"
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: the top level must be an object "
                         f"{{\"rules\": [...]}}, got a JSON {type(spec).__name__}")
    unknown = sorted(set(spec) - {"rules"})
    if unknown:
        near = difflib.get_close_matches(unknown[0], ["rules"], n=1)
        hint = " (did you mean 'rules'?)" if near else ""
        raise ValueError(f"{where}: unknown top-level key(s) {unknown}{hint}; the file holds "
                         "{\"rules\": [...]}")
    if "rules" not in spec:
        raise ValueError(f"{where}: no \"rules\" list; write {{\"rules\": [{{\"rule\": \"Prune\", "
                         "\"pattern\": \"*kernel\", \"sparsity\": 0.9}}]}} (use --recipe=dense "
                         "for a dense run)")
    if not isinstance(spec["rules"], list) or not spec["rules"]:
        raise ValueError(f"{where}: \"rules\" must be a non-empty list of rule objects "
                         "(use --recipe=dense for a dense run)")
    built = []
    for i, entry in enumerate(spec["rules"]):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: rules[{i}] must be an object such as "
                             f"{{\"rule\": \"Prune\", \"pattern\": \"*kernel\"}}, got {entry!r}")
        entry = dict(entry)
        name = entry.pop("rule", None)
        if name not in _RULES:
            raise ValueError(f"{where}: rules[{i}]: 'rule' must be one of {sorted(_RULES)}")
        fields = {f.name for f in dataclasses.fields(_RULES[name])}
        for key in sorted(set(entry) - fields):
            near = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"{where}: rules[{i}] ({name}): unknown field {key!r}{hint}; "
                             f"{name} takes {sorted(fields)}")
        if "block" in entry and isinstance(entry["block"], list):
            entry["block"] = tuple(entry["block"])
        try:
            built.append(_RULES[name](**entry))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: rules[{i}]: {e}") from None
    recipe = Recipe(built)
    return Preset(path, f"recipe file {path}", lambda model: recipe)


def get(name: str) -> Preset:
    """A named preset, or a recipe file ending in .json."""
    if name.endswith(".json"):
        return recipe_from_json(name)
    if name not in PRESETS:
        raise ValueError(f"unknown recipe {name!r}: use one of {sorted(PRESETS)} or a .json file")
    return PRESETS[name]
