"""kvx in make bench-peers: each layer region registered as one layer of a
cache whose "head" is one owner rank's share of a token (heads: 1 per owner
rank, the reader holding all of them), in the reader's layout, so kvx's own
TP split places each owner rank's block (HND: one piece; NHD: a piece per
token); one Queue.read per request per owner rank, all layers, K and V. Completions by poll, sleeping in Ticket.wait between them. The
backend is --backend (ucx, ofi); which UCX is whichever libkvx.so the
package loads ($KVX_LIBRARY picks a build against UCX 1.22)."""
from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import workload as W

import kvx


def layers_of(cfg: W.Config, regions: Sequence[Any], heads: int) -> List[Any]:
    """The regions as layers of uint8 in cfg.layout: HND [2, N, heads, tokens,
    bytes per token and head], NHD [2, N, tokens, heads, the same]."""
    t = cfg.block_tokens
    shape = (2, cfg.blocks(), heads, t, cfg.block_bytes // t) if cfg.layout == "HND" else \
        (2, cfg.blocks(), t, heads, cfg.block_bytes // t)
    return [r.reshape(*shape) for r in regions]


def version(backend: str) -> str:
    """kvx's version and the transport library's, as loaded in this process."""
    import ctypes as C
    v = "kvx 0.2"
    try:
        if backend == "cuda":
            d = C.c_int()
            C.CDLL("libcuda.so.1").cuDriverGetVersion(C.byref(d))
            v += " (CUDA backend), CUDA driver API %d.%d" % (d.value // 1000, d.value % 1000 // 10)
        elif backend == "ofi":
            fi = C.CDLL("libfabric.so.1").fi_version()
            v += ", libfabric %d.%d" % (fi >> 16, fi & 0xFFFF)
        else:
            a, b, c = C.c_uint(), C.c_uint(), C.c_uint()
            C.CDLL("libucp.so.0").ucp_get_version(C.byref(a), C.byref(b), C.byref(c))
            v += ", UCX %d.%d.%d" % (a.value, b.value, c.value)
    except (OSError, AttributeError):
        pass
    return v


class Reader:
    def __init__(self, cfg: W.Config, regions: List[Any], mds: List[bytes]) -> None:
        self.cfg = cfg
        self.ctx = kvx.Context("decode", tp_rank=0, tp_size=1, backend=cfg.backend or None, timeout_ms=int(cfg.deadline_s * 1000))
        self.cache = self.ctx.register_cache(layers_of(cfg, regions, cfg.owner_tp), layout=cfg.layout, total_heads=cfg.owner_tp)
        self.peers = [self.ctx.add_peer(md) for md in mds]
        self.transport = "; ".join(sorted({p.transport for p in self.peers}))
        self.version = version(cfg.backend)
        self.q = self.ctx.queue(depth=max(64, 2 * cfg.inflight * cfg.owner_tp))
        self.left: Dict[int, int] = {}
        self.tickets: Dict[int, Tuple[int, kvx.Ticket]] = {}

    def post(self, rid: int, local: List[int], remote: List[int]) -> None:
        self.left[rid] = len(self.peers)
        for p in self.peers:
            t = self.q.read(p, local, remote, tag=rid)
            self.tickets[t.ticket] = (rid, t)

    def completed(self) -> List[Tuple[int, Optional[str]]]:
        comps = self.q.poll()
        if not comps and self.tickets:
            # sleep until the oldest read finishes (or a little while): kvx_wait sleeps, it does not spin
            oldest = min(self.tickets)
            try:
                self.tickets[oldest][1].wait(5)
                comps = [kvx.Completion(oldest, self.tickets[oldest][0], 0, 0)]
            except kvx.TimeoutError as e:
                if "still running" not in str(e):
                    comps = [kvx.Completion(oldest, self.tickets[oldest][0], e.status, 0)]
            except kvx.Error as e:
                comps = [kvx.Completion(oldest, self.tickets[oldest][0], e.status, 0)]
        out = []
        for c in comps:
            self.tickets.pop(c.ticket, None)
            if not c.ok:
                out.append((c.tag, str(c.error)))
                continue
            self.left[c.tag] -= 1
            if self.left[c.tag] == 0:
                del self.left[c.tag]
                out.append((c.tag, None))
        return out

    def close(self) -> None:
        self.ctx.close()


def owner(cfg: W.Config, rank: int) -> int:
    meter = W.Meter()
    regions = W.owner_regions(cfg, rank)
    with kvx.Context("prefill", tp_rank=rank, tp_size=cfg.owner_tp, backend=cfg.backend or None) as ctx:
        ctx.register_cache(layers_of(cfg, regions, 1), layout=cfg.layout, total_heads=cfg.owner_tp)
        W.serve_owner(cfg, rank, "kvx", ctx.metadata(), meter, version=version(cfg.backend))
    return 0


if __name__ == "__main__":
    c, a = W.parse()
    sys.exit(owner(c, a.rank) if a.role == "owner" else W.run_reader(c, Reader))
