"""The workload every library runs in make bench-peers, and what each run
reports. One module, so that kvx, NIXL and Mooncake move the same bytes,
are checked the same way and are measured the same way.

The caches (per layer): each owner rank (a prefill TP rank) holds, for each
of L layers, one region [2 (K, V)][N blocks][block_bytes], its block being
[tokens][its heads] either way. The reader (the decode side, TP 1) holds all
heads: per layer one region [2][N][tp * block_bytes]. In HND the reader's
block is [heads][tokens], so owner rank r's block is the r-th
block_bytes-long piece of it: one contiguous copy. In NHD it is
[tokens][heads], so owner rank r's block lands as one piece per token,
block_bytes / tokens long, strided by tp of them (with TP 1 the pieces
join into one copy again).

A request is B block ids of the owner (random, or consecutive) read into B
free local blocks, every layer, K and V, from every owner rank. Requests go
in flight up to a window; every byte of each one's local blocks is checked
before those blocks are used again, then poisoned. On the host each request
is checked when it completes; on the GPU (check "batch") completed requests
are checked together when the free blocks run out and at the end, so that
the check (a device sync, a few kernels per layer) does not set the pace.

The pattern: 8-byte word i of owner rank r, layer l, plane p, block b is
tag(r, l, p, b) ^ (i * GOLDEN), so a reader can check a block without
holding the owner's cache, and a block from the wrong rank, layer, plane or
block id, or stale bytes, cannot pass.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
POISON = 0xA5


@dataclass
class Config:
    library: str = "kvx"          # kvx | nixl | mooncake
    backend: str = ""             # library-specific: "ucx", "ofi", "tcp", ...
    block_bytes: int = 16384      # one owner rank's block, one layer, one plane
    num_layers: int = 4
    num_blocks: int = 0           # N; 0: from cache_bytes
    cache_bytes: int = 256 << 20  # per owner rank, when num_blocks is 0
    blocks_per_request: int = 32  # B
    requests: int = 64
    inflight: int = 8
    random_blocks: bool = True
    owner_tp: int = 1
    seed: int = 1
    device: str = "cpu"           # cpu | cuda
    layout: str = "HND"           # the reader's: HND | NHD
    block_tokens: int = 16        # tokens per block (NHD: pieces per owner block)
    check: str = ""               # each | batch; "": batch on the GPU, each on the host
    deadline_s: float = 120.0
    rdv: str = ""                 # the rendezvous directory

    def blocks(self) -> int:
        if self.num_blocks:
            return self.num_blocks
        n = self.cache_bytes // (self.num_layers * 2 * self.block_bytes)
        return int(max(2 * self.blocks_per_request, min(n, 4096)))

    def request_bytes(self) -> int:
        return self.blocks_per_request * self.num_layers * 2 * self.block_bytes * self.owner_tp

    def batch_check(self) -> bool:
        return self.check == "batch" or (not self.check and self.device == "cuda")

    def pieces(self) -> List[Tuple[int, int, int]]:
        """Owner rank r's block in the reader's block, for every r alike up to
        r * step: (offset in the reader's block at r = 0, offset in the
        owner's block, bytes). HND (or TP 1): one piece; NHD: one per token."""
        bb, tp, t = self.block_bytes, self.owner_tp, self.block_tokens
        if self.layout == "HND" or tp == 1:
            return [(0, 0, bb)]
        if self.layout != "NHD" or bb % (8 * t):
            raise ValueError("layout %s with %d-byte blocks of %d tokens: HND, or NHD with whole words per token" % (
                self.layout, bb, t))
        piece = bb // t
        return [(i * tp * piece, i * piece, piece) for i in range(t)]

    def piece_step(self) -> int:
        """How far owner rank r + 1's pieces sit from rank r's in the reader's block."""
        return self.block_bytes if self.layout == "HND" or self.owner_tp == 1 else self.block_bytes // self.block_tokens


def parse(argv: Optional[Sequence[str]] = None) -> Tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser()
    for f in Config.__dataclass_fields__.values():
        t = {"bool": lambda s: s in ("1", "true", "yes"), "int": int, "float": float}.get(str(f.type), str)
        p.add_argument("--" + f.name.replace("_", "-"), type=t, default=f.default)
    p.add_argument("--role", choices=["owner", "reader"], required=True)
    p.add_argument("--rank", type=int, default=0)
    a = p.parse_args(argv)
    cfg = Config(**{k: getattr(a, k) for k in Config.__dataclass_fields__})
    return cfg, a


# --- regions and the pattern ----------------------------------------------------


def tag(rank: int, layer: int, plane: int, block: int) -> np.uint64:
    return np.uint64((0x6B7678 << 40) | (rank << 32) | (layer << 24) | (plane << 23) | block)


def tags(rank: int, layer: int, plane: int, blocks: Any) -> np.ndarray:
    """tag() of many blocks at once."""
    return np.asarray(blocks, dtype=np.uint64) | tag(rank, layer, plane, 0)


class Pattern:
    """Word indexes times GOLDEN, computed once per block size."""

    def __init__(self, block_bytes: int) -> None:
        assert block_bytes % 8 == 0
        self.base = np.arange(block_bytes // 8, dtype=np.uint64) * GOLDEN

    def block(self, rank: int, layer: int, plane: int, block: int) -> np.ndarray:
        return self.base ^ tag(rank, layer, plane, block)


def owner_regions(cfg: Config, rank: int) -> List[Any]:
    """One region per layer, filled with the pattern: numpy (host) or torch (GPU) uint8, 1-d."""
    n, bb = cfg.blocks(), cfg.block_bytes
    pat = Pattern(bb)
    out = []
    for layer in range(cfg.num_layers):
        r = np.empty(2 * n * bb, dtype=np.uint8)
        words = r.view(np.uint64).reshape(2, n, bb // 8)
        for plane in range(2):
            words[plane] = pat.base[None, :] ^ tags(rank, layer, plane, np.arange(n))[:, None]
        if os.environ.get("KVX_PEERS_FLIP_BYTE"):  # a planted wrong byte per block: every row must fail
            words[:, :, 0] ^= np.uint64(1)
        out.append(to_device(cfg, r))
    return out


def reader_regions(cfg: Config) -> List[Any]:
    n, bb = cfg.blocks(), cfg.block_bytes * cfg.owner_tp
    return [to_device(cfg, np.full(2 * n * bb, POISON, dtype=np.uint8)) for _ in range(cfg.num_layers)]


def to_device(cfg: Config, arr: np.ndarray) -> Any:
    if cfg.device == "cuda":
        import torch
        return torch.from_numpy(arr).cuda()
    return arr


def addr(region: Any) -> int:
    """The address of a region (numpy array or torch tensor)."""
    return int(region.data_ptr()) if hasattr(region, "data_ptr") else int(region.ctypes.data)


def nbytes(region: Any) -> int:
    return int(region.numel()) if hasattr(region, "numel") else int(region.nbytes)


def remote_offset(cfg: Config, plane: int, block: int) -> int:
    """Byte offset of (plane, block) in an owner rank's layer region."""
    return (plane * cfg.blocks() + block) * cfg.block_bytes


def local_offset(cfg: Config, plane: int, block: int, rank: int) -> int:
    """Byte offset of owner rank `rank`'s first piece of (plane, block) in the reader's layer region."""
    return (plane * cfg.blocks() + block) * cfg.owner_tp * cfg.block_bytes + rank * cfg.piece_step()


def copies(cfg: Config, local: Sequence[int], remote: Sequence[int]) -> List[Tuple[int, int, int, int, int]]:
    """Every contiguous copy of a request, as (rank, layer, local offset,
    remote offset, bytes), one per (rank, layer, plane, block, piece): what
    a library without a layout model must be told. Libraries merge runs as
    they can."""
    out = []
    pieces = cfg.pieces()
    for r in range(cfg.owner_tp):
        for layer in range(cfg.num_layers):
            for plane in range(2):
                for lb, rb in zip(local, remote):
                    lo, ro = local_offset(cfg, plane, lb, r), remote_offset(cfg, plane, rb)
                    for pl, pr, n in pieces:
                        out.append((r, layer, lo + pl, ro + pr, n))
    return out


class Checker:
    """Checks completed requests' local blocks, every byte, then poisons them."""

    def __init__(self, cfg: Config, regions: List[Any]) -> None:
        self.cfg = cfg
        self.regions = regions
        self.pat = Pattern(cfg.block_bytes)
        self.gpu = cfg.device == "cuda"
        self.poison = np.uint64(int.from_bytes(bytes([POISON]) * 8, "little"))  # a word of POISON bytes
        self.pending: List[Tuple[int, List[int], List[int]]] = []  # batch check: (request, local, remote)
        if self.gpu:
            import torch
            self.torch = torch
            self.base_t = torch.from_numpy(self.pat.base.view(np.int64)).cuda()

    def words(self, region: Any) -> Any:
        """A layer region as words, the block index second: [K/V][block][owner
        rank][word] in HND, [K/V][block][token][owner rank][word] in NHD."""
        cfg = self.cfg
        shape: Tuple[int, ...] = (2, cfg.blocks(), cfg.owner_tp, cfg.block_bytes // 8)
        if len(cfg.pieces()) > 1:
            shape = (2, cfg.blocks(), cfg.block_tokens, cfg.owner_tp, cfg.block_bytes // 8 // cfg.block_tokens)
        if self.gpu:
            return region.view(self.torch.int64).view(*shape)
        return region.view(np.uint64).reshape(shape)

    def rank_words(self, rv: Any, plane: int, li: Any, r: int) -> Any:
        """Owner rank r's words of the local blocks li, as [block][word] in the owner's order."""
        if self.gpu:
            sel = rv[plane].index_select(0, li)
        else:
            sel = rv[plane, li]
        if sel.ndim == 3:
            return sel[:, r]
        return sel[:, :, r].reshape(sel.shape[0], -1)

    def add(self, rid: int, local: Sequence[int], remote: Sequence[int]) -> None:
        """A completed request, checked at the next flush()."""
        self.pending.append((rid, list(local), list(remote)))

    def flush(self) -> Tuple[List[int], Optional[str]]:
        """Checks every pending request at once: (their local blocks, now
        free, and None) or the first wrong byte."""
        local = [b for _, lo, _ in self.pending for b in lo]
        remote = [b for _, _, ro in self.pending for b in ro]
        bad = self.check(local, remote) if local else None
        if bad:
            at = next(rid for rid, lo, _ in self.pending if bad[1] in lo)
            return [], "request %d: %s" % (at, bad[0])
        self.pending.clear()
        return local, None

    def check(self, local: Sequence[int], remote: Sequence[int]) -> Optional[Tuple[str, int]]:
        """All of the given blocks at once per layer, plane and owner rank (one
        device sync on the GPU): each local block's words against the tags of
        the remote block it should hold. None, or (what is wrong, which local
        block). Poisons the blocks after a pass."""
        cfg = self.cfg
        if self.gpu:
            li = self.torch.tensor(list(local), device=self.regions[0].device)
            rem = np.asarray(remote, dtype=np.uint64)
        else:
            li = np.asarray(local)
            rem = np.asarray(remote, dtype=np.uint64)
        bad_at = []
        for layer, region in enumerate(self.regions):
            rv = self.words(region)
            for plane in range(2):
                for r in range(cfg.owner_tp):
                    want = tags(r, layer, plane, rem)
                    got = self.rank_words(rv, plane, li, r)
                    if self.gpu:
                        want_t = self.torch.from_numpy(want.view(np.int64)).to(region.device)
                        bad_at.append(((got ^ self.base_t[None, :]) != want_t[:, None]).sum(dim=1))
                    else:
                        bad_at.append(np.count_nonzero((got ^ self.pat.base[None, :]) != want[:, None], axis=1))
        flat = (self.torch.stack(bad_at).cpu().numpy() if self.gpu else np.stack(bad_at)).reshape(cfg.num_layers, 2, cfg.owner_tp, -1)
        if flat.any():
            layer, plane, r, j = (int(x) for x in np.argwhere(flat)[0])
            return self.describe(layer, plane, local[j], remote[j], r), local[j]
        poison = int(self.poison.view(np.int64)) if self.gpu else self.poison
        for region in self.regions:  # a stale copy cannot pass later
            self.words(region)[:, li] = poison
        if self.gpu:
            # the next read into these blocks comes from another stream (or process): poisoned first
            self.torch.cuda.current_stream().synchronize()
        return None

    def describe(self, layer: int, plane: int, lb: int, rb: int, r: int) -> str:
        cfg, bb = self.cfg, self.cfg.block_bytes
        rv = self.words(self.regions[layer])
        li = self.torch.tensor([lb], device=self.regions[0].device) if self.gpu else np.asarray([lb])
        piece = self.rank_words(rv, plane, li, r)[0]
        got = (piece.cpu().numpy() if self.gpu else piece).tobytes()
        want = self.pat.block(r, layer, plane, rb).tobytes()
        i = next(i for i in range(bb) if got[i] != want[i])
        return ("wrong bytes: owner rank %d, layer %d, %s, remote block %d -> local block %d: first at byte %d of the "
                "owner's block, want 0x%02x, got 0x%02x (%d of %d bytes differ)" % (
                    r, layer, "KV"[plane], rb, lb, i, want[i], got[i], sum(1 for a, b in zip(got, want) if a != b), bb))


class Requests:
    """The reader's request stream: remote ids (random or consecutive), local
    ids from a free list, latency per request."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        n = cfg.blocks()
        self.free = list(range(n))
        self.rng.shuffle(self.free)
        self.lat: List[float] = []

    def next(self) -> Optional[Tuple[List[int], List[int]]]:
        cfg, n, b = self.cfg, self.cfg.blocks(), self.cfg.blocks_per_request
        if len(self.free) < b:
            return None
        local = [self.free.pop() for _ in range(b)]
        if cfg.random_blocks:
            remote = self.rng.sample(range(n), b)
        else:
            s = self.rng.randrange(0, n - b + 1)
            remote = list(range(s, s + b))
        return local, remote

    def give_back(self, local: Sequence[int]) -> None:
        self.free.extend(local)


# --- what a process reports -------------------------------------------------------


@dataclass
class Report:
    role: str
    library: str
    rank: int = 0
    ok: bool = True
    error: str = ""
    transport: str = ""
    version: str = ""
    bytes: int = 0
    seconds: float = 0.0
    gbps: float = 0.0
    lat_p50_ms: float = 0.0
    lat_p99_ms: float = 0.0
    cpu_s: float = 0.0
    cpu_s_per_gb: float = 0.0
    max_rss_mb: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)


class Meter:
    """CPU seconds and wall time of this process from start(), and peak RSS."""

    def __init__(self) -> None:
        self.start()

    def start(self) -> None:
        t = os.times()
        self.cpu0, self.wall0 = t.user + t.system, time.monotonic()

    def finish(self, rep: Report, nbytes: int = 0) -> Report:
        t = os.times()
        rep.cpu_s = t.user + t.system - self.cpu0
        rep.seconds = time.monotonic() - self.wall0
        rep.max_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        if nbytes:
            rep.bytes = nbytes
            rep.gbps = nbytes / rep.seconds / 1e9 if rep.seconds > 0 else 0.0
            rep.cpu_s_per_gb = rep.cpu_s / (nbytes / 1e9)
        return rep


def percentile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


# --- rendezvous through files in cfg.rdv -----------------------------------------------


def put(cfg: Config, name: str, data: bytes) -> None:
    tmp = os.path.join(cfg.rdv, "." + name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, os.path.join(cfg.rdv, name))


def get(cfg: Config, name: str, deadline: float) -> bytes:
    path = os.path.join(cfg.rdv, name)
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError("no %s in %s before the deadline" % (name, cfg.rdv))
        time.sleep(0.01)
    with open(path, "rb") as f:
        return f.read()


def exists(cfg: Config, name: str) -> bool:
    return os.path.exists(os.path.join(cfg.rdv, name))


def write_report(cfg: Config, rep: Report) -> None:
    put(cfg, "%s%d.json" % (rep.role, rep.rank), json.dumps(asdict(rep)).encode())


def serve_owner(cfg: Config, rank: int, library: str, metadata: bytes, meter: Meter, transport: str = "",
                version: str = "", progress: Optional[Any] = None, on_report: Optional[Any] = None) -> None:
    """The owner's part after registering: publish metadata, serve (the
    library's own threads, or `progress()` called in between) until the
    reader says it is done or the deadline passes, then report
    (`on_report(report)` may add what is known only then)."""
    put(cfg, "owner%d.md" % rank, metadata)
    meter.start()
    deadline = time.monotonic() + cfg.deadline_s
    while not exists(cfg, "reader.done") and time.monotonic() < deadline:
        if progress is not None:
            progress()
        else:
            time.sleep(0.01)
    rep = Report("owner", library, rank, transport=transport, version=version)
    if on_report is not None:
        on_report(rep)
    write_report(cfg, meter.finish(rep))


def run_reader(cfg: Config, make_reader: Any) -> int:
    """The reader's whole run, the same for every library: regions, the
    owners' metadata, make_reader(cfg, regions, [metadata per owner rank])
    -> an object with .transport, .version, post(req_id, local, remote) and
    completed() -> [(req_id, error or None)] (which may sleep a little, never
    long), close(). One request first, checked and not counted (connection
    set-up); then cfg.requests with cfg.inflight in flight, each checked as
    it completes. Writes reader0.json and reader.done; exit status 0 or 1."""
    rep = Report("reader", cfg.library)
    deadline = time.monotonic() + cfg.deadline_s
    reader = None
    try:
        regions = reader_regions(cfg)
        mds = [get(cfg, "owner%d.md" % r, deadline) for r in range(cfg.owner_tp)]
        reader = make_reader(cfg, regions, mds)
        rep.transport, rep.version = reader.transport, reader.version
        checker = Checker(cfg, regions)
        reqs = Requests(cfg)

        def one_pass(count: int, measure: bool) -> None:
            posted: Dict[int, Tuple[List[int], List[int], float]] = {}
            sent = done = 0
            while done < count:
                while sent < count and len(posted) < cfg.inflight:
                    nxt = reqs.next()
                    if nxt is None and checker.pending:
                        settle()
                        nxt = reqs.next()
                    if nxt is None:
                        break
                    posted[sent] = (nxt[0], nxt[1], time.monotonic())
                    reader.post(sent, nxt[0], nxt[1])
                    sent += 1
                for rid, err in reader.completed():
                    local, remote, t0 = posted.pop(rid)
                    if measure:
                        reqs.lat.append(time.monotonic() - t0)
                    if err:
                        raise RuntimeError("request %d failed: %s" % (rid, err))
                    if cfg.batch_check():
                        checker.add(rid, local, remote)
                    else:
                        bad = checker.check(local, remote)
                        if bad:
                            raise RuntimeError("request %d: %s" % (rid, bad[0]))
                        reqs.give_back(local)
                    done += 1
                if time.monotonic() > deadline:
                    raise TimeoutError("%d of %d requests done when the deadline (%.0f s) passed" % (done, count, cfg.deadline_s))
            settle()

        def settle() -> None:
            free, bad = checker.flush()
            if bad:
                raise RuntimeError(bad)
            reqs.give_back(free)

        one_pass(1, False)
        meter = Meter()
        one_pass(cfg.requests, True)
        meter.finish(rep, cfg.requests * cfg.request_bytes())
        rep.lat_p50_ms = percentile(reqs.lat, 0.5) * 1e3
        rep.lat_p99_ms = percentile(reqs.lat, 0.99) * 1e3
    except Exception as e:  # the row says why; the run goes on
        rep.ok, rep.error = False, "%s: %s" % (type(e).__name__, e)
    finally:
        try:
            if reader is not None:
                reader.close()
        except Exception as e:
            rep.extra["close_error"] = str(e)
        write_report(cfg, rep)
        put(cfg, "reader.done", b"")
    return 0 if rep.ok else 1
