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

__all__ = ["TransformerConfig", "TransformerLM", "PRESETS", "rope", "lm_loss"]


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
    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = lambda name: nn.Dense(cfg.d_model, use_bias=False, dtype=cfg.dtype,
                                      param_dtype=cfg.param_dtype, name=name)
        b, t, _ = x.shape
        heads = lambda y: y.reshape(b, t, cfg.n_heads, cfg.head_dim)
        positions = jnp.arange(t)
        q = rope(heads(dense("q")(x)), positions, cfg.rope_base)
        k = rope(heads(dense("k")(x)), positions, cfg.rope_base)
        v = heads(dense("v")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(cfg.head_dim))
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, cfg.d_model)
        return dense("o")(out)


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
    """Pre-norm residual block; the ``(x, carry)`` signature serves ``nn.scan`` too."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array, _=None):
        cfg = self.config
        norm = lambda name: nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype,
                                       param_dtype=cfg.param_dtype, name=name)
        x = x + CausalSelfAttention(cfg, name="attn")(norm("attn_norm")(x))
        x = x + GatedMLP(cfg, name="mlp")(norm("mlp_norm")(x))
        return x, None


class TransformerLM(nn.Module):
    """Decoder-only LM: ``apply(variables, tokens (B, T) int) -> logits (B, T, vocab)``."""

    config: TransformerConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         embedding_init=nn.initializers.normal(stddev=1.0), name="embed")
        x = embed(tokens)
        block = Block
        if cfg.remat:
            # Inside a scan, CSE cannot merge the recomputation away, so it need not be prevented.
            block = nn.remat(Block, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=cfg.n_layers)
            x, _ = stack(cfg, name="layers")(x, None)
        else:
            for i in range(cfg.n_layers):
                x, _ = block(cfg, name=f"layers_{i}")(x)
        x = nn.RMSNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                       name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, name="lm_head")(x)
        return logits.astype(jnp.float32)


def lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy (nats); ``weights`` (same shape as ``targets``) masks tokens."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if weights is None:
        return jnp.mean(nll)
    weights = weights.astype(jnp.float32)
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
