"""A decoder-only Transformer language model in Flax Linen.

Pre-norm blocks (RMSNorm), rotary position embeddings (RoPE), causal multi-head
self-attention and a gated feed-forward network (SwiGLU). Every weight is a
plain ``nn.Dense`` kernel, so ``sparsify`` finds each one as a weight site and
recipes can name them by path:

    params/embed/embedding                  (a gather, not a matmul: no site)
    params/layers_0/attn/{q,k,v,o}/kernel    (d_model, d_model)
    params/layers_0/mlp/{gate,up}/kernel     (d_model, d_ff)
    params/layers_0/mlp/down/kernel          (d_ff, d_model)
    params/lm_head/kernel                    (d_model, vocab_size)

With ``scan_layers=True`` the blocks are one ``nn.scan`` named ``layers`` and
every block kernel gains a leading layer axis (``params/layers/mlp/up/kernel`` of
shape ``(n_layers, d_model, d_ff)``); a glob such as ``*/mlp/*/kernel`` matches
both spellings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["TransformerConfig", "TransformerLM", "PRESETS", "rope", "lm_loss", "embed_lookup"]


ATTENTION = ("explicit", "fused")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape and numerics of :class:`TransformerLM`.

    Attributes:
      vocab_size: number of token ids (256 for byte-level text).
      d_model: residual width; a multiple of ``n_heads``.
      n_layers: number of blocks.
      n_heads: attention heads; ``d_model // n_heads`` must be even (RoPE
        rotates pairs of features).
      d_ff: hidden width of the gated FFN.
      rope_base: RoPE frequency base.
      scan_layers: run the blocks as one ``nn.scan`` (one compiled block, stacked
        kernels) instead of an unrolled Python loop.
      remat: recompute each block's activations in the backward pass.
      dtype: computation dtype, e.g. ``"float32"`` or ``"bfloat16"``. Softmax and
        the loss are computed in float32 either way.
      param_dtype: parameter dtype.
      tie_embeddings: compute logits with the transposed embedding instead of a
        separate ``lm_head``.
      norm_eps: RMSNorm epsilon.
      attention: ``"explicit"`` (scores, mask and softmax written out: what Spark's
        attention sites and calibration see) or ``"fused"`` (``jax.nn.dot_product_attention``:
        cuDNN flash attention on GPU, its XLA form elsewhere; the scores are never held in
        memory). Decoding with a KV cache always uses the explicit form.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 384
    rope_base: float = 10_000.0
    scan_layers: bool = False
    remat: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    attention: str = "explicit"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"TransformerConfig.d_model ({self.d_model}) must be a multiple of "
                             f"n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"TransformerConfig: head size d_model // n_heads = "
                             f"{self.d_model // self.n_heads} must be even for RoPE")
        if self.attention not in ATTENTION:
            raise ValueError(f"TransformerConfig.attention must be one of {ATTENTION}, got "
                             f"{self.attention!r}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                raise ValueError(f"TransformerConfig.{name} must name a dtype, got "
                                 f"{getattr(self, name)!r}") from None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the model's signature in checkpoints)."""
        return {"model": "transformer", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransformerConfig":
        d = {k: v for k, v in d.items() if k != "model"}
        return cls(**d)

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embedding, blocks, final norm and head)."""
        d, f, v, n = self.d_model, self.d_ff, self.vocab_size, self.n_layers
        block = 4 * d * d + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else d * v
        return v * d + n * block + d + head

    def flops_per_token(self, seq_len: int) -> int:
        """Forward matmul FLOPs per token (2 per multiply-add), attention included."""
        d, f, v, n = self.d_model, self.d_ff, self.vocab_size, self.n_layers
        dense = 2 * (4 * d * d + 3 * d * f)
        attention = 2 * 2 * seq_len * d       # scores and weighted values, full causal square
        return n * (dense + attention) + 2 * d * v


PRESETS: dict[str, TransformerConfig] = {
    # Trains on two CPU cores in minutes: about 0.5M parameters.
    "lm-tiny": TransformerConfig(d_model=128, n_layers=2, n_heads=4, d_ff=384),
    "lm-small": TransformerConfig(d_model=256, n_layers=4, n_heads=4, d_ff=768),
    "lm-base": TransformerConfig(d_model=512, n_layers=8, n_heads=8, d_ff=1536, scan_layers=True),
}


def rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotary position embedding on ``x`` of shape ``(..., T, heads, head_dim)``.

    Feature ``i`` of the first half and feature ``i`` of the second half form a
    pair rotated by ``positions * base ** (-2i / head_dim)`` (the "rotate half"
    layout). Computed in float32, returned in ``x.dtype``.
    """
    half = x.shape[-1] // 2
    freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[:, None] * freq[None, :]      # (T, half)
    sin = jnp.sin(angle)[:, None, :]                                    # (T, 1, half)
    cos = jnp.cos(angle)[:, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class CausalSelfAttention(nn.Module):
    """Causal multi-head attention with RoPE.

    With ``cache=None`` it attends within ``x``. With a KV cache ``(k, v)``, each of shape
    ``(B, S, heads, head_dim)``, the ``T`` new tokens sit at ``position ... position + T - 1``:
    their keys and values are written into the cache there and each attends to every cached
    position up to its own (decoding); the updated cache is returned beside the output.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, cache=None, position=None):
        cfg = self.config
        dense = lambda name: nn.Dense(cfg.d_model, use_bias=False, dtype=cfg.dtype,
                                      param_dtype=cfg.param_dtype, name=name)
        b, t, _ = x.shape
        heads = lambda y: y.reshape(b, t, cfg.n_heads, cfg.head_dim)
        start = jnp.zeros([], jnp.int32) if position is None else jnp.asarray(position, jnp.int32)
        positions = start + jnp.arange(t)
        q = rope(heads(dense("q")(x)), positions, cfg.rope_base)
        k = rope(heads(dense("k")(x)), positions, cfg.rope_base)
        v = heads(dense("v")(x))
        if cache is None and cfg.attention == "fused":
            # Flash attention where the backend has it: the (B, heads, T, T) scores, which cost
            # more memory traffic than every projection of a 1024-token layer, are never stored.
            # (cuDNN's kernel takes 16-bit operands; a float32 model runs XLA's form.)
            cudnn = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
            implementation = "cudnn" if cudnn else "xla"
            out = jax.nn.dot_product_attention(q, k, v.astype(q.dtype), is_causal=True,
                                               implementation=implementation)
            return dense("o")(out.reshape(b, t, cfg.d_model))
        if cache is None:
            keys, values, key_positions = k, v, positions
        else:
            zero = jnp.zeros([], jnp.int32)
            keys = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (zero, start, zero, zero))
            values = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (zero, start, zero, zero))
            key_positions = jnp.arange(keys.shape[1])
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, keys.astype(q.dtype)).astype(jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(cfg.head_dim))
        causal = key_positions[None, :] <= positions[:, None]
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, values.astype(v.dtype)).reshape(b, t, cfg.d_model)
        out = dense("o")(out)
        return out if cache is None else (out, (keys, values))


class GatedMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = lambda features, name: nn.Dense(features, use_bias=False, dtype=cfg.dtype,
                                                param_dtype=cfg.param_dtype, name=name)
        h = nn.silu(dense(cfg.d_ff, "gate")(x)) * dense(cfg.d_ff, "up")(x)
        return dense(cfg.d_model, "down")(h)


class Block(nn.Module):
    """Pre-norm residual block; ``(x, cache) -> (x, cache)`` serves ``nn.scan`` too.

    ``cache`` is this layer's ``(k, v)`` KV cache or None; ``position`` is where the new tokens
    of a cached call start (see :class:`CausalSelfAttention`).
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, cache=None, position=None):
        cfg = self.config
        norm = lambda name: nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype,
                                       param_dtype=cfg.param_dtype, name=name)
        attn = CausalSelfAttention(cfg, name="attn")(norm("attn_norm")(x), cache, position)
        if cache is not None:
            attn, cache = attn
        x = x + attn
        x = x + GatedMLP(cfg, name="mlp")(norm("mlp_norm")(x))
        return x, cache


class TransformerLM(nn.Module):
    """Decoder-only LM: ``apply(variables, tokens (B, T) int) -> logits (B, T, vocab)``.

    Decoding with a KV cache: ``apply(variables, tokens, cache, position)`` with ``cache``
    from :func:`init_cache` returns ``(logits, cache)``; the ``T`` tokens are placed at
    ``position`` (a traced int is fine) and attend to the cache up to themselves.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, cache=None, position=None):
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         embedding_init=nn.initializers.normal(stddev=1.0), name="embed")
        x = embed_lookup(embed.embedding, tokens, cfg.dtype)
        block = Block
        if cfg.remat:
            # Inside a scan, CSE cannot merge the recomputation away, so it need not be prevented.
            block = nn.remat(Block, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            # The cache (stacked over layers) is scanned with the parameters; the position is
            # the same for every layer.
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(0, nn.broadcast), out_axes=0, length=cfg.n_layers)
            x, cache = stack(cfg, name="layers")(x, cache, position)
        else:
            new_cache = []
            for i in range(cfg.n_layers):
                layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
                x, layer_cache = block(cfg, name=f"layers_{i}")(x, layer_cache, position)
                new_cache.append(layer_cache)
            if cache is not None:
                cache = jax.tree.map(lambda *cs: jnp.stack(cs), *new_cache)
        x = nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, cache)


# Up to this vocabulary the embedding's gradient is a one-hot matmul (2·tokens·vocab·d_model
# FLOPs: 0.1 ms for 32k tokens at 2048 × 1024 on an H200) instead of a scatter-add.
# The scatter adds every token's row into the table with atomics, and with few distinct ids
# (bytes, a small vocabulary) thousands land on the same row: on an H200 that scatter took
# 50 ms of a 112 ms training step of the byte-level LM, and did not shrink with the batch.
ONE_HOT_GRAD_MAX_VOCAB = 2048


def embed_lookup(table: jax.Array, ids: jax.Array, dtype=None) -> jax.Array:
    """``table[ids]`` cast to ``dtype``, as ``nn.Embed`` computes it, with a faster gradient.

    The rows are gathered from the table as stored (float32 master weights) and then cast,
    so a large vocabulary's scatter-add gradient accumulates in the table's own dtype; a
    vocabulary up to :data:`ONE_HOT_GRAD_MAX_VOCAB` gets its gradient from a one-hot matmul.
    The forward values are those of ``nn.Embed`` (cast, then gather) exactly.
    """
    dtype = table.dtype if dtype is None else jnp.dtype(dtype)
    if table.shape[0] <= ONE_HOT_GRAD_MAX_VOCAB:
        return _gather_with_one_hot_grad(table, ids, dtype)
    return _gather(table, ids, dtype)


def _gather(table, ids, dtype):
    return jnp.take(table, ids, axis=0).astype(dtype)


_gather_with_one_hot_grad = jax.custom_vjp(_gather, nondiff_argnums=(2,))


def _gather_fwd(table, ids, dtype):
    return _gather(table, ids, dtype), (table, ids)


def _gather_bwd(dtype, res, g):
    table, ids = res
    one_hot = jax.nn.one_hot(ids.reshape(-1), table.shape[0], dtype=dtype)
    grad = jnp.dot(one_hot.T, g.reshape(-1, table.shape[1]).astype(dtype),
                   preferred_element_type=jnp.float32)
    return grad.astype(table.dtype), None


_gather_with_one_hot_grad.defvjp(_gather_fwd, _gather_bwd)


def init_cache(config: TransformerConfig, batch: int, length: int, dtype=None):
    """An empty KV cache ``(k, v)``, each ``(n_layers, batch, length, heads, head_dim)``."""
    shape = (config.n_layers, batch, length, config.n_heads, config.head_dim)
    dtype = dtype or config.dtype
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy (nats); ``weights`` (same shape as ``targets``) masks tokens."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if weights is None:
        return jnp.mean(nll)
    weights = weights.astype(jnp.float32)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
