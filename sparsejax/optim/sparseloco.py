"""SparseLoCo and DiLoCo outer optimizers as pure pieces: a compressor, error feedback, an outer step.

In DiLoCo-style training every replica runs H inner steps of any optax optimizer from the
shared parameters θ, then the replicas exchange their *pseudo-gradients* Δ = θ − θ_local and
an outer optimizer applies their average to θ. SparseLoCo (Sarfi et al., 2025, "Communication
Efficient LLM Pre-training with SparseLoCo") sends Δ compressed: an error-feedback
accumulator ``e ← β·e + Δ``, the top-k entries of ``e`` in each chunk with 2-bit values as the
message, and ``e`` keeps what was not sent (``e ← e − decode(message)``). The pieces:

* :func:`chunked_topk` — a :class:`Compressor`: a leaf is flattened and cut into chunks
  (the last one zero-padded), the k largest magnitudes of each chunk are kept with their
  in-chunk indices (uint16) and their values quantised to 2 bits (a sign bit and a
  magnitude bit choosing one of two per-chunk levels), packed four to a byte.
  :func:`full_precision` is the identity compressor (float32 Δ, DiLoCo).
* :func:`error_feedback` — a GradientTransformation whose ``update`` takes Δ and returns the
  *messages* (a params-structured tree of each leaf's encoded message) and the new
  accumulator.
* :func:`average_messages` — decodes the messages of all replicas (a leading replica axis,
  as an all-gather delivers them) and averages them into a dense pseudo-gradient.
* The outer step is any optax optimizer on that average: :func:`diloco_outer`
  (SGD with Nesterov momentum, lr 0.7, momentum 0.9) or :func:`sparseloco_outer`
  (plain SGD, lr 1: the error feedback plays momentum's role).

The collective and the inner steps live in :mod:`sparsejax.distributed.local_sgd`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["Compressor", "TopKMessage", "ErrorFeedbackState", "chunked_topk", "full_precision",
           "error_feedback", "encode_tree", "decode_tree", "average_messages", "message_nbytes",
           "diloco_outer", "sparseloco_outer"]


class Compressor(NamedTuple):
    """How a leaf becomes a message and back.

    Attributes:
      name: for logs.
      encode: ``leaf -> message`` (a pytree of arrays; what is sent).
      decode: ``(message, shape, dtype) -> leaf`` (the dense value the message stands for).
    """

    name: str
    encode: Callable[[jax.Array], Any]
    decode: Callable[[Any, tuple, Any], jax.Array]


class TopKMessage(NamedTuple):
    """A leaf's top-k message: per chunk, k indices, k packed 2-bit codes, two levels."""

    indices: jax.Array   # (chunks, k) uint16 (int32 for chunks over 65536): positions in the chunk
    codes: jax.Array     # (chunks, ceil(k / 4)) uint8: 2-bit codes, four per byte
    levels: jax.Array    # (chunks, 2) float32: the small and large magnitude of the chunk


def _chunking(size: int, chunk_size: int, k: int) -> tuple[int, int, int]:
    """(chunk, k, chunks) for a leaf of ``size`` entries; a leaf smaller than a chunk is one
    chunk of its own size, with k scaled down so the density stays the same."""
    if size >= chunk_size:
        return chunk_size, k, -(-size // chunk_size)
    small_k = max(1, min(size, round(k * size / chunk_size)))
    return size, small_k, 1


def chunked_topk(chunk_size: int = 4096, *, density: float | None = None, k: int | None = None,
                 value_bits: int = 2) -> Compressor:
    """Top-k per chunk with quantised values (SparseLoCo's message).

    Args:
      chunk_size: entries per chunk of the flattened leaf; the last chunk is zero-padded
        when the chunk size does not divide the leaf.
      density: fraction of each chunk sent (``k = round(density * chunk_size)``, at least 1);
        give this or ``k``.
      k: entries sent per chunk (at most ``chunk_size``).
      value_bits: 2 (sign and one of two per-chunk magnitudes) or 32 (float32 values).
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int, e.g. 4096")
    if (density is None) == (k is None):
        raise ValueError("give exactly one of density (e.g. 0.01) or k (entries per chunk)")
    if density is not None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density={density} must be in (0, 1], e.g. 0.01 for 1%")
        k = max(1, round(density * chunk_size))
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive int (entries sent per chunk)")
    if k > chunk_size:
        raise ValueError(f"k={k} is larger than chunk_size={chunk_size}: send at most a whole "
                         f"chunk (k <= chunk_size), or use a larger chunk_size")
    if value_bits not in (2, 32):
        raise ValueError(f"value_bits={value_bits} is not supported: use 2 (quantised) or 32 (float32)")
    index_dtype = jnp.uint16 if chunk_size <= 65536 else jnp.int32

    def encode(x):
        size = math.prod(x.shape)
        chunk, kk, chunks = _chunking(size, chunk_size, k)
        flat = jnp.ravel(x).astype(jnp.float32)
        flat = jnp.pad(flat, (0, chunks * chunk - size)).reshape(chunks, chunk)
        _, idx = jax.lax.top_k(jnp.abs(flat), kk)
        values = jnp.take_along_axis(flat, idx, axis=1)
        if value_bits == 32:
            return TopKMessage(idx.astype(index_dtype), values, jnp.zeros((chunks, 0), jnp.float32))
        mags = jnp.abs(values)
        # Two magnitude levels per chunk, split at the chunk's mean kept magnitude: one step
        # of Lloyd's algorithm from the mean, which keeps each level the mean of its group.
        large = mags >= jnp.mean(mags, axis=1, keepdims=True)
        n_large = jnp.sum(large, axis=1)
        hi = jnp.sum(jnp.where(large, mags, 0.0), axis=1) / jnp.maximum(n_large, 1)
        lo = jnp.sum(jnp.where(large, 0.0, mags), axis=1) / jnp.maximum(kk - n_large, 1)
        code = (values < 0).astype(jnp.uint8) * 2 + large.astype(jnp.uint8)
        code = jnp.pad(code, ((0, 0), (0, -kk % 4))).reshape(chunks, -1, 4)
        packed = jnp.sum(code << jnp.array([0, 2, 4, 6], jnp.uint8), axis=2, dtype=jnp.uint8)
        return TopKMessage(idx.astype(index_dtype), packed, jnp.stack([lo, hi], axis=1))

    def decode(message: TopKMessage, shape, dtype):
        size = math.prod(shape)
        chunk, kk, chunks = _chunking(size, chunk_size, k)
        if value_bits == 32:
            values = message.codes
        else:
            code = (message.codes[:, :, None] >> jnp.array([0, 2, 4, 6], jnp.uint8)) & 3
            code = code.reshape(chunks, -1)[:, :kk]
            magnitude = jnp.where((code & 1) == 1, message.levels[:, 1:2], message.levels[:, 0:1])
            values = jnp.where((code & 2) == 2, -magnitude, magnitude)
        rows = jnp.arange(chunks)[:, None]
        dense = jnp.zeros((chunks, chunk), jnp.float32).at[rows, message.indices.astype(jnp.int32)].set(values)
        return dense.reshape(-1)[:size].reshape(shape).astype(dtype)

    bits = "2-bit" if value_bits == 2 else "float32"
    return Compressor(f"top-{k} of {chunk_size} ({k / chunk_size:.2%}), {bits} values", encode, decode)


def full_precision() -> Compressor:
    """The identity: the message is the float32 leaf itself (DiLoCo)."""
    return Compressor("float32 (uncompressed)", lambda x: x.astype(jnp.float32),
                      lambda m, shape, dtype: m.reshape(shape).astype(dtype))


def encode_tree(compressor: Compressor, tree: Any) -> Any:
    """Each leaf's message, in the tree's structure."""
    return jax.tree.map(compressor.encode, tree)


def decode_tree(compressor: Compressor, messages: Any, like: Any) -> Any:
    """The dense tree ``messages`` stand for; ``like`` gives shapes and dtypes."""
    return jax.tree.map(lambda x, m: compressor.decode(m, x.shape, x.dtype), like, messages)


def message_nbytes(messages: Any) -> int:
    """Bytes of a tree of messages as laid out in memory (the arrays a collective sends)."""
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(messages))


class ErrorFeedbackState(NamedTuple):
    """State of :func:`error_feedback`: what has not been sent yet (float32, params' shapes)."""

    error: Any


def error_feedback(compressor: Compressor, beta: float = 0.95) -> optax.GradientTransformation:
    """``e ← β·e + Δ``; the message is ``compressor.encode(e)``; ``e ← e − decode(message)``.

    ``update(delta, state)`` returns ``(messages, state)``: the messages tree (not a dense
    update) goes to :func:`average_messages` after the replicas exchange it. With
    ``beta=0`` and :func:`full_precision` every Δ is sent whole and ``e`` stays zero.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1] (the error-feedback decay, e.g. 0.95)")

    def init_fn(params):
        return ErrorFeedbackState(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

    def update_fn(delta, state, params=None):
        del params
        accumulated = jax.tree.map(lambda e, d: beta * e + d.astype(jnp.float32), state.error, delta)
        messages = encode_tree(compressor, accumulated)
        sent = decode_tree(compressor, messages, accumulated)
        error = jax.tree.map(jnp.subtract, accumulated, sent)
        return messages, ErrorFeedbackState(error)

    return optax.GradientTransformation(init_fn, update_fn)


def average_messages(compressor: Compressor, gathered: Any, like: Any) -> Any:
    """The mean of the replicas' decoded messages; ``gathered`` has a leading replica axis.

    Every replica sums in the same order, so all of them get bitwise the same average.
    """
    def mean(x, stacked):
        replicas = jax.tree.leaves(stacked)[0].shape[0]
        total = jnp.zeros(x.shape, jnp.float32)
        for r in range(replicas):   # a fixed order, not a tree reduction, so replicas agree
            total = total + compressor.decode(jax.tree.map(lambda a: a[r], stacked), x.shape, jnp.float32)
        return (total / replicas).astype(x.dtype)
    return jax.tree.map(mean, like, gathered)


def diloco_outer(learning_rate: float = 0.7, momentum: float = 0.9) -> optax.GradientTransformation:
    """DiLoCo's outer optimizer: SGD with Nesterov momentum on the averaged pseudo-gradient."""
    return optax.sgd(learning_rate, momentum=momentum, nesterov=True)


def sparseloco_outer(learning_rate: float = 1.0) -> optax.GradientTransformation:
    """SparseLoCo's outer optimizer: plain SGD (the error feedback carries the momentum)."""
    return optax.sgd(learning_rate)
