"""What a training run needs beside the library: named presets, offline data, checkpoints, logs.

``import sparsejax`` does not import this package (nor orbax, matplotlib or tensorboardX):
the library is the transform, the rules, the kernels and the optimizers; a training run
(train.py, the notebooks, the quality benchmarks) imports ``sparsejax.training`` on top.

* :mod:`~sparsejax.training.presets`: named recipes with the optimizer wrappers that go with
  them and who owns their masks (the hand-over is :func:`sparsejax.optim.forward_masks`).
* :mod:`~sparsejax.training.imp_soups`: iterative magnitude pruning with sparse model soups.
* :mod:`~sparsejax.training.data`: text and digits batches that need no download.
* :mod:`~sparsejax.training.checkpointing`: orbax checkpoints that resume bit-identically.
* :mod:`~sparsejax.training.logging_utils`: progress line, metrics files, curves, summary.
"""
