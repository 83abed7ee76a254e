#!/usr/bin/env python3
"""kvx_ray_test: kvx_bench's pack/spread transfer test, on a Ray cluster.

The Ray driver. A prefill actor and a decode actor per TP rank, placed by a
placement group (STRICT_PACK: every actor on one node; STRICT_SPREAD:
prefill and decode on two nodes); each registers host caches with kvx
(numpy, HND or NHD); the prefill actors put their metadata into Ray's object
store and the decode actors take it from there; the decode actors read the
requested blocks with kvx (kvx splits heads between TP sizes itself) and
notify the prefill actors, which expect each notification by a lease. Every
byte of every layer, K and V, is compared with the producer's pattern, the
same function of (seed, layer, K/V, block, global head, token, offset) as
kvx_bench's (tests/lib/kvx_host_cache.h), over the same block tables.

    tests/ray/two_nodes.sh --strategy spread --backends UCX --prefill-tp 2 --decode-tp 1 --random-blocks
    tests/ray/two_nodes.sh --suite make-test        # the cases make test runs, on one cluster
    python tests/ray/kvx_ray_test.py --address HOST:PORT ...   # on any Ray cluster

The report is kvx_bench's (configuration, transports, per iteration and in
total bytes, descriptors before and after merging, GB/s, latency p50/p99),
with the node of every actor and the notifications, then TEST PASSED, or
TEST FAILED with the first wrong byte. Exit 0 passed, 1 failed, 2 bad
options or a run that could not start.

Faults (--fault): kill-prefill (ray.kill of prefill rank 0 while decode
ranks read from it: each gets kvx.PeerError or kvx.TimeoutError within its
read deadline, and reads from the other prefill ranks still check),
kill-decode (decode rank 0 killed while reading: the notifications the
prefill ranks expected from it come back expired at the lease, and a new
decode rank 0 reads from the same prefill actors), wrong-rank (the field's
kv_rank mistake, rank N of TP N: refused by kvx at once, on the prefill side
and on the decode side). KVX_RAY_FLIP_BYTE=1 (or --flip-byte) plants a wrong
byte, which must fail the run.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

import kvx

PROG = "kvx_ray_test"
BACKENDS = {"UCX": "ucx", "LIBFABRIC": "ofi"}
FAULTS = ("none", "kill-prefill", "kill-decode", "wrong-rank", "duplicate-rank")
# The environment that puts kvx on a node's own network path (two_nodes.sh sets it per node).
NODE_ENV = ("KVX_HOST_ID", "UCX_TLS", "UCX_NET_DEVICES", "FI_PROVIDER", "FI_TCP_IFACE")
NOTIFY_STRIDE = 1 << 16  # a notify id is request * NOTIFY_STRIDE + decode rank
EXPIRED = kvx.TimeoutError.status
DTYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
M64 = (1 << 64) - 1


@dataclass
class Opts:
    strategy: str = "pack"
    backend: str = "UCX"
    blocks: int = 10
    num_blocks: int = 100
    num_layers: int = 2
    block_tokens: int = 16
    heads: int = 8
    head_dim: int = 128
    dtype_bytes: int = 2
    random_blocks: bool = False
    seed: int = 42
    iters: int = 5
    prefill_tp: int = 1
    decode_tp: int = 1
    layout: str = "HND"
    max_ops: int = 0
    verify: int = 0
    verbose: bool = False
    json: Optional[str] = None
    fault: str = "none"
    lease_ms: int = 30000
    read_timeout_ms: int = 10000
    ray_timeout_s: float = 120.0
    flip_byte: bool = False
    placement: str = ""


# --- the pattern and the block tables (kvx_host_cache.h's, in numpy) -----------


def mix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


_U = np.uint64


def mix_np(x: np.ndarray) -> np.ndarray:
    # uint64 arrays wrap like C's uint64_t
    x = x + _U(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U(30))) * _U(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U(27))) * _U(0x94D049BB133111EB)
    return x ^ (x >> _U(31))


def pattern(seed: int, layer: int, plane: int, blocks: Sequence[int], g0: int, g1: int, tokens: int, hb: int) -> np.ndarray:
    """The bytes of global heads [g0, g1) of the given (remote) blocks:
    [blocks, heads, tokens, hb] uint8, kvx_ex_word and kvx_ex_byte."""
    base = (seed ^ (layer << 40) ^ (plane << 38)) & M64
    h = mix_np(np.asarray(blocks, dtype=np.uint64) ^ _U(base))
    heads = np.arange(g0, g1, dtype=np.uint64) << _U(24)
    toks = np.arange(tokens, dtype=np.uint64)
    w = mix_np(h[:, None, None] ^ heads[None, :, None] ^ toks[None, None, :])
    # byte b of a head's slice is byte (b & 7) of its word plus (b >> 3) * 131
    wb = np.ascontiguousarray(w.astype("<u8")).view(np.uint8).reshape(w.shape + (8,))
    reps = -(-hb // 8)
    add = (((np.arange(hb) >> 3) * 131) & 0xFF).astype(np.uint8)
    return np.tile(wb, (1, 1, 1, reps))[..., :hb] + add


def block_table(n: int, num_blocks: int, random: bool, seed: int, start: int) -> List[int]:
    """kvx_ex_block_table: n distinct ids, random (a seeded partial
    Fisher-Yates) or consecutive from start."""
    if not random:
        return [(start + i) % num_blocks for i in range(n)]
    perm = list(range(num_blocks))
    out: List[int] = []
    s = seed & M64
    for i in range(min(n, num_blocks)):
        s = mix(s)
        j = i + s % (num_blocks - i)
        perm[i], perm[j] = perm[j], perm[i]
        out.append(perm[i])
    return out


def tables(o: Opts, it: int) -> Tuple[List[int], List[int]]:
    """kvx_bench's block tables of iteration it: remote (prefill) ids, local (decode) ids."""
    s = (o.seed * 1000003 + ((it * 2) & 0xFFFFFFFF)) & M64
    src = block_table(o.blocks, o.num_blocks, o.random_blocks, s, ((it * o.blocks) & 0xFFFFFFFF) % o.num_blocks)
    dst = block_table(o.blocks, o.num_blocks, o.random_blocks, (s + 1) & M64, ((it * o.blocks + 7) & 0xFFFFFFFF) % o.num_blocks)
    return src, dst


def rank_heads(total: int, rank: int, tp: int) -> Tuple[int, int]:
    """(first global head, count) TP rank `rank` of `tp` holds; replicated
    (one whole head each) when the model has fewer heads than ranks."""
    if total >= tp:
        return rank * (total // tp), total // tp
    return rank // (tp // total), 1


class HostCache:
    """One rank's KV cache: one numpy array per layer in vLLM's layout,
    [2, num_blocks, heads, tokens, head_dim] (HND) or [2, num_blocks,
    tokens, heads, head_dim] (NHD), untouched pages free until written."""

    def __init__(self, o: Opts, rank: int, tp: int) -> None:
        self.o = o
        self.head_first, self.num_heads = rank_heads(o.heads, rank, tp)
        self.hb = o.head_dim * o.dtype_bytes
        T, H, D = o.block_tokens, self.num_heads, o.head_dim
        shape = (2, o.num_blocks, H, T, D) if o.layout == "HND" else (2, o.num_blocks, T, H, D)
        self.layers = [np.zeros(shape, dtype=DTYPES[o.dtype_bytes]) for _ in range(o.num_layers)]
        self.u8 = [a.view(np.uint8) for a in self.layers]  # [..., head_dim * dtype_bytes]

    def _heads(self, layer: int, plane: int, blocks: Sequence[int], a: int, b: int) -> np.ndarray:
        """Local heads [a, b) of the blocks as [blocks, heads, tokens, hb] (a view for NHD)."""
        x = self.u8[layer][plane, np.asarray(blocks, dtype=np.intp)]
        return x[:, a:b] if self.o.layout == "HND" else x[:, :, a:b].transpose(0, 2, 1, 3)

    def stamp(self, local: Sequence[int], remote: Sequence[int], g0: int, g1: int, flip: int) -> None:
        """Global heads [g0, g1) of the local blocks := the pattern of the remote blocks, xor flip."""
        a, b = g0 - self.head_first, g1 - self.head_first
        idx = np.asarray(local, dtype=np.intp)
        for layer in range(self.o.num_layers):
            for plane in range(2):
                p = pattern(self.o.seed, layer, plane, remote, g0, g1, self.o.block_tokens, self.hb) ^ np.uint8(flip)
                if self.o.layout == "HND":
                    self.u8[layer][plane, idx, a:b] = p
                else:
                    self.u8[layer][plane, idx, :, a:b] = p.transpose(0, 2, 1, 3)

    def offset(self, h: int, t: int) -> int:
        """kvx_ex_offset: byte offset in a block of local head h, token t."""
        if self.o.layout == "HND":
            return (h * self.o.block_tokens + t) * self.hb
        return (t * self.num_heads + h) * self.hb

    def check(self, local: Sequence[int], remote: Sequence[int], g0: int, g1: int) -> Tuple[int, Optional[Dict[str, int]]]:
        """Every byte of global heads [g0, g1) of the read blocks: the count of
        wrong bytes and the first (in kvx_ex_verify's order: block, layer,
        K/V, head, token, byte)."""
        a = g0 - self.head_first
        bad, first, key = 0, None, None
        for layer in range(self.o.num_layers):
            for plane in range(2):
                got = self._heads(layer, plane, local, a, g1 - self.head_first)
                want = pattern(self.o.seed, layer, plane, remote, g0, g1, self.o.block_tokens, self.hb)
                ne = got != want
                n = int(np.count_nonzero(ne))
                if not n:
                    continue
                bad += n
                i, h, t, b = (int(v) for v in np.unravel_index(int(np.argmax(ne)), ne.shape))
                k = (i, layer, plane, h, t, b)
                if key is None or k < key:
                    key = k
                    first = {"layer": layer, "plane": plane, "local_block": int(local[i]), "remote_block": int(remote[i]),
                             "head": g0 + h, "token": t, "offset": self.offset(a + h, t) + b,
                             "expected": int(want[i, h, t, b]), "found": int(got[i, h, t, b])}
        return bad, first

    def flip(self, block: int, h: int) -> None:
        """kvx_bench's planted wrong byte: last layer, V, token 0 of local head h, byte 3."""
        flat = self.u8[-1][1, block].reshape(-1)
        flat[self.offset(h, 0) + 3] ^= 0x40


def node_info() -> Dict[str, Any]:
    return {"ip": ray.util.get_node_ip_address(), "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
            "env": {k: os.environ.get(k, "") for k in NODE_ENV}}


def kvx_error(e: BaseException) -> Dict[str, str]:
    return {"class": "kvx." + type(e).__name__ if isinstance(e, kvx.Error) else type(e).__name__, "text": str(e)}


def open_context(o: Opts, role: str, claimed: int, tp: int, progress_thread: bool,
                 info: Dict[str, Any]) -> Optional[kvx.Context]:
    """A rank's context; None with info["refused"] (kvx's error and how long it
    took) where kvx refuses it. kvx checks the rank first: a wrong one never
    gets to the network."""
    kvx._load()  # the library's load is not part of the time below
    t0 = time.perf_counter()
    try:
        return kvx.Context(role, tp_rank=claimed, tp_size=tp, backend=BACKENDS[o.backend],
                           progress_thread=progress_thread, timeout_ms=o.read_timeout_ms)
    except kvx.Error as e:
        info["refused"] = dict(kvx_error(e), seconds=time.perf_counter() - t0)
        return None


# --- the actors --------------------------------------------------------------------


class RankActor:
    """What both roles' actors hold: the options, the TP rank, the rank the
    context claims (another one where a test sets a wrong rank), the context."""

    def __init__(self, o: Dict[str, Any], rank: int, claimed_rank: int) -> None:
        self.o = Opts(**o)
        self.rank, self.claimed = rank, claimed_rank
        self.ctx: Optional[kvx.Context] = None

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None


class PrefillRank(RankActor):
    """One prefill TP rank: fills the blocks every iteration reads, registers
    them, serves reads from kvx's progress thread, expects notifications."""

    def __init__(self, o: Dict[str, Any], rank: int, claimed_rank: int) -> None:
        super().__init__(o, rank, claimed_rank)
        self.notes: List[Dict[str, Any]] = []
        self.expected_at: Dict[int, float] = {}

    def setup(self) -> Dict[str, Any]:
        o = self.o
        info = node_info()
        self.ctx = open_context(o, "prefill", self.claimed, o.prefill_tp, True, info)
        if self.ctx is None:
            return info
        self.cache = HostCache(o, self.rank, o.prefill_tp)
        filled: List[int] = []
        for it in range(o.iters):  # only the blocks that will be read
            src, _ = tables(o, it)
            filled += src
        filled = sorted(set(filled))
        self.cache.stamp(filled, filled, self.cache.head_first, self.cache.head_first + self.cache.num_heads, 0)
        c = self.ctx.register_cache(self.cache.layers, layout=o.layout, total_heads=o.heads, checksums=o.verify != 0)
        if o.verify:
            c.seal(filled)  # the producer seals what it wrote
        info["heads"] = (self.cache.head_first, self.cache.num_heads)
        info["metadata"] = [ray.put(self.ctx.metadata())]  # a reference: the bytes stay in the object store
        return info

    def expect(self, ids: List[int], lease_ms: int) -> float:
        assert self.ctx is not None
        now = time.time()
        for i in ids:
            self.ctx.expect(i, lease_ms)
            self.expected_at[i] = now
        return now

    def collect(self, ids: List[int], timeout_s: float) -> List[Dict[str, Any]]:
        """Every notification so far, once each of ids has one (or timeout_s passed)."""
        assert self.ctx is not None
        deadline = time.monotonic() + timeout_s
        want = set(ids)
        while True:
            for n in self.ctx.notifications():
                self.notes.append({"id": n.id, "status": n.status, "reader_rank": n.reader_rank, "t": time.time(),
                                   "after_s": time.time() - self.expected_at.get(n.id, time.time())})
            if want <= {n["id"] for n in self.notes} or time.monotonic() >= deadline:
                return list(self.notes)
            time.sleep(0.01)


class DecodeRank(RankActor):
    """One decode TP rank: adds every prefill rank as a peer, reads from the
    ranks that hold its heads, checks every byte."""

    def __init__(self, o: Dict[str, Any], rank: int, claimed_rank: int) -> None:
        super().__init__(o, rank, claimed_rank)
        self._rounds = 0

    def setup(self, md_refs: List[Any]) -> Dict[str, Any]:
        o = self.o
        info = node_info()
        # no progress thread: waits progress, as kvx_bench's decode ranks do
        self.ctx = open_context(o, "decode", self.claimed, o.decode_tp, False, info)
        if self.ctx is None:
            return info
        self.cache = HostCache(o, self.rank, o.decode_tp)
        self.kcache = self.ctx.register_cache(self.cache.layers, layout=o.layout, total_heads=o.heads, checksums=o.verify != 0)
        self.q = self.ctx.queue(max_ops=o.max_ops)
        mds = ray.get(md_refs, timeout=o.ray_timeout_s)
        self.sources: List[Tuple[kvx.Peer, int, int]] = []
        peers = []
        for md in mds:
            p = self.ctx.add_peer(md)
            first, count = p.heads(self.kcache)
            peers.append({"rank": p.rank, "transport": p.transport, "heads": (first, count)})
            if count:  # not a source of any of this rank's heads otherwise
                self.sources.append((p, first, first + count))
        # every head of this rank must come from exactly one prefill rank
        have = sorted((a, b) for _, a, b in self.sources)
        h0, h1 = self.cache.head_first, self.cache.head_first + self.cache.num_heads
        at = h0
        for a, b in have:
            at = b if a == at else -1  # a gap or an overlap
        if at != h1:
            raise RuntimeError("decode rank %d holds heads [%d, %d) and the prefill peers give %s" % (self.rank, h0, h1, have))
        info["heads"] = (h0, self.cache.num_heads)
        info["peers"] = peers
        info["sources"] = [{"rank": p.rank, "heads": (a, b), "transport": p.transport} for p, a, b in self.sources]
        return info

    def _read(self, sources: List[Tuple[kvx.Peer, int, int]], it: int, nid: Optional[int]) -> Dict[str, Any]:
        """One request's reads from each source, timed from the first post to
        the last completion; the first failure, in words."""
        o = self.o
        assert self.ctx is not None
        src, dst = tables(o, it % o.iters)
        r: Dict[str, Any] = {"error": None}
        s0 = self.ctx.stats()
        t0 = time.perf_counter()
        tickets = []
        for p, _, _ in sources:
            try:
                tickets.append((p, self.q.read(p, dst, src, cache=self.kcache, notify_id=nid, tag=it, timeout_ms=o.read_timeout_ms,
                                               verify=o.verify)))
            except kvx.Error as e:
                r["error"] = r["error"] or dict(kvx_error(e), peer=p.rank, at="post", t=time.time())
        for p, t in tickets:
            try:
                t.wait(timeout_ms=o.read_timeout_ms + 5000)  # kvx ends the read at its own deadline; this is a backstop
            except kvx.Error as e:
                r["error"] = r["error"] or dict(kvx_error(e), peer=p.rank, at="read", t=time.time())
        r["seconds"] = time.perf_counter() - t0
        s1 = self.ctx.stats()
        r["bytes"] = s1["bytes_read"] - s0["bytes_read"]
        r["descs_before"] = s1["blocks_posted"] - s0["blocks_posted"]
        r["descs_after"] = s1["descs_posted"] - s0["descs_posted"]
        return r

    def run_iter(self, it: int, nid: Optional[int]) -> Dict[str, Any]:
        """kvx_bench's iteration: poison the destination heads, read, check every byte."""
        o = self.o
        src, dst = tables(o, it % o.iters)
        for _, a, b in self.sources:
            self.cache.stamp(dst, src, a, b, 0xFF)  # an unwritten byte cannot pass
        r = self._read(self.sources, it, nid)
        if o.flip_byte and self.sources and it == o.iters - 1:
            self.cache.flip(dst[-1], self.sources[0][1] - self.cache.head_first)
        r["bad"], r["mismatch"] = 0, None
        for p, a, b in self.sources:
            bad, mm = self.cache.check(dst, src, a, b)
            if bad and not r["bad"]:
                r["mismatch"] = dict(mm or {}, prefill_rank=p.rank)
            r["bad"] += bad
        return r

    def read_loop(self, max_s: float) -> Dict[str, Any]:
        """Reads round after round from every source until one fails (or
        max_s); then one more round from the others, every byte checked."""
        o = self.o
        end = time.monotonic() + max_s
        failed: Optional[Dict[str, Any]] = None
        it = 0
        while time.monotonic() < end and failed is None:
            failed = self._read(self.sources, it, None)["error"]
            self._rounds += 1
            it += 1
        out: Dict[str, Any] = {"rounds": self._rounds, "error": failed}
        rest = [s for s in self.sources if failed is None or s[0].rank != failed["peer"]]
        if failed is not None and rest:
            src, dst = tables(o, 0)
            for _, a, b in rest:
                self.cache.stamp(dst, src, a, b, 0xFF)
            r = self._read(rest, 0, None)
            bad = sum(self.cache.check(dst, src, a, b)[0] for _, a, b in rest)
            out["others"] = {"ranks": [p.rank for p, _, _ in rest], "error": r["error"], "bad": bad, "bytes": r["bytes"]}
        return out

    def rounds(self) -> int:
        return self._rounds


# --- the driver ------------------------------------------------------------------


_ACTOR_CLASSES: Dict[type, Any] = {}


class RunFailed(Exception):
    """The run could not go on: TEST FAILED (code 1) or could not start (2)."""

    def __init__(self, text: str, code: int = 1) -> None:
        super().__init__(text)
        self.code = code


def say(*parts: Any) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def nid_of(req: int, decode_rank: int) -> int:
    return req * NOTIFY_STRIDE + decode_rank


def get(refs: Any, o: Opts, what: str, timeout_s: Optional[float] = None) -> Any:
    """ray.get with a deadline; an actor's exception or death, or the
    deadline, in one line that says what was waited for."""
    t = o.ray_timeout_s if timeout_s is None else timeout_s
    try:
        return ray.get(refs, timeout=t)
    except ray.exceptions.GetTimeoutError:
        raise RunFailed("%s: no answer within %.0f s" % (what, t), 2)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if getattr(e, "cause", None) is not None else e
        raise RunFailed("%s: %s: %s" % (what, type(cause).__name__, str(cause).strip().splitlines()[-1]), 2)
    except ray.exceptions.RayActorError as e:
        raise RunFailed("%s: the actor died: %s" % (what, str(e).strip().splitlines()[0]), 2)


class Run:
    """One configuration on the cluster: placement, actors, iterations, the fault."""

    def __init__(self, o: Opts) -> None:
        self.o = o
        self.pg: Optional[PlacementGroup] = None
        self.prefill: List[Any] = []
        self.decode: List[Any] = []
        self.extra: List[Any] = []  # actors started for a fault case
        self.pinfo: List[Dict[str, Any]] = []
        self.dinfo: List[Dict[str, Any]] = []
        self.expected: Dict[int, Dict[int, int]] = {}  # prefill rank -> notify id -> decode rank

    # -- placement and actors
    def place(self) -> None:
        o = self.o
        strategy = o.placement or ("STRICT_PACK" if o.strategy == "pack" else "STRICT_SPREAD")
        # bundle 0 holds the prefill actors, bundle 1 the decode actors (and any replacement)
        self.pg = placement_group([{"CPU": o.prefill_tp}, {"CPU": o.decode_tp + 1}], strategy=strategy)
        try:
            ray.get(self.pg.ready(), timeout=o.ray_timeout_s)
        except ray.exceptions.GetTimeoutError:
            nodes = [n for n in ray.nodes() if n["Alive"]]
            raise RunFailed("the placement group (%s, %d and %d CPUs) was not placed within %.0f s; the cluster has %d node(s): %s"
                            % (strategy, o.prefill_tp, o.decode_tp + 1, o.ray_timeout_s, len(nodes),
                               ", ".join("%s with %s CPUs" % (n["NodeManagerAddress"], n["Resources"].get("CPU", 0)) for n in nodes)), 2)
        say("  ray: placement group %s, %d nodes alive" % (strategy, len([n for n in ray.nodes() if n["Alive"]])))

    def actor(self, cls: type, bundle: int, rank: int, claimed: int) -> Any:
        o = self.o
        assert self.pg is not None
        strat = PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=bundle)
        if cls not in _ACTOR_CLASSES:  # exported to the cluster once
            _ACTOR_CLASSES[cls] = ray.remote(cls)
        # decode actors answer rounds() while read_loop runs
        conc = 2 if cls is DecodeRank else 1
        return _ACTOR_CLASSES[cls].options(num_cpus=1, max_concurrency=conc, scheduling_strategy=strat,
                                           max_restarts=0).remote(asdict(o), rank, claimed)

    def start_prefill(self, claimed: Optional[List[int]] = None) -> List[Dict[str, Any]]:
        o = self.o
        claimed = claimed or list(range(o.prefill_tp))
        self.prefill = [self.actor(PrefillRank, 0, r, claimed[r]) for r in range(o.prefill_tp)]
        return list(get([a.setup.remote() for a in self.prefill], o, "prefill actors' setup"))

    def start_decode(self, claimed: Optional[List[int]] = None) -> List[Dict[str, Any]]:
        o = self.o
        claimed = claimed or list(range(o.decode_tp))
        self.decode = [self.actor(DecodeRank, 1, r, claimed[r]) for r in range(o.decode_tp)]
        md = [i["metadata"][0] for i in self.pinfo]
        return list(get([a.setup.remote(md) for a in self.decode], o, "decode actors' setup"))

    def node_line(self, side: str, rank: int, info: Dict[str, Any]) -> str:
        env = info["env"]
        net = env["UCX_NET_DEVICES"] if self.o.backend == "UCX" else env["FI_TCP_IFACE"]
        return "  %s rank %d: node %s, pid %d, KVX_HOST_ID %s, %s %s" % (
            side, rank, info["ip"], info["pid"], env["KVX_HOST_ID"] or "(unset)",
            "UCX_NET_DEVICES" if self.o.backend == "UCX" else "FI_TCP_IFACE", net or "(unset)")

    def check_placement(self) -> None:
        """The nodes the actors ran on are what the strategy asked for."""
        pn = {i["node_id"] for i in self.pinfo}
        dn = {i["node_id"] for i in self.dinfo}
        pip = sorted({i["ip"] for i in self.pinfo})
        dip = sorted({i["ip"] for i in self.dinfo})
        if self.o.strategy == "pack" and len(pn | dn) != 1:
            raise RunFailed("pack placed the actors on several nodes: prefill %s, decode %s" % (pip, dip))
        if self.o.strategy == "spread" and pn & dn:
            raise RunFailed("spread placed prefill and decode actors on the same node: prefill %s, decode %s" % (pip, dip))

    def setup(self) -> None:
        o = self.o
        self.place()
        self.pinfo = self.start_prefill()
        for r, i in enumerate(self.pinfo):
            if "refused" in i:
                raise RunFailed("prefill rank %d: %s: %s" % (r, i["refused"]["class"], i["refused"]["text"]), 2)
        self.dinfo = self.start_decode()
        for r, i in enumerate(self.dinfo):
            if "refused" in i:
                raise RunFailed("decode rank %d: %s: %s" % (r, i["refused"]["class"], i["refused"]["text"]), 2)
        for r, i in enumerate(self.pinfo):
            say(self.node_line("prefill", r, i))
        for r, i in enumerate(self.dinfo):
            say(self.node_line("decode", r, i))
        self.check_placement()
        for r, i in enumerate(self.dinfo):
            for s in i["sources"]:
                say("  decode rank %d <- prefill rank %d: heads [%d, %d), transport %s" % (r, s["rank"], s["heads"][0], s["heads"][1], s["transport"]))
        self.readers = {p: [d for d, i in enumerate(self.dinfo) if any(s["rank"] == p for s in i["sources"])] for p in range(o.prefill_tp)}

    # -- notifications
    def expect(self, req: int, lease_ms: int, decode_ranks: Optional[List[int]] = None) -> Dict[int, float]:
        """Each prefill rank expects the notification of request req from every decode rank that reads from it."""
        calls = {}
        for p, readers in self.readers.items():
            ds = [d for d in readers if decode_ranks is None or d in decode_ranks]
            if not ds:
                continue
            ids = [nid_of(req, d) for d in ds]
            self.expected.setdefault(p, {}).update({nid_of(req, d): d for d in ds})
            calls[p] = self.prefill[p].expect.remote(ids, lease_ms)
        got = get(list(calls.values()), self.o, "expect")
        return dict(zip(calls.keys(), got))

    def collect(self, timeout_s: float, ranks: Optional[List[int]] = None) -> Dict[int, List[Dict[str, Any]]]:
        ranks = [p for p in self.expected if ranks is None or p in ranks]
        refs = [self.prefill[p].collect.remote(list(self.expected[p]), timeout_s) for p in ranks]
        return dict(zip(ranks, get(refs, self.o, "the prefill ranks' notifications", timeout_s + self.o.ray_timeout_s)))

    # -- the transfer test
    def iterations(self) -> Tuple[int, List[str]]:
        """kvx_bench's iterations; the total bytes, and what failed."""
        o = self.o
        lat: List[float] = []
        total_bytes = total_before = total_after = bad = 0
        total_s = 0.0
        failures: List[str] = []
        reports: List[List[Dict[str, Any]]] = []
        for it in range(o.iters):
            self.expect(it, o.lease_ms)
            reps = get([d.run_iter.remote(it, nid_of(it, r)) for r, d in enumerate(self.decode)], o, "iteration %d" % it,
                       o.read_timeout_ms / 1000 + o.ray_timeout_s)
            reports.append(reps)
            nbytes = sum(r["bytes"] for r in reps)
            worst = max(r["seconds"] for r in reps)
            for k, r in enumerate(reps):
                if r["error"] and not any(f.startswith("a read failed") for f in failures):
                    say("%s: decode rank %d, iteration %d: prefill rank %d: %s: %s" % (PROG, k, it, r["error"]["peer"], r["error"]["class"], r["error"]["text"]))
                    failures.append("a read failed (see above)")
                if r["bad"] and not bad:
                    m = r["mismatch"]
                    failures.insert(0, "decode rank %d, iteration %d: %d wrong bytes; first: prefill rank %d, layer %d, %s, block %d (local %d), head %d, token %d, "
                                    "offset %d: expected 0x%02x, found 0x%02x" % (k, it, r["bad"], m["prefill_rank"], m["layer"], "KV"[m["plane"]],
                                                                                   m["remote_block"], m["local_block"], m["head"], m["token"], m["offset"],
                                                                                   m["expected"], m["found"]))
                    say("TEST FAILED: " + failures[0])
                bad += r["bad"]
            before = sum(r["descs_before"] for r in reps)
            after = sum(r["descs_after"] for r in reps)
            say("  iter %d: %d bytes, %d descriptors -> %d after merging, %.3f ms, %.3f GB/s" % (
                it, nbytes, before, after, worst * 1e3, nbytes / worst / 1e9 if worst > 0 else 0.0))
            lat.append(worst)
            total_bytes += nbytes
            total_before += before
            total_after += after
            total_s += worst
        lat.sort()
        p50, p99 = lat[(o.iters - 1) // 2], lat[int((o.iters - 1) * 0.99 + 0.5)]
        gbps = total_bytes / total_s / 1e9 if total_s > 0 else 0.0
        say("  total: %d bytes, %d descriptors -> %d after merging, %.3f GB/s, request latency p50 %.3f ms, p99 %.3f ms" % (
            total_bytes, total_before, total_after, gbps, p50 * 1e3, p99 * 1e3))
        failures += self.check_notifications(list(range(o.iters)))
        if o.json:
            self.write_json(reports, total_bytes, total_before, total_after, gbps, p50, p99, bad, not failures)
        return total_bytes, failures

    def check_notifications(self, reqs: List[int]) -> List[str]:
        """Every expected notification of these requests came once, from its reader, none expired."""
        notes = self.collect(10.0)
        n_want = n_ok = 0
        bad: List[str] = []
        for p, want in self.expected.items():
            seen: Dict[int, List[Dict[str, Any]]] = {}
            for n in notes.get(p, []):
                seen.setdefault(n["id"], []).append(n)
            for nid, d in want.items():
                if nid // NOTIFY_STRIDE not in reqs:
                    continue
                n_want += 1
                got = seen.get(nid, [])
                if len(got) == 1 and got[0]["status"] == 0 and got[0]["reader_rank"] == d:
                    n_ok += 1
                elif not bad:
                    bad.append("notifications: prefill rank %d, request %d from decode rank %d: %s" % (
                        p, nid // NOTIFY_STRIDE, d, "none came" if not got else ", ".join(
                            "%s (reader rank %d)" % ("expired" if g["status"] == EXPIRED else "status %d" % g["status"] if g["status"] else "done",
                                                     g["reader_rank"]) for g in got)))
        say("  notifications: %d of %d at the prefill ranks, each once from its reader, none expired" % (n_ok, n_want)
            if not bad else "  notifications: %d of %d as expected; %s" % (n_ok, n_want, bad[0]))
        return bad

    def write_json(self, reports: List[List[Dict[str, Any]]], total: int, before: int, after: int, gbps: float, p50: float, p99: float,
                   bad: int, passed: bool) -> None:
        o = self.o
        dl = rank_heads(o.heads, 0, o.decode_tp)[1]
        doc = {"strategy": o.strategy, "backend": o.backend, "prefill_tp": o.prefill_tp, "decode_tp": o.decode_tp, "layout": o.layout,
               "num_layers": o.num_layers, "num_blocks": o.num_blocks, "block_tokens": o.block_tokens, "heads": o.heads,
               "head_dim": o.head_dim, "dtype_bytes": o.dtype_bytes, "blocks": o.blocks, "random_blocks": o.random_blocks,
               "iters": o.iters, "seed": o.seed, "block_bytes": o.block_tokens * dl * o.head_dim * o.dtype_bytes,
               "transports": [{"decode_rank": d, "prefill_rank": s["rank"], "transport": s["transport"]}
                              for d, i in enumerate(self.dinfo) for s in i["sources"]],
               "nodes": {"prefill": [i["ip"] for i in self.pinfo], "decode": [i["ip"] for i in self.dinfo]},
               "iterations": [{"bytes": sum(r["bytes"] for r in reps), "descs_before": sum(r["descs_before"] for r in reps),
                               "descs_after": sum(r["descs_after"] for r in reps), "seconds": max(r["seconds"] for r in reps),
                               "gbps": sum(r["bytes"] for r in reps) / max(r["seconds"] for r in reps) / 1e9} for reps in reports],
               "total_bytes": total, "descs_before": before, "descs_after": after, "gbps": gbps, "latency_p50_ms": p50 * 1e3,
               "latency_p99_ms": p99 * 1e3, "wrong_bytes": bad, "passed": passed}
        assert o.json
        with open(o.json, "a") as f:  # main() empties it: one object per backend, one per line
            json.dump(doc, f)
            f.write("\n")

    # -- faults
    def wait_rounds(self, actors: List[Any], what: str) -> List[int]:
        """Until each actor's read loop has finished a round: reads are flowing."""
        deadline = time.monotonic() + self.o.ray_timeout_s
        while True:
            n = get([a.rounds.remote() for a in actors], self.o, what)
            if min(n) >= 1:
                return list(n)
            if time.monotonic() > deadline:
                raise RunFailed("%s: no read round finished within %.0f s" % (what, self.o.ray_timeout_s), 2)
            time.sleep(0.02)

    def kill_prefill(self) -> str:
        """ray.kill of prefill rank 0 while its readers read: each gets a peer
        error (or a timeout) within its read deadline."""
        o = self.o
        victims = self.readers[0]
        if not victims:
            raise RunFailed("kill-prefill: no decode rank reads from prefill rank 0 in this configuration", 2)
        loops = {d: self.decode[d].read_loop.remote(o.read_timeout_ms / 1000 + 30) for d in victims}
        n = self.wait_rounds([self.decode[d] for d in victims], "the decode ranks' read loops")
        t_kill = time.time()
        ray.kill(self.prefill[0], no_restart=True)
        say("  fault: prefill rank 0 killed (ray.kill) while decode ranks %s read from it, %s rounds of reads in; read deadline %d ms"
            % (victims, n, o.read_timeout_ms))
        out = get(list(loops.values()), o, "the read loops after the kill", o.read_timeout_ms / 1000 + 30 + o.ray_timeout_s)
        fails = []
        for d, r in zip(loops, out):
            e = r["error"]
            if e is None:
                fails.append("decode rank %d: no error in %d rounds after prefill rank 0 was killed" % (d, r["rounds"]))
                continue
            dt = e["t"] - t_kill
            kind = {"kvx.PeerError": "peer error", "kvx.TimeoutError": "timeout"}.get(e["class"], "unexpected error")
            say("  decode rank %d: %s from prefill rank %d %.3f s after the kill, at %s: %s: %s" % (d, kind, e["peer"], dt, e["at"], e["class"], e["text"]))
            if kind == "unexpected error" or e["peer"] != 0:
                fails.append("decode rank %d: %s: %s, not a peer error or timeout from prefill rank 0" % (d, e["class"], e["text"]))
            elif dt > o.read_timeout_ms / 1000 + 2:
                fails.append("decode rank %d: the %s came %.1f s after the kill, past the %d ms deadline" % (d, kind, dt, o.read_timeout_ms))
            if "others" in r:
                x = r["others"]
                say("  decode rank %d: then read %d bytes from prefill ranks %s: %s" % (d, x["bytes"], x["ranks"],
                    "every byte checked" if not x["error"] and not x["bad"] else "%s, %d wrong bytes" % (x["error"], x["bad"])))
                if x["error"] or x["bad"]:
                    fails.append("decode rank %d: reads from the surviving prefill ranks failed" % d)
        alive = get([d.rounds.remote() for d in self.decode], o, "the decode ranks after the kill")
        say("  decode ranks %s still answer" % list(range(len(alive))))
        if fails:
            raise RunFailed("kill-prefill: " + "; ".join(fails))
        return "kill-prefill: each reader of the killed prefill rank got a peer error within its deadline"

    def kill_decode(self) -> str:
        """Decode rank 0 killed while reading: what the prefill ranks
        expected from it expires at the lease; a new decode rank 0 reads."""
        o = self.o
        req = o.iters
        lease_s = o.lease_ms / 1000
        owners = [p for p, rs in self.readers.items() if 0 in rs]
        self.expect(req, o.lease_ms)
        loop = self.decode[0].read_loop.remote(lease_s + 30)  # reads without notify ids, until killed
        n = self.wait_rounds([self.decode[0]], "decode rank 0's read loop")
        ray.kill(self.decode[0], no_restart=True)
        say("  fault: decode rank 0 killed (ray.kill) while reading from prefill ranks %s, %d rounds of reads in; each expects its notification within %d ms"
            % (owners, n[0], o.lease_ms))
        fails: List[str] = []
        if o.decode_tp > 1:  # the others read request req and notify
            reps = get([d.run_iter.remote(req, nid_of(req, r)) for r, d in enumerate(self.decode) if r > 0], o, "the other decode ranks",
                       o.read_timeout_ms / 1000 + o.ray_timeout_s)
            if any(r["error"] or r["bad"] for r in reps):
                fails.append("the other decode ranks' reads failed: %s" % [r["error"] or "%d wrong bytes" % r["bad"] for r in reps])
        notes = self.collect(lease_s + 10)
        for p in self.expected:
            for nid, d in self.expected[p].items():
                if nid // NOTIFY_STRIDE != req:
                    continue
                got = [x for x in notes.get(p, []) if x["id"] == nid]
                say("  prefill rank %d: request %d from decode rank %d: %s" % (p, req, d, ", ".join(
                    "%s %.3f s after expect" % ("expired" if g["status"] == EXPIRED else "status %d" % g["status"] if g["status"] else "done", g["after_s"])
                    for g in got) or "nothing"))
                if d == 0:
                    ok = len(got) == 1 and got[0]["status"] == EXPIRED and lease_s - 0.05 <= got[0]["after_s"] <= lease_s + 3
                    if not ok:
                        fails.append("prefill rank %d: the notification expected from the killed decode rank did not expire once at the lease" % p)
                elif not (len(got) == 1 and got[0]["status"] == 0 and got[0]["reader_rank"] == d):
                    fails.append("prefill rank %d: request %d from decode rank %d: %s" % (p, req, d, got or "nothing"))
        try:
            ray.get(loop, timeout=5)
        except Exception:
            pass  # it died with its actor
        # the prefill ranks still serve: a new decode rank 0, every byte checked, notified
        new = self.actor(DecodeRank, 1, 0, 0)
        self.extra.append(new)
        info = get(new.setup.remote([i["metadata"][0] for i in self.pinfo]), o, "the new decode rank 0's setup")
        if "refused" in info:
            raise RunFailed("the new decode rank 0: %s" % info["refused"]["text"], 2)
        self.decode[0] = new
        self.expect(req + 1, o.lease_ms, [0])
        r = get(new.run_iter.remote(req + 1, nid_of(req + 1, 0)), o, "the new decode rank 0's read", o.read_timeout_ms / 1000 + o.ray_timeout_s)
        after = self.check_notifications([req + 1])
        say("  a new decode rank 0 on node %s read %d bytes: %s" % (info["ip"], r["bytes"],
            "every byte checked" if not r["error"] and not r["bad"] else "%s, %d wrong bytes" % (r["error"], r["bad"])))
        if r["error"] or r["bad"] or after:
            fails.append("the new decode rank 0 could not read from the prefill ranks")
        if fails:
            raise RunFailed("kill-decode: " + "; ".join(fails))
        return "kill-decode: the killed reader's notifications expired at the lease, and a new reader read"

    def wrong_rank(self) -> str:
        """The field's kv_rank mistake (rank N of TP N), on each side:
        kvx refuses it when the context is made, before any network."""
        o = self.o
        fails: List[str] = []
        self.place()
        # the prefill side: the last rank claims rank prefill_tp
        pc = list(range(o.prefill_tp))
        pc[-1] = o.prefill_tp
        t0 = time.monotonic()
        self.pinfo = self.start_prefill(pc)
        dt = time.monotonic() - t0
        fails += self.refusal("prefill", self.pinfo, pc, o.prefill_tp, dt)
        # the decode side, against prefill ranks set right
        for a in self.prefill:
            ray.kill(a, no_restart=True)
        self.pinfo = self.start_prefill()
        if any("refused" in i for i in self.pinfo):
            raise RunFailed("prefill ranks set right were refused: %s" % [i.get("refused") for i in self.pinfo], 2)
        dc = list(range(o.decode_tp))
        dc[-1] = o.decode_tp
        t0 = time.monotonic()
        self.dinfo = self.start_decode(dc)
        dt = time.monotonic() - t0
        fails += self.refusal("decode", self.dinfo, dc, o.decode_tp, dt)
        if fails:
            raise RunFailed("wrong-rank: " + "; ".join(fails))
        return "wrong-rank: refused at once with its reason, on the prefill side and on the decode side"

    def duplicate_rank(self) -> str:
        """The last prefill rank claims rank 0, which rank 0 holds. kvx has no
        check for two live contexts with one rank (a newer one is taken for a
        restart of the older); the decode actors' own head check refuses it."""
        o = self.o
        self.place()
        pc = list(range(o.prefill_tp))
        pc[-1] = 0
        self.pinfo = self.start_prefill(pc)
        if any("refused" in i for i in self.pinfo):
            raise RunFailed("duplicate-rank: a prefill context was refused: %s" % [i.get("refused") for i in self.pinfo])
        say("  prefill actors %s claim ranks %s of TP %d: kvx accepts each (no context knows of the others)" % (list(range(o.prefill_tp)), pc, o.prefill_tp))
        t0 = time.monotonic()
        try:
            self.dinfo = self.start_decode()
        except RunFailed as e:
            say("  the decode actors refused it in %.2f s: %s" % (time.monotonic() - t0, e))
            return "duplicate-rank: refused when the decode side added the prefill peers (by kvx as stale keys, or by this test's head check)"
        raise RunFailed("duplicate-rank: the decode actors accepted two prefill ranks 0")

    def refusal(self, side: str, infos: List[Dict[str, Any]], claimed: List[int], tp: int, dt: float) -> List[str]:
        fails = []
        for r, i in enumerate(infos):
            wrong = claimed[r] != r
            ref = i.get("refused")
            if wrong and ref:
                say("  %s actor %d claims rank %d of TP %d: refused in %.3f ms (the actor's setup answered in %.2f s): %s: %s" % (
                    side, r, claimed[r], tp, ref["seconds"] * 1e3, dt, ref["class"], ref["text"]))
                if ref["class"] != "kvx.ArgumentError" or "tp_rank %d" % claimed[r] not in ref["text"] or ref["seconds"] > 1.0:
                    fails.append("%s rank %d: refused, but not at once with a message naming the rank" % (side, claimed[r]))
            elif wrong:
                fails.append("%s actor %d claims rank %d of TP %d and was accepted" % (side, r, claimed[r], tp))
            elif ref:
                fails.append("%s rank %d, set right, was refused: %s" % (side, r, ref["text"]))
        return fails

    def teardown(self) -> None:
        """Contexts closed (readers first), actors killed, the group removed; never blocks for long."""
        for a in self.decode + self.extra + self.prefill:
            try:
                ray.get(a.close.remote(), timeout=10)
            except Exception:
                pass
        for a in self.decode + self.extra + self.prefill:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        if self.pg is not None:
            remove_placement_group(self.pg)


def header(o: Opts) -> None:
    dh = rank_heads(o.heads, 0, o.decode_tp)[1]
    ph = rank_heads(o.heads, 0, o.prefill_tp)[1]
    say("%s: strategy %s, backend %s, prefill TP %d -> decode TP %d" % (PROG, o.strategy, o.backend, o.prefill_tp, o.decode_tp))
    say("  layout %s, %d layers x K/V, %d blocks per cache, %d tokens x %d heads (of %d) x %d dim x %d bytes = %d bytes per block (decode rank)" % (
        o.layout, o.num_layers, o.num_blocks, o.block_tokens, dh, o.heads, o.head_dim, o.dtype_bytes, o.block_tokens * dh * o.head_dim * o.dtype_bytes))
    say("  %d %s blocks per request, %d iterations, seed %d, prefill rank holds %d heads" % (
        o.blocks, "random" if o.random_blocks else "consecutive", o.iters, o.seed, ph))


def run(o: Opts) -> Tuple[int, str]:
    """One configuration; (exit code, the verdict line)."""
    header(o)
    r = Run(o)
    try:
        if o.fault == "wrong-rank":
            verdict = "TEST PASSED: " + r.wrong_rank()
        elif o.fault == "duplicate-rank":
            verdict = "TEST PASSED: " + r.duplicate_rank()
        else:
            r.setup()
            total, failures = r.iterations()
            if failures:
                verdict = "TEST FAILED: " + failures[0]
                if not failures[0].startswith("decode rank"):
                    say(verdict)
                return 1, verdict
            verdict = "TEST PASSED: every byte of %d checked" % total
            if o.fault == "kill-prefill":
                verdict += "; " + r.kill_prefill()
            elif o.fault == "kill-decode":
                verdict += "; " + r.kill_decode()
        say(verdict)
        return 0, verdict
    except RunFailed as e:
        verdict = "TEST FAILED: %s" % e
        say(verdict)
        return e.code, verdict
    finally:
        r.teardown()


# --- the command line ----------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="kvx_bench's pack/spread transfer test on a Ray cluster (tests/ray/two_nodes.sh makes one)")
    p.add_argument("--strategy", choices=["pack", "spread"], default="pack", help="pack: every actor on one node; spread: prefill and decode on two")
    p.add_argument("--backends", default="UCX", help="UCX or LIBFABRIC, or both comma-separated (one run each)")
    p.add_argument("--blocks", type=int, default=10, help="blocks per request")
    p.add_argument("--num-blocks", type=int, default=100, help="blocks per cache")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--heads", type=int, default=8, help="the model's KV heads; each rank holds heads/tp of them (1, replicated, when fewer)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype-bytes", type=int, choices=sorted(DTYPES), default=2)
    p.add_argument("--random-blocks", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--prefill-tp", type=int, default=1)
    p.add_argument("--decode-tp", type=int, default=1)
    p.add_argument("--layout", choices=["HND", "NHD"], default="HND")
    p.add_argument("--max-ops", type=int, default=0)
    p.add_argument("--verify", type=int, default=0, help="kvx checks one block in N against the producer's sealed checksums")
    p.add_argument("--verbose", action="store_true", help="kvx's info log in the actors (KVX_LOG=info)")
    p.add_argument("--json", help="the report as one JSON object (a line per backend)")
    p.add_argument("--fault", choices=FAULTS, default="none")
    p.add_argument("--lease-ms", type=int, default=30000, help="how long a prefill rank waits for a reader's notification")
    p.add_argument("--read-timeout-ms", type=int, default=10000, help="each read's deadline")
    p.add_argument("--ray-timeout-s", type=float, default=120.0, help="the longest wait for any actor's answer")
    p.add_argument("--flip-byte", action="store_true", help="plant a wrong byte (also KVX_RAY_FLIP_BYTE=1): the run must fail")
    p.add_argument("--placement", choices=["STRICT_PACK", "PACK", "STRICT_SPREAD", "SPREAD"],
                   help="the placement group's strategy instead of the one --strategy implies (the placement check must then fail)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "auto"), help="the Ray cluster (default $RAY_ADDRESS)")
    p.add_argument("--suite", choices=sorted(SUITES), help="run a list of cases on one cluster; ends with 'N passed, M failed'")
    return p


def opts_of(a: argparse.Namespace, backend: str) -> Opts:
    return Opts(strategy=a.strategy, backend=backend, blocks=a.blocks, num_blocks=a.num_blocks, num_layers=a.num_layers,
                block_tokens=a.block_tokens, heads=a.heads, head_dim=a.head_dim, dtype_bytes=a.dtype_bytes, random_blocks=a.random_blocks,
                seed=a.seed, iters=a.iters, prefill_tp=a.prefill_tp, decode_tp=a.decode_tp, layout=a.layout, max_ops=a.max_ops,
                verify=a.verify, verbose=a.verbose, json=a.json, fault=a.fault, lease_ms=a.lease_ms, read_timeout_ms=a.read_timeout_ms,
                ray_timeout_s=a.ray_timeout_s, placement=a.placement or "", flip_byte=a.flip_byte or os.environ.get("KVX_RAY_FLIP_BYTE", "") not in ("", "0"))


def bad_options(o: Opts) -> Optional[str]:
    """kvx_bench's option checks, in its words."""
    if o.backend not in BACKENDS:
        return "--backends is UCX or LIBFABRIC, not '%s'" % o.backend
    if not 1 <= o.prefill_tp <= 64 or not 1 <= o.decode_tp <= 64:
        return "--prefill-tp and --decode-tp must be in [1, 64]"
    if not 1 <= o.blocks <= o.num_blocks:
        return "--blocks must be in [1, --num-blocks %d]" % o.num_blocks
    if not 1 <= o.iters <= 10000:
        return "--iters must be in [1, 10000]"
    if min(o.num_layers, o.block_tokens, o.heads, o.head_dim) < 1:
        return "layout sizes must be non-zero"
    for tp in (o.prefill_tp, o.decode_tp):
        if (o.heads % tp if o.heads >= tp else tp % o.heads) != 0:
            return "%d KV heads do not divide over TP %d (heads must be a multiple of TP, or TP a multiple of heads)" % (o.heads, tp)
    if o.decode_tp >= NOTIFY_STRIDE:
        return "--decode-tp must be below %d" % NOTIFY_STRIDE
    if o.fault == "duplicate-rank" and o.prefill_tp < 2:
        return "duplicate-rank needs --prefill-tp 2 or more"
    if o.lease_ms < 100 or o.read_timeout_ms < 100:
        return "--lease-ms and --read-timeout-ms must be at least 100"
    return None


def connect(address: str, verbose: bool) -> None:
    if not sys.stdout.isatty():
        import colorama  # Ray's own dependency: strips the colours Ray puts on the actors' lines
        colorama.init()
    env = {"env_vars": {"KVX_LOG": "info"}} if verbose else None
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True, runtime_env=env)


# --- suites: several cases on one cluster ------------------------------------------

SMALL = ["--num-blocks", "200", "--blocks", "24", "--num-layers", "3", "--iters", "3"]
FAULT = SMALL + ["--lease-ms", "3000", "--read-timeout-ms", "5000"]
# (name, arguments, what the verdict must start with)
Case = Tuple[str, List[str], str]


def make_test_cases() -> List[Case]:
    """make test's bounded subset."""
    return [
        ("spread ucx 2->1 HND random", ["--strategy", "spread", "--backends", "UCX", "--prefill-tp", "2", "--decode-tp", "1", "--random-blocks"] + SMALL,
         "TEST PASSED"),
        ("pack libfabric 1->2 NHD random", ["--strategy", "pack", "--backends", "LIBFABRIC", "--prefill-tp", "1", "--decode-tp", "2", "--layout", "NHD",
                                            "--random-blocks"] + SMALL, "TEST PASSED"),
        ("a planted wrong byte fails the run and names it (spread ucx 1->1)", ["--strategy", "spread", "--flip-byte", "--random-blocks"] + SMALL,
         "TEST FAILED: decode rank 0, iteration 2: 1 wrong bytes; first: prefill rank 0, layer 2, V"),
        ("fault: prefill rank 0 killed mid-read, a peer error within the deadline (spread ucx 2->1)",
         ["--strategy", "spread", "--fault", "kill-prefill", "--prefill-tp", "2", "--decode-tp", "1", "--random-blocks"] + FAULT, "TEST PASSED"),
        ("fault: decode rank 0 killed, the expected notifications expire (spread ucx 1->2)",
         ["--strategy", "spread", "--fault", "kill-decode", "--prefill-tp", "1", "--decode-tp", "2", "--random-blocks"] + FAULT, "TEST PASSED"),
        ("fault: rank N of TP N refused at once, prefill and decode (spread ucx 2->2)",
         ["--strategy", "spread", "--fault", "wrong-rank", "--prefill-tp", "2", "--decode-tp", "2"] + FAULT, "TEST PASSED"),
        ("spread placed on one node fails the run (placement group STRICT_PACK)", ["--strategy", "spread", "--placement", "STRICT_PACK"] + SMALL,
         "TEST FAILED: spread placed prefill and decode actors on the same node"),
    ]


def matrix_cases() -> List[Case]:
    """The whole TP matrix, pack and spread, UCX and libfabric; the faults on both."""
    out: List[Case] = []
    tps = [(1, 1), (1, 2), (2, 1), (2, 2), (2, 4), (4, 2)]
    for backend in ("UCX", "LIBFABRIC"):
        for strategy in ("pack", "spread"):
            for k, (p, d) in enumerate(tps):
                layout = "HND" if k % 2 == 0 else "NHD"
                args = ["--strategy", strategy, "--backends", backend, "--prefill-tp", str(p), "--decode-tp", str(d), "--layout", layout]
                if k % 3 != 2:
                    args.append("--random-blocks")
                name = "%s %s %d->%d %s %s" % (strategy, backend.lower(), p, d, layout, "random" if "--random-blocks" in args else "consecutive")
                out.append((name, args + SMALL, "TEST PASSED"))
        b = ["--strategy", "spread", "--backends", backend, "--random-blocks"]
        out += [
            ("fault %s: prefill rank 0 killed mid-read (spread 2->1)" % backend.lower(), b + ["--fault", "kill-prefill", "--prefill-tp", "2"] + FAULT,
             "TEST PASSED"),
            ("fault %s: decode rank 0 killed (spread 1->2)" % backend.lower(), b + ["--fault", "kill-decode", "--decode-tp", "2"] + FAULT, "TEST PASSED"),
            ("fault %s: rank N of TP N (spread 2->2)" % backend.lower(), b + ["--fault", "wrong-rank", "--prefill-tp", "2", "--decode-tp", "2"] + FAULT,
             "TEST PASSED"),
            ("fault %s: two prefill ranks 0 (spread 2->1)" % backend.lower(), b + ["--fault", "duplicate-rank", "--prefill-tp", "2"] + FAULT,
             "TEST PASSED"),
            ("a planted wrong byte fails the run (spread %s 2->1 NHD)" % backend.lower(), b + ["--flip-byte", "--prefill-tp", "2", "--layout", "NHD"] + SMALL,
             "TEST FAILED: decode rank 0, iteration 2: 1 wrong bytes; first: prefill rank 0"),
        ]
    out.append(make_test_cases()[-1])
    return out


SUITES = {"make-test": make_test_cases, "matrix": matrix_cases}


def run_suite(name: str, a: argparse.Namespace) -> int:
    cases = SUITES[name]()
    passed, failed = 0, []
    t_all = time.monotonic()
    for cname, args, want in cases:
        say("\n== %s" % cname)
        ca = parser().parse_args(args + ["--ray-timeout-s", str(a.ray_timeout_s)])
        o = opts_of(ca, ca.backends)
        t0 = time.monotonic()
        try:
            code, verdict = run(o)
        except Exception:
            traceback.print_exc()
            code, verdict = 2, "an exception in the driver"
        ok = verdict.startswith(want) and (code == 0) == want.startswith("TEST PASSED")
        say("%s %s (%.1f s)%s" % ("ok  " if ok else "FAIL", cname, time.monotonic() - t0, "" if ok else ": wanted '%s', got: %s" % (want, verdict)))
        if ok:
            passed += 1
        else:
            failed.append(cname)
    say("\nsuite %s: %.0f s on the cluster" % (name, time.monotonic() - t_all))
    for f in failed:
        say("FAIL %s" % f)
    say("%d passed, %d failed" % (passed, len(failed)))
    return 0 if not failed else 1


def main(argv: Optional[List[str]] = None) -> int:
    a = parser().parse_args(argv)
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    if not a.suite:
        for b in backends:
            why = bad_options(opts_of(a, b))
            if why:
                sys.stderr.write("%s: %s\n" % (PROG, why))
                return 2
    t0 = time.monotonic()
    try:
        connect(a.address, a.verbose)
    except Exception as e:
        sys.stderr.write("%s: cannot join the Ray cluster at %s: %s\n" % (PROG, a.address, e))
        return 2
    say("%s: joined the Ray cluster at %s in %.1f s: %d nodes alive" % (PROG, a.address, time.monotonic() - t0,
                                                                      len([n for n in ray.nodes() if n["Alive"]])))
    try:
        if a.suite:
            return run_suite(a.suite, a)
        rc = 0
        if a.json:
            open(a.json, "w").close()
        for b in backends:
            code, _ = run(opts_of(a, b))
            rc = max(rc, code)
        return rc
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
