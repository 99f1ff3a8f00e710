"""sparsejax: sparsity for any JAX function through one jaxpr-rewriting transform.

``import sparsejax`` loads the library only (the transform, rules, math, kernels, optimizers);
what a training run needs beside it (presets, data, checkpoints, logs) is
``sparsejax.training``, imported on its own.
"""

from sparsejax import layout, masks, monarch, optim, paths, rules, topk
from sparsejax.layout import WeightLayout
from sparsejax.paths import MatmulWeights
from sparsejax.report import Report
from sparsejax.rules import (Block, BlockDiagonal, Channels, Monarch, NM, Prune, Recipe,
                             SparkTopK)
from sparsejax.rules import SparseDoped, SparseFactorized, SparseParallel, SparseWide
from sparsejax.topk import exact_topk_reference, statistical_topk
from sparsejax.sparsify import SparseFunction, sparsify
# After sparsify: the one-shot driver builds on it. ``sj.oneshot`` is the function; the
# methods stay importable as ``from sparsejax.oneshot import sparsegpt_prune, ...``.
from sparsejax.oneshot import OneshotResult, oneshot

__version__ = "0.1.0"

__all__ = [
    # the transform and what it reports
    "sparsify", "SparseFunction", "Report",
    # recipes and rules
    "Recipe", "Prune", "NM", "Block", "Channels", "Monarch", "BlockDiagonal", "SparkTopK",
    "MatmulWeights", "WeightLayout",
    # the top-k op and its sorting twin
    "statistical_topk", "exact_topk_reference",
    # one-shot pruning
    "oneshot", "OneshotResult",
    # submodules: the math (usable without the compiler) and the optimizers
    "layout", "masks", "monarch", "optim", "paths", "rules", "topk",
]
