"""One-shot (post-training) pruning: magnitude, Wanda, SparseGPT and DSnoT.

The methods are matrix math on ``W (K, N)`` and the statistics calibration
collects (:mod:`sparsejax.compiler.calibration`); :func:`oneshot` runs them
over every weight site a recipe selects.
"""

from sparsejax.oneshot.driver import METHODS, OneshotReport, OneshotResult, SiteResult, oneshot
from sparsejax.oneshot.dsnot import dsnot_refine
from sparsejax.oneshot.magnitude import magnitude_prune
from sparsejax.oneshot.sparsegpt import inverse_hessian_factor, sparsegpt_prune, sparsegpt_reference
from sparsejax.oneshot.structure import Structure, reconstruction_error
from sparsejax.oneshot.wanda import wanda_prune, wanda_scores
