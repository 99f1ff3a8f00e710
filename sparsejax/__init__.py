"""sparsejax: sparsity for any JAX function through one jaxpr-rewriting transform."""

from sparsejax import layout, masks, monarch, optim, paths, presets, rules, topk
from sparsejax.layout import WeightLayout
from sparsejax.paths import MatmulWeights
from sparsejax.report import Report
from sparsejax.rules import (Block, BlockDiagonal, Channels, Monarch, NM, Prune, Recipe,
                             SparkTopK)
from sparsejax.topk import exact_topk_reference, statistical_topk
from sparsejax.sparsify import SparseFunction, sparsify

__version__ = "0.1.0"
