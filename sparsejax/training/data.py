"""Data that ships offline, and deterministic, resumable batches over it.

Text (byte- or id-level language modelling):

* ``"stdlib"`` (the default): the Python standard library's own source, read
  from the interpreter's lib directory (``sysconfig.get_paths()["stdlib"]``):
  its ``*.py`` files in sorted order, test suites left out, capped at a few MB.
  Every Python install has it, so nothing is downloaded. Byte-level: vocab 256.
* a text file, or a folder of text files (read recursively, in sorted order,
  hidden files skipped): byte-level, vocab 256.
* a pre-tokenized ``.npy`` (any integer dtype) or ``.bin`` (raw ids, ``uint16``
  by default as nanoGPT writes them, or ``int32``) file of token ids.

The held-out split is by file where there are several files (a file goes to
the held-out split by a hash of its relative path, so adding a file never moves
another one), else the last ``valid_fraction`` of the tokens.

Images: scikit-learn's 8×8 handwritten digits (they ship inside scikit-learn).

Batches are a pure function of ``(seed, position)``: the position (an int) is
all a checkpoint needs to resume the identical stream.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sysconfig
import zlib
from typing import Iterator

import numpy as np

__all__ = [
    "TextData", "ImageData", "load_text_data", "load_stdlib_corpus", "load_text_path",
    "load_token_file", "load_digits", "LMBatches", "ImageBatches", "lm_eval_batches",
    "image_eval_batches", "STDLIB_MAX_BYTES",
]

STDLIB_MAX_BYTES = 4_000_000
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_PATH_HELP = "pass a text file, a folder of text files, or a .npy/.bin file of token ids"


@dataclasses.dataclass(frozen=True)
class TextData:
    """Token ids of a corpus, split into training and held-out parts.

    Attributes:
      train: 1-D integer array of token ids.
      valid: 1-D integer array of held-out token ids.
      vocab_size: one more than the largest id the model must embed.
      source: where the tokens came from (for logs and checkpoints).
    """

    train: np.ndarray
    valid: np.ndarray
    vocab_size: int
    source: str

    @property
    def fingerprint(self) -> str:
        """A CRC32 of both splits: two runs on the same data print the same value."""
        crc = zlib.crc32(np.ascontiguousarray(self.train).tobytes())
        crc = zlib.crc32(np.ascontiguousarray(self.valid).tobytes(), crc)
        return f"{crc:08x}"

    def describe(self) -> dict:
        return {"source": self.source, "vocab_size": int(self.vocab_size),
                "train_tokens": int(self.train.size), "valid_tokens": int(self.valid.size),
                "fingerprint": self.fingerprint}

    def check_seq_len(self, seq_len: int) -> None:
        """Raises a one-line ValueError if a ``seq_len`` window (plus its target) does not fit."""
        if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        shortest = min(self.train.size, self.valid.size)
        if seq_len + 1 > shortest:
            split = "training" if self.train.size <= self.valid.size else "held-out"
            raise ValueError(f"seq_len={seq_len} is longer than the data: the {split} split of "
                             f"{self.source} has {shortest} tokens and a window needs seq_len + 1; "
                             f"use seq_len <= {shortest - 1} or more data")


# ---------------------------------------------------------------- text sources


def _split_by_name(names: list[str], valid_fraction: float) -> np.ndarray:
    """Boolean per file: held out. A hash of the name, so the split is stable as files come and go."""
    cut = int(round(valid_fraction * 10_000))
    return np.array([zlib.crc32(n.encode()) % 10_000 < cut for n in names], dtype=bool)


def _split_tokens(chunks: list[np.ndarray], names: list[str], valid_fraction: float):
    held = _split_by_name(names, valid_fraction) if len(chunks) > 1 else np.zeros(1, bool)
    if 0 < held.sum() < len(chunks):
        train = np.concatenate([c for c, h in zip(chunks, held) if not h])
        valid = np.concatenate([c for c, h in zip(chunks, held) if h])
        return train, valid
    # One file, or a hash that put every file on one side: hold out the tail.
    tokens = np.concatenate(chunks)
    cut = tokens.size - max(1, int(tokens.size * valid_fraction))
    return tokens[:cut], tokens[cut:]


def _check_fraction(valid_fraction: float) -> None:
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction!r}")


def stdlib_files(max_bytes: int = STDLIB_MAX_BYTES) -> list[pathlib.Path]:
    """The standard library's ``*.py`` files the default corpus reads, in order."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    found = []
    # os.walk with pruning: site-packages alone can hold far more files than the stdlib.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        found += [pathlib.Path(dirpath, n) for n in filenames if n.endswith(".py")]
    files, total = [], 0
    for f in sorted(found, key=lambda p: p.relative_to(root).as_posix()):
        if not f.is_file():
            continue
        size = f.stat().st_size
        if total + size > max_bytes:
            continue      # too big for what is left: a smaller later file may still fit
        files.append(f)
        total += size
    return files


def load_stdlib_corpus(max_bytes: int = STDLIB_MAX_BYTES, valid_fraction: float = 0.05) -> TextData:
    """The default corpus: the interpreter's own standard-library source, byte-level."""
    _check_fraction(valid_fraction)
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive, got {max_bytes!r}")
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(max_bytes)
    if not files:
        raise ValueError(f"found no Python source under {root} (max_bytes={max_bytes}); "
                         f"{_PATH_HELP} instead")
    chunks = [np.frombuffer(f.read_bytes(), dtype=np.uint8) for f in files]
    names = [f.relative_to(root).as_posix() for f in files]
    train, valid = _split_tokens(chunks, names, valid_fraction)
    return TextData(train, valid, 256, f"stdlib:{root} ({len(files)} files)")


def load_text_path(path: str | os.PathLike, valid_fraction: float = 0.05) -> TextData:
    """A text file or a folder of text files, byte-level (vocab 256)."""
    _check_fraction(valid_fraction)
    p = pathlib.Path(path)
    if not p.exists():
        raise ValueError(f"data path {str(p)!r} does not exist: {_PATH_HELP}")
    if p.is_dir():
        files = sorted((f for f in p.rglob("*") if f.is_file()
                        and not any(part.startswith(".") for part in f.relative_to(p).parts)),
                       key=lambda f: f.relative_to(p).as_posix())
        names = [f.relative_to(p).as_posix() for f in files]
    else:
        files, names = [p], [p.name]
    chunks = [np.frombuffer(f.read_bytes(), dtype=np.uint8) for f in files]
    kept = [(c, n) for c, n in zip(chunks, names) if c.size]
    if not kept:
        what = "has no non-empty files" if p.is_dir() else "is empty"
        raise ValueError(f"data path {str(p)!r} {what}: {_PATH_HELP}")
    chunks, names = (list(t) for t in zip(*kept))
    train, valid = _split_tokens(chunks, names, valid_fraction)
    return TextData(train, valid, 256, f"text:{p}")


def load_token_file(path: str | os.PathLike, valid_fraction: float = 0.05,
                    dtype: str = "uint16", vocab_size: int | None = None) -> TextData:
    """Pre-tokenized ids: a ``.npy`` array, or a raw ``.bin`` of ``dtype`` (memory-mapped).

    ``vocab_size`` defaults to the largest id plus one.
    """
    _check_fraction(valid_fraction)
    p = pathlib.Path(path)
    if not p.exists():
        raise ValueError(f"data path {str(p)!r} does not exist: {_PATH_HELP}")
    if p.suffix == ".npy":
        tokens = np.load(p, mmap_mode="r")
    elif p.suffix == ".bin":
        if np.dtype(dtype) not in (np.dtype("uint16"), np.dtype("int32"), np.dtype("uint32")):
            raise ValueError(f"dtype for a .bin token file must be uint16, int32 or uint32, got {dtype!r}")
        tokens = np.memmap(p, dtype=dtype, mode="r") if p.stat().st_size else np.zeros(0, dtype)
    else:
        raise ValueError(f"token file {str(p)!r} must end in .npy or .bin; for text, {_PATH_HELP}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"token file {str(p)!r} holds {tokens.dtype}, not integer token ids")
    tokens = tokens.reshape(-1)
    if tokens.size == 0:
        raise ValueError(f"data path {str(p)!r} is empty: {_PATH_HELP}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0:
        raise ValueError(f"token file {str(p)!r} holds a negative id ({lo}); ids must be >= 0")
    if vocab_size is None:
        vocab_size = hi + 1
    elif hi >= vocab_size:
        raise ValueError(f"token file {str(p)!r} holds id {hi}, not below vocab_size={vocab_size}; "
                         f"raise vocab_size to at least {hi + 1}")
    train, valid = _split_tokens([tokens], [p.name], valid_fraction)
    return TextData(train, valid, int(vocab_size), f"tokens:{p}")


def load_text_data(source: str = "stdlib", valid_fraction: float = 0.05, **kwargs) -> TextData:
    """``"stdlib"`` (default), a ``.npy``/``.bin`` token file, or a text file/folder.

    ``kwargs`` go to the loader: ``max_bytes`` (stdlib), ``dtype`` and
    ``vocab_size`` (token files).
    """
    if source == "stdlib":
        return load_stdlib_corpus(valid_fraction=valid_fraction, **kwargs)
    if pathlib.Path(source).suffix in (".npy", ".bin"):
        return load_token_file(source, valid_fraction=valid_fraction, **kwargs)
    if kwargs:
        raise TypeError(f"text files take no options {sorted(kwargs)}")
    return load_text_path(source, valid_fraction=valid_fraction)


# ---------------------------------------------------------------- LM batches


def _rng(seed: int, position: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(position)])))


def _check_batch(batch_size: int, process_index: int, process_count: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the process count "
                         f"({process_count}): every process loads batch_size / process_count rows")


class _PositionedBatches:
    """A batch stream that is a pure function of ``(seed, position)``: ``batch(position)``
    (the subclass's) and iteration, which yields ``batch(position)`` and advances
    ``position``; each process keeps its own contiguous ``_rows`` of the global batch."""

    def __init__(self, batch_size: int, position: int, process_index: int, process_count: int):
        _check_batch(batch_size, process_index, process_count)
        self.position = int(position)
        rows = batch_size // process_count
        self._rows = slice(process_index * rows, (process_index + 1) * rows)

    def batch(self, position: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        out = self.batch(self.position)
        self.position += 1
        return out


class LMBatches(_PositionedBatches):
    """Random windows of a token stream, as a pure function of ``(seed, position)``.

    ``batch(position)`` returns ``{"inputs", "targets"}``, int32 arrays of shape
    ``(batch_size // process_count, seq_len)``; ``targets`` are ``inputs`` shifted
    by one token. Iterating yields ``batch(position)`` and advances
    ``position``; checkpoint ``position`` and pass it back to resume the
    identical stream. With several processes every process computes the same
    global batch (window offsets) and keeps its own contiguous rows.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0,
                 position: int = 0, process_index: int = 0, process_count: int = 1):
        super().__init__(batch_size, position, process_index, process_count)
        tokens = np.asarray(tokens) if not isinstance(tokens, np.memmap) else tokens
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
            raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
        if seq_len + 1 > tokens.size:
            raise ValueError(f"seq_len={seq_len} is longer than the data ({tokens.size} tokens; a "
                             f"window needs seq_len + 1): use seq_len <= {tokens.size - 1} or more data")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed

    def batch(self, position: int) -> dict[str, np.ndarray]:
        starts = _rng(self.seed, position).integers(
            0, self.tokens.size - self.seq_len, size=self.batch_size)[self._rows]
        window = np.stack([np.asarray(self.tokens[s:s + self.seq_len + 1]) for s in starts])
        window = window.astype(np.int32)
        return {"inputs": window[:, :-1], "targets": window[:, 1:]}


def lm_eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None,
                    process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive non-overlapping windows of the held-out tokens, in order.

    Every batch has the full shape; rows past the end of the data repeat the
    first window with ``weights`` 0, so a weighted mean over all batches is the
    exact mean over the windows.
    """
    _check_batch(batch_size, process_index, process_count)
    n_windows = (np.asarray(tokens).size - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"seq_len={seq_len} is longer than the held-out data ({np.asarray(tokens).size} "
                         f"tokens): use seq_len <= {np.asarray(tokens).size - 1} or more data")
    n_batches = -(-n_windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    rows = batch_size // process_count
    mine = slice(process_index * rows, (process_index + 1) * rows)
    for b in range(n_batches):
        idx = np.arange(b * batch_size, (b + 1) * batch_size)
        valid = idx < n_windows
        starts = np.where(valid, idx, 0)[mine] * seq_len
        window = np.stack([np.asarray(tokens[s:s + seq_len + 1]) for s in starts]).astype(np.int32)
        weights = np.broadcast_to(valid[mine, None], (rows, seq_len)).astype(np.float32)
        yield {"inputs": window[:, :-1], "targets": window[:, 1:], "weights": weights}


# ---------------------------------------------------------------- images


@dataclasses.dataclass(frozen=True)
class ImageData:
    """Images ``(N, H, W, C)`` float32 in [0, 1] and int32 labels, split in two."""

    train_images: np.ndarray
    train_labels: np.ndarray
    valid_images: np.ndarray
    valid_labels: np.ndarray
    num_classes: int
    source: str

    def describe(self) -> dict:
        return {"source": self.source, "num_classes": self.num_classes,
                "train_examples": int(self.train_labels.size),
                "valid_examples": int(self.valid_labels.size),
                "image_shape": list(self.train_images.shape[1:])}


def load_digits(valid_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """scikit-learn's 1797 8×8 digits (shipped inside the package), split by a seeded shuffle."""
    _check_fraction(valid_fraction)
    try:
        from sklearn import datasets
    except ImportError:
        raise ImportError("the digits data set ships with scikit-learn, which is not installed: "
                          "pip install scikit-learn (or pip install sparsejax[dev])") from None
    digits = datasets.load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[..., None]
    labels = digits.target.astype(np.int32)
    order = _rng(seed, 0).permutation(labels.size)
    n_valid = max(1, int(round(labels.size * valid_fraction)))
    valid, train = order[:n_valid], order[n_valid:]
    return ImageData(images[train], labels[train], images[valid], labels[valid], 10, "sklearn:digits")


class ImageBatches(_PositionedBatches):
    """Shuffled epochs of an image set, as a pure function of ``(seed, position)``.

    Epoch ``e`` is a permutation drawn from ``(seed, e)``; each epoch yields
    ``len // batch_size`` full batches (the remainder waits for a later epoch's
    shuffle). ``batch(position)`` returns ``{"images", "labels"}``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int = 0,
                 position: int = 0, process_index: int = 0, process_count: int = 1):
        super().__init__(batch_size, position, process_index, process_count)
        if len(images) != len(labels):
            raise ValueError(f"images ({len(images)}) and labels ({len(labels)}) differ in length")
        if batch_size > len(labels):
            raise ValueError(f"batch_size={batch_size} is larger than the data set ({len(labels)} "
                             f"examples): use batch_size <= {len(labels)}")
        self.images, self.labels, self.batch_size, self.seed = images, labels, batch_size, seed
        self.steps_per_epoch = len(labels) // batch_size

    def batch(self, position: int) -> dict[str, np.ndarray]:
        epoch, step = divmod(int(position), self.steps_per_epoch)
        order = _rng(self.seed, epoch).permutation(len(self.labels))
        idx = order[step * self.batch_size:(step + 1) * self.batch_size][self._rows]
        return {"images": self.images[idx], "labels": self.labels[idx]}


def image_eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int,
                       process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """The images in order, in full batches; padding rows carry ``weights`` 0."""
    _check_batch(batch_size, process_index, process_count)
    n = len(labels)
    rows = batch_size // process_count
    mine = slice(process_index * rows, (process_index + 1) * rows)
    for b in range(-(-n // batch_size)):
        idx = np.arange(b * batch_size, (b + 1) * batch_size)
        valid = idx < n
        idx = np.where(valid, idx, 0)[mine]
        yield {"images": images[idx], "labels": labels[idx],
               "weights": valid[mine].astype(np.float32)}
