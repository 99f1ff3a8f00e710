"""sparsejax: sparsity for any JAX function through one jaxpr-rewriting transform."""

from sparsejax import layout, masks, monarch, optim, paths, presets, rules, topk
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
