"""vLLM's KV cache forms, made the way vLLM makes them: one buffer for every
layer, and a view of it per layer (vLLM 0.33's allocate_kv_cache, and the
per-layer tensors vLLM 0.32's CPU runner hands a connector). A layer's view
is [num_blocks, heads, block_size, C] (the HND family) or [num_blocks,
block_size, heads, C] (NHD), with K and V side by side in C; how the layers
lie in the buffer is the form:

    LBHNC, LBNHC   layer outermost: each layer's blocks packed
    BLHNC, BLNHC   block outermost: a block's layers together
    BHLNC          block, then head: a head's layers together
    LHBNC          layer, then head: a head's blocks together

The content of a block is a function of (seed, layer, global head, block),
so a reader checks every byte it got from whichever TP rank held it."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

FORMS = ("LBHNC", "BLHNC", "BHLNC", "LHBNC", "LBNHC", "BLNHC")


def family(form: str) -> str:
    return "NHD" if form.endswith("NHC") else "HND"


def make(form: str, layers: int, blocks: int, heads: int, tokens: int, c: int, dtype=np.uint16) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """The buffer, and vLLM's dict of per-layer views of it (layer name -> view), in layer order."""
    shape = {"LBHNC": (layers, blocks, heads, tokens, c), "BLHNC": (blocks, layers, heads, tokens, c),
             "BHLNC": (blocks, heads, layers, tokens, c), "LHBNC": (layers, heads, blocks, tokens, c),
             "LBNHC": (layers, blocks, tokens, heads, c), "BLNHC": (blocks, layers, tokens, heads, c)}[form]
    buf = np.zeros(shape, dtype=dtype)
    return buf, layer_views(form, buf, layers)


def layer_views(form: str, buf, layers: int) -> Dict[str, Any]:
    """vLLM's dict of per-layer views of buf (a numpy array or a torch tensor) in `form`."""
    views = {}
    for l in range(layers):
        if form in ("LBHNC", "LBNHC"):
            v = buf[l]
        elif form in ("BLHNC", "BLNHC"):
            v = buf[:, l]
        elif form == "BHLNC":
            v = buf[:, :, l]
        else:  # LHBNC: [H, B, N, C] of a layer, seen as [B, H, N, C]
            v = buf[l].swapaxes(0, 1)
        views["model.layers.%d.self_attn.attn" % l] = v
    return views


def block_values(seed: int, layer: int, head: int, block: int, tokens: int, c: int, dtype=np.uint16) -> np.ndarray:
    """One head's [tokens, C] of one block of one layer."""
    rng = np.random.default_rng((seed * 1_000_003 + layer * 10_007 + head * 101 + block) & 0xFFFFFFFF)
    return rng.integers(0, 60000, size=(tokens, c)).astype(dtype)


def head_first(rank: int, tp: int, total_heads: int) -> Tuple[int, int]:
    """(first global head, heads) TP rank `rank` of `tp` holds (replicated when fewer heads than ranks)."""
    if total_heads >= tp:
        h = total_heads // tp
        return rank * h, h
    return rank // (tp // total_heads), 1


def fill(form: str, views: Dict[str, np.ndarray], seed: int, rank: int, tp: int, total_heads: int, blocks: List[int]) -> None:
    """What the producer wrote: the given blocks of every layer, this rank's heads."""
    first, n = head_first(rank, tp, total_heads)
    for l, v in enumerate(views.values()):
        for b in blocks:
            for h in range(n):
                vals = block_values(seed, l, first + h, b, v.shape[2] if family(form) == "HND" else v.shape[1], v.shape[3], v.dtype)
                if family(form) == "HND":
                    v[b, h] = vals
                else:
                    v[b, :, h] = vals


def check(form: str, views: Dict[str, np.ndarray], seed: int, rank: int, tp: int, total_heads: int,
          dst: List[int], src: List[int]) -> None:
    """Every byte of the blocks read (local dst from remote src), and blocks not read still zero."""
    first, n = head_first(rank, tp, total_heads)
    for l, v in enumerate(views.values()):
        tokens = v.shape[2] if family(form) == "HND" else v.shape[1]
        for d, s in zip(dst, src):
            for h in range(n):
                got = v[d, h] if family(form) == "HND" else v[d, :, h]
                want = block_values(seed, l, first + h, s, tokens, v.shape[3], v.dtype)
                assert got.tobytes() == want.tobytes(), "%s layer %d, local block %d <- remote block %d, head %d differs" % (
                    form, l, d, s, first + h)
        rest = sorted(set(range(v.shape[0])) - set(dst))
        assert not v[rest].any(), "%s layer %d: a block not read was written" % (form, l)
