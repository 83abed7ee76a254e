"""kvx reading the KV caches vLLM 0.33's own allocator makes
(vllm.v1.worker.utils.allocate_kv_cache), in every layout 0.33 offers
(vllm.v1.kv_cache_layout.KVCacheLayout): LBNHC, its default where the
attention backend declares no layouts (FlashAttention declares none),
LBHNC, the block-outermost BLHNC, BLNHC, BHLNC, and LHBNC.

The caches are planned as an engine plans them: FlashAttention's spec and
supported layouts, resolve_kv_cache_layout with VLLM_KV_CACHE_LAYOUT,
get_kv_cache_groups, get_kv_cache_config_from_groups, then
allocate_kv_cache on the CPU. What kvx gets is the dict vLLM's model runner
hands a connector: layer name -> a view of one shared buffer.

0.33 views every layout as [B, H, N, C] (the layout is in the strides):
kvx registers the dict exactly as handed, by vLLM's name for the layout
and inferred from strides and block_size as KvxConnector does. (The fill
and the checks see the NHD family as [B, N, H, C], vllm_forms' dims: the
same memory, no copy.) kvx reads between layouts of one order inside a
block (head-major: LBHNC, BLHNC, BHLNC, LHBNC; token-major: LBNHC, BLNHC),
whatever lies outside it; across orders add_peer refuses, and a test says
so, except where a rank holds one head (the same bytes in either order).

Owners are prefill TP ranks in processes of their own, kept across cases
(importing vLLM is the slow part); readers are decode TP ranks in this
process, one after another, each reading its heads from every owner that
has some, over UCX (tcp on loopback). Every byte of the reader's buffer is
compared: the blocks read, and everything else still zero."""
import multiprocessing as mp
import os
import traceback

import numpy as np
import pytest
import torch

import kvx
import vllm_forms as F
from vllm.config import CacheConfig, VllmConfig
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
from vllm.v1.attention.backends.utils import get_supported_kv_cache_layouts, resolve_kv_cache_layout
from vllm.v1.core.kv_cache_planning import get_kv_cache_config_from_groups, get_kv_cache_groups
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.worker.utils import allocate_kv_cache, customize_attention_spec

LAYOUTS = ("LBNHC", "LBHNC", "BLHNC", "BLNHC", "BHLNC", "LHBNC")
BS, HD, LAYERS = 32, 16, 3          # block_size (tokens), head_size; C = K|V = 2 * HD
OWNER_NB, READER_NB = 20, 28        # engines of two sizes, as prefill and decode are
SRC = [3, 4, 5, 11, 19, 0]
DST = [9, 1, 2, 17, 27, 12]
LAYER = "model.layers.%d.self_attn.attn"
SPAWN = mp.get_context("spawn")


def vllm_caches(layout, heads, num_blocks, head_sizes=(HD,) * LAYERS):
    """vLLM's dict of per-layer caches for one TP rank holding `heads` KV
    heads, and the layout vLLM resolved (layout None: vLLM's own choice)."""
    old = os.environ.pop("VLLM_KV_CACHE_LAYOUT", None)
    if layout is not None:
        os.environ["VLLM_KV_CACHE_LAYOUT"] = layout  # read when the layout is resolved
    try:
        cfg = VllmConfig(cache_config=CacheConfig(block_size=BS))
        cfg.cache_config.num_gpu_blocks_override = num_blocks
        specs = {LAYER % i: customize_attention_spec(
                     FlashAttentionBackend,
                     FullAttentionSpec(block_size=BS, num_kv_heads=heads, head_size=hs, dtype=torch.float16))
                 for i, hs in enumerate(head_sizes)}
        supported = [m.name for m in get_supported_kv_cache_layouts([FlashAttentionBackend])]
        lay = resolve_kv_cache_layout(cfg, [supported], list(specs.values()))
        groups = get_kv_cache_groups(cfg, specs)
        kv_config = get_kv_cache_config_from_groups(cfg, groups, 1 << 30)
        caches = allocate_kv_cache(kv_config, torch.device("cpu"), lay)
    finally:
        os.environ.pop("VLLM_KV_CACHE_LAYOUT", None)
        if old is not None:
            os.environ["VLLM_KV_CACHE_LAYOUT"] = old
    assert layout is None or lay.name == layout
    return caches, lay


def in_forms_dims(caches, layout):
    """The views in vllm_forms' dims, to fill and check: the NHD family with
    heads and tokens swapped ([B, N, H, C]), the HND family as handed."""
    if F.family(layout) == "NHD":
        return {k: v.transpose(1, 2) for k, v in caches.items()}
    return dict(caches)


def as_u16(views):
    """numpy views of the same memory, as vllm_forms fills and checks them."""
    return {k: v.numpy().view(np.uint16) for k, v in views.items()}


def storage_bytes(t):
    """The whole buffer a view lies in, as bytes (vLLM's one allocation)."""
    st = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(st, 0, (st.nbytes(),), (1,))


def check_every_byte(form, views, seed, rank, tp, heads):
    """vllm_forms' check (which block, layer and head differs), then the
    whole buffer against what it must hold: the blocks read, zero elsewhere."""
    F.check(form, as_u16(views), seed, rank, tp, heads, DST, SRC)
    first, n = F.head_first(rank, tp, heads)
    got = storage_bytes(next(iter(views.values())))
    want = torch.zeros_like(got)
    for l, v in enumerate(views.values()):
        w = want.view(v.dtype).as_strided(v.size(), v.stride(), v.storage_offset()).numpy().view(np.uint16)
        tokens = v.shape[2] if F.family(form) == "HND" else v.shape[1]
        for d, s in zip(DST, SRC):
            for h in range(n):
                vals = F.block_values(seed, l, first + h, s, tokens, v.shape[3])
                if F.family(form) == "HND":
                    w[d, h] = vals
                else:
                    w[d, :, h] = vals
    bad = np.flatnonzero(got.numpy() != want.numpy())
    assert bad.size == 0, "%s: %d bytes of the buffer differ, the first at byte %d of %d" % (
        form, bad.size, bad[0], got.numel())


# --- owners ---------------------------------------------------------------------------


def owner_loop(conn, rank):
    """Prefill TP rank `rank`, for one case after another: vLLM's caches in the
    case's layout, every block filled, registered, metadata sent; held until
    the readers are done."""
    conn.send(("up", os.getpid()))
    while conn.poll(600):  # nothing for that long: the test process is gone
        msg = conn.recv()
        if msg is None:
            return
        layout, tp, heads, seed = msg
        try:
            first, n = F.head_first(rank, tp, heads)
            caches, _ = vllm_caches(layout, n, OWNER_NB)
            views = in_forms_dims(caches, layout)
            F.fill(layout, as_u16(views), seed, rank, tp, heads, list(range(OWNER_NB)))
            with kvx.Context("prefill", tp_rank=rank, tp_size=tp, timeout_ms=10000) as ctx:
                ctx.register_cache(caches, layout=layout, total_heads=heads if heads < tp else None)
                conn.send(("md", ctx.metadata()))
                if not conn.poll(120):
                    return
                conn.recv()
        except Exception:
            conn.send(("error", traceback.format_exc()))


class Owners:
    def __init__(self):
        self.procs = {}

    def start(self, ranks):
        """Ranks not running are started (together: their imports overlap)."""
        new = []
        for r in ranks:
            p, a = self.procs.get(r, (None, None))
            if p is None or not p.is_alive():
                a, b = SPAWN.Pipe()
                p = SPAWN.Process(target=owner_loop, args=(b, r), daemon=True)
                p.start()
                self.procs[r] = (p, a)
                new.append(r)
        for r in new:
            p, a = self.procs[r]
            if not a.poll(180):
                raise RuntimeError("owner rank %d did not start in 180 s (exit code %s)" % (r, p.exitcode))
            a.recv()

    def serve(self, layout, tp, heads, seed):
        """Each owner rank's metadata for one case."""
        self.start(range(tp))
        for r in range(tp):
            self.procs[r][1].send((layout, tp, heads, seed))
        mds, errors = [], []
        for r in range(tp):
            p, a = self.procs[r]
            if not a.poll(60):
                errors.append("owner rank %d: no metadata in 60 s (alive %s)" % (r, p.is_alive()))
                continue
            kind, val = a.recv()
            if kind == "md":
                mds.append(val)
            else:
                errors.append("owner rank %d:\n%s" % (r, val))
        if errors:
            # owners in an unknown state: the next case starts new ones
            self.stop()
            raise RuntimeError("\n".join(errors))
        return mds

    def done(self, tp):
        for r in range(tp):
            try:
                self.procs[r][1].send("done")
            except (OSError, KeyError):
                pass

    def stop(self):
        for p, a in self.procs.values():
            try:
                a.send(None)
            except OSError:
                pass
        for p, a in self.procs.values():
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
        self.procs = {}


@pytest.fixture(scope="module")
def owners():
    o = Owners()
    try:
        o.start([0, 1])
        yield o
    finally:
        o.stop()


# --- tests ------------------------------------------------------------------------------


def test_default_layout_is_lbnhc():
    """Without VLLM_KV_CACHE_LAYOUT, an engine on FlashAttention gets LBNHC."""
    _, lay = vllm_caches(None, 2, 4)
    assert lay.name == "LBNHC"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_registers_as_vllm_hands_it(layout):
    """The dict exactly as allocate_kv_cache returns it, registered under
    vLLM's name for the layout, and inferred as KvxConnector does
    (layout=None, block_size)."""
    caches, _ = vllm_caches(layout, 2, READER_NB)
    assert all(tuple(v.shape) == (READER_NB, 2, BS, 2 * HD) for v in caches.values())  # [B, H, N, C], any layout
    with kvx.Context("decode", backend="local") as ctx:
        for how in (dict(layout=layout), dict(layout=None, block_size=BS)):
            c = ctx.register_cache(caches, **how)
            assert (c.num_layers, c.num_blocks, c.num_heads) == (LAYERS, READER_NB, 2), how


def test_layers_of_two_shapes_are_refused_naming_them():
    """A model whose layers differ in head size: 0.33 plans them as one group
    and hands views of two shapes in one dict. One registration of it is
    refused, naming both shapes and their strides; each shape registers as a
    cache of its own."""
    caches, _ = vllm_caches("LBHNC", 2, 8, head_sizes=(HD, 2 * HD, HD))
    with kvx.Context("decode", backend="local") as ctx:
        with pytest.raises(kvx.ArgumentError, match=r"layer \d is shape \[8, 2, %d, %d\] strides \[\d+, \d+, \d+, 2\].*"
                           r"layer 0 shape \[8, 2, %d, %d\] strides \[\d+, \d+, \d+, 2\].*every layer must match"
                           % (BS, 4 * HD, BS, 2 * HD)):
            ctx.register_cache(caches, layout="LBHNC")
        by_shape = {}
        for name, v in caches.items():
            by_shape.setdefault(tuple(v.shape), {})[name] = v
        assert sorted(len(part) for part in by_shape.values()) == [1, 2]
        for part in by_shape.values():
            ctx.register_cache(part, layout="LBHNC")


def test_orders_apart_are_refused_naming_them():
    """kvx moves blocks as they lie and does not transpose them: a reader
    whose blocks are head-major (LBHNC: what vLLM's CPU attention and
    FlashInfer on Blackwell take) cannot read an owner's token-major blocks
    (LBNHC: FlashAttention's default), nor the other way; add_peer says so."""
    caches = {f: vllm_caches(f, 2, 8)[0] for f in ("LBNHC", "LBHNC")}
    with kvx.Context("nhd", backend="local") as nhd, kvx.Context("hnd", backend="local") as hnd:
        nhd.register_cache(caches["LBNHC"], layout="LBNHC")
        hnd.register_cache(caches["LBHNC"], layout="LBHNC")
        with pytest.raises(kvx.MismatchError, match=r"order NHD, ours \(cache 0\) HND"):
            hnd.add_peer(nhd.metadata())
        with pytest.raises(kvx.MismatchError, match=r"order HND, ours \(cache 0\) NHD"):
            nhd.add_peer(hnd.metadata())


# owner layout, reader layout, owner TP, reader TP, the model's KV heads. Each
# layout is read by itself at TP 1 -> 1, and by another of its order (see
# above) with the TP splits in turn: 1 -> 2, 2 -> 1, 2 -> 4, one head
# replicated on two decode ranks, two heads each replicated on two of four.
SAME_ORDER = {"LBNHC": "BLNHC", "BLNHC": "LBNHC", "LBHNC": "BLHNC", "BLHNC": "BHLNC", "BHLNC": "LHBNC", "LHBNC": "LBHNC"}
SPLITS = [(1, 2, 4), (2, 1, 4), (2, 4, 4), (1, 2, 1), (2, 4, 2)]
CASES = [(L, L, 1, 1, 4) for L in LAYOUTS] + \
        [(L, SAME_ORDER[L]) + SPLITS[i % len(SPLITS)] for i, L in enumerate(LAYOUTS)]


@pytest.mark.parametrize("oform,rform,otp,rtp,heads", CASES,
                         ids=["%s-%s-tp%dto%d-h%d" % c for c in CASES])
def test_read_between_processes(owners, oform, rform, otp, rtp, heads):
    seed = 11 + CASES.index((oform, rform, otp, rtp, heads))
    mds = owners.serve(oform, otp, heads, seed)
    try:
        for r in range(rtp):
            first, n = F.head_first(r, rtp, heads)
            caches, _ = vllm_caches(rform, n, READER_NB)
            views = in_forms_dims(caches, rform)
            with kvx.Context("decode", tp_rank=r, tp_size=rtp, timeout_ms=10000) as ctx:
                cache = ctx.register_cache(caches, layout=None, block_size=BS, total_heads=heads if heads < rtp else None)
                q = ctx.queue()
                took = 0
                for md in mds:
                    peer = ctx.add_peer(md)
                    assert peer.transport.startswith("ucx"), peer.transport
                    _, hn = peer.heads(cache)
                    if hn:
                        q.read(peer, DST, SRC, cache=cache).wait(10000)
                        took += hn
                assert took == n, "decode rank %d of %d got %d heads from its owners, not %d" % (r, rtp, took, n)
            check_every_byte(rform, views, seed, r, rtp, heads)
    finally:
        owners.done(otp)
