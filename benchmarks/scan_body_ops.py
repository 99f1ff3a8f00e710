"""What one scanned layer of the LM costs besides its matmuls, read off the compiled HLO.

Builds e2e_speed.py's program (TransformerLM, scanned layers, bf16 compute, float32 params)
dense and with Monarch(nblocks=4) on every linear layer but the head, compiles its AdamW
training step and its one-token decode step, and prints for each scan (while) body of the
optimized HLO: the top-level ops (each one a kernel on a GPU), the GEMMs among them, and the
pure data movements (transposes and copies, alone or fused with converts and reshapes only)
with the bytes they write. ``--path`` forces a Monarch path (``einsum``, ``xla_dense``, ...).
Off a GPU the Monarch einsums are the reference unless ``--gpu_einsum``, which compiles the
GPU's einsum path (bf16 GEMMs) instead; the layouts are then the CPU compiler's, so the
counts say what the program names, not what an H200 runs: run it there for that.

    python benchmarks/scan_body_ops.py --d_model 256 --d_ff 1024 --layers 4 --batch 2 --seq 128
"""

from __future__ import annotations

import argparse
import collections
import math
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.append(str(pathlib.Path(__file__).resolve().parent))
import e2e_speed  # noqa: E402  (its recipes: the program it times is the one counted here)

import sparsejax as sj  # noqa: E402
from sparsejax.kernels import monarch_matmul, path_choice  # noqa: E402
from sparsejax.models import transformer  # noqa: E402

_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
_MOVES = {"transpose", "copy", "bitcast", "reshape", "convert", "parameter", "slice", "pad",
          "concatenate", "broadcast", "constant"}
_SKIP = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast"}
_OP = re.compile(r"\s+(?:ROOT )?%?[\w.\-]+ = (.+?) ([\w\-]+)\((.*)$")


def _bytes(shape: str) -> int:
    return sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
               for t, dims in re.findall(r"\b(bf16|f16|f32|s32|u32|pred|s8|u8)\[([\d,]*)\]", shape))


def _computations(text: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if m and not line.startswith(" "):
            name = m.group(1)
            comps[name] = []
        elif name and line.startswith("  "):
            comps[name].append(line)
    return comps


def scan_bodies(text: str, min_move_bytes: int, listing: list | None = None
                ) -> dict[str, collections.Counter]:
    """Per while body: ``ops``, ``gemms``, ``moves`` and ``move_bytes`` (see the module doc).

    ``listing``: gets one ``(body, kind, op, shape, inner ops)`` row per top-level op that is
    not a GEMM, ``kind`` one of ``move`` / ``other`` (what the step spends beside its GEMMs)."""
    comps = _computations(text)
    out = {}
    for body in sorted(set(re.findall(r"body=%?([\w.\-]+)", text))):
        c = collections.Counter()
        for line in comps.get(body, []):
            m = _OP.match(line)
            if not m or m.group(2) in _SKIP:
                continue
            shape, op, rest = m.groups()
            c["ops"] += 1
            inner = {op}
            called = re.search(r"calls=%?([\w.\-]+)", rest)
            if called:
                inner = {mm.group(2) for mm in map(_OP.match, comps.get(called.group(1), [])) if mm}
            target = re.search(r'custom_call_target="([^"]+)"', rest)
            if ("dot" in inner or "convolution" in inner or "gemm" in rest.lower()
                    or (target and re.search("gemm|matmul", target.group(1), re.I))):
                c["gemms"] += 1
                continue
            kind = "other"
            if inner & {"transpose", "copy"} and inner <= _MOVES and _bytes(shape) >= min_move_bytes:
                c["moves"] += 1
                c["move_bytes"] += _bytes(shape)
                kind = "move"
            if listing is not None:
                listing.append((body, kind, op, shape.strip(),
                                sorted(inner - _SKIP) if called else [op]))
        out[body] = c
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--d_model", type=int, default=256)
    parser.add_argument("--d_ff", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--path", default="einsum", help="the Monarch path forced at every site")
    parser.add_argument("--list", action="store_true",
                        help="also list every op of the training step's scan bodies but the GEMMs")
    parser.add_argument("--gpu_einsum", action="store_true",
                        help="off a GPU: compile the GPU's einsum path, not the reference")
    args = parser.parse_args()
    if args.gpu_einsum and jax.default_backend() != "gpu":
        from sparsejax.compiler.passes import factorized
        from sparsejax.rules import Monarch
        factorized._KINDS[Monarch].einsum = monarch_matmul.monarch_matmul_einsum
        monarch_matmul._dot.__globals__["jax"] = type(
            "GpuJax", (), {"__getattr__": lambda self, a: getattr(jax, a),
                           "default_backend": staticmethod(lambda: "gpu")})()
    cfg = transformer.TransformerConfig(vocab_size=args.vocab, d_model=args.d_model,
                                        n_layers=args.layers, n_heads=args.heads, d_ff=args.d_ff,
                                        scan_layers=True, dtype="bfloat16", attention="explicit")
    model = transformer.TransformerLM(cfg)
    tokens = jax.random.randint(jax.random.key(0), (args.batch, args.seq), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(1), tokens)
    tx = optax.adamw(1e-4)
    tokens_moved = args.batch * args.seq
    for recipe in ("dense", "monarch4"):
        if recipe == "dense":
            fwd, p, s = (lambda p, s, *a: model.apply(p, *a)), params, None
        else:
            fwd = sj.sparsify(model.apply, e2e_speed.RECIPES[recipe]())
            p, s = fwd.init(params, tokens, rng=jax.random.key(4))

        def step(params, opt, sstate, tokens):
            loss = lambda q: transformer.lm_loss(fwd(q, sstate, tokens)[:, :-1], tokens[:, 1:])
            value, grads = jax.value_and_grad(loss)(params)
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), opt, value

        cache = transformer.init_cache(cfg, 1, 64, jnp.bfloat16)
        tok = jnp.zeros((1, 1), jnp.int32)
        p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p)
        with path_choice.mode(f"force:{args.path}"):
            train = jax.jit(step).lower(p, tx.init(p), s, tokens).compile().as_text()
            decode = jax.jit(lambda q, c: fwd(q, s, tok, c, jnp.int32(63))[0]).lower(
                p16, cache).compile().as_text()
        for what, text, min_bytes in (("train", train, 16 * 2 * tokens_moved),
                                      ("decode", decode, 256)):
            listing = [] if args.list and what == "train" else None
            for body, c in scan_bodies(text, min_bytes, listing).items():
                print(f"{recipe:9s} {what:6s} {body[:32]:32s} ops {c['ops']:4d}  gemms {c['gemms']:3d}  "
                      f"moves {c['moves']:3d} ({c['move_bytes'] / 1e6:.2f} MB written)", flush=True)
            for body, kind, op, shape, inner in listing or ():
                print(f"    {recipe} {body[:24]:24s} {kind:5s} {op:14s} {shape[:60]:60s} "
                      f"{_bytes(shape) / 1e6:8.2f} MB  {','.join(inner)[:90]}", flush=True)


if __name__ == "__main__":
    main()
