"""Small image classifiers in Flax Linen: an MLP-Mixer and a conv net.

Sized for scikit-learn's 8×8 digits (``sparsejax.training.data.load_digits``) but shape
agnostic. Every weight is a plain ``nn.Dense`` or ``nn.Conv`` kernel, so
``sparsify`` finds each one as a weight site:

MLP-Mixer (``MLPMixer``)::

    params/stem/kernel                                (patch*patch*channels, width)
    params/mixer_0/token_mixing/{up,down}/kernel      (tokens, token_hidden), (token_hidden, tokens)
    params/mixer_0/channel_mixing/{up,down}/kernel    (width, channel_hidden), (channel_hidden, width)
    params/head/kernel                                (width, num_classes)

Conv net (``ConvNet``)::

    params/conv_0/kernel ... params/conv_{n-1}/kernel (3, 3, in, out)
    params/head/kernel                                (channels[-1], num_classes)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["MixerConfig", "MLPMixer", "ConvNetConfig", "ConvNet", "PRESETS", "patchify"]


def _check_positive(owner: str, **values):
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """Shape of :class:`MLPMixer`.

    Attributes:
      num_classes: output classes.
      patch: side of the square patches; must divide the image height and width.
      width: channels per token after the stem.
      n_layers: mixer blocks.
      token_hidden: hidden width of the token-mixing MLP.
      channel_hidden: hidden width of the channel-mixing MLP.
      dtype: computation dtype.
    """

    num_classes: int = 10
    patch: int = 2
    width: int = 64
    n_layers: int = 2
    token_hidden: int = 32
    channel_hidden: int = 128
    dtype: str = "float32"

    def __post_init__(self):
        _check_positive("MixerConfig", num_classes=self.num_classes, patch=self.patch,
                        width=self.width, n_layers=self.n_layers, token_hidden=self.token_hidden,
                        channel_hidden=self.channel_hidden)

    def to_dict(self) -> dict[str, Any]:
        return {"model": "mixer", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MixerConfig":
        return cls(**{k: v for k, v in d.items() if k != "model"})

    def replace(self, **changes) -> "MixerConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ConvNetConfig:
    """Shape of :class:`ConvNet`: 3×3 convs with ReLU, a 2×2 average pool after
    every second one, global average pooling, a linear head."""

    num_classes: int = 10
    channels: tuple[int, ...] = (16, 32, 64)
    dtype: str = "float32"

    def __post_init__(self):
        _check_positive("ConvNetConfig", num_classes=self.num_classes)
        if not self.channels:
            raise ValueError("ConvNetConfig.channels must name at least one conv layer")
        for c in self.channels:
            _check_positive("ConvNetConfig", channels=c)
        object.__setattr__(self, "channels", tuple(self.channels))

    def to_dict(self) -> dict[str, Any]:
        return {"model": "convnet", **dataclasses.asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConvNetConfig":
        return cls(**{k: v for k, v in d.items() if k != "model"})

    def replace(self, **changes) -> "ConvNetConfig":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, Any] = {
    "mixer-tiny": MixerConfig(),
    "convnet-tiny": ConvNetConfig(),
}


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """``(B, H, W, C) -> (B, H/p * W/p, p*p*C)``, patches in row-major order."""
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"patch size {patch} must divide the image size {h}×{w}")
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class MlpBlock(nn.Module):
    hidden: int
    out: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.hidden, dtype=self.dtype, name="up")(x)
        return nn.Dense(self.out, dtype=self.dtype, name="down")(nn.gelu(x))


class MixerBlock(nn.Module):
    config: MixerConfig

    @nn.compact
    def __call__(self, x):                          # (B, tokens, width)
        cfg = self.config
        y = nn.LayerNorm(dtype=cfg.dtype, name="token_norm")(x)
        y = jnp.swapaxes(y, 1, 2)                   # mix along tokens
        y = MlpBlock(cfg.token_hidden, x.shape[1], cfg.dtype, name="token_mixing")(y)
        x = x + jnp.swapaxes(y, 1, 2)
        y = nn.LayerNorm(dtype=cfg.dtype, name="channel_norm")(x)
        return x + MlpBlock(cfg.channel_hidden, cfg.width, cfg.dtype, name="channel_mixing")(y)


class MLPMixer(nn.Module):
    """MLP-Mixer: ``apply(variables, images (B, H, W, C)) -> logits (B, num_classes)``."""

    config: MixerConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        x = nn.Dense(cfg.width, dtype=cfg.dtype, name="stem")(patchify(images, cfg.patch))
        for i in range(cfg.n_layers):
            x = MixerBlock(cfg, name=f"mixer_{i}")(x)
        x = nn.LayerNorm(dtype=cfg.dtype, name="final_norm")(x)
        logits = nn.Dense(cfg.num_classes, dtype=cfg.dtype, name="head")(jnp.mean(x, axis=1))
        return logits.astype(jnp.float32)


class ConvNet(nn.Module):
    """A small conv net: ``apply(variables, images (B, H, W, C)) -> logits (B, num_classes)``."""

    config: ConvNetConfig

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        cfg = self.config
        x = images
        for i, c in enumerate(cfg.channels):
            x = nn.relu(nn.Conv(c, (3, 3), padding="SAME", dtype=cfg.dtype, name=f"conv_{i}")(x))
            # Pool after every second conv while the image is still large enough to halve.
            if i % 2 == 1 and min(x.shape[1:3]) >= 2:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(cfg.num_classes, dtype=cfg.dtype, name="head")(x)
        return logits.astype(jnp.float32)
