"""NIXL in make bench-peers, driven the way vLLM's NixlConnector drives it:
one nixl_agent per process with the UCX backend (num_threads 4, telemetry
on, the progress thread on); each owner rank registers its layer regions
and publishes its agent metadata with one descriptor per (layer, plane,
block); the reader registers its own regions, loads every owner's
metadata, prepares the descriptor lists once (local: one descriptor per
(layer, plane, block, owner rank piece); remote, per owner rank: one per
(layer, plane, block)), and then per request and owner rank makes one
prepped READ by index, all layers, K and V, with a notification for the
owner, posts it and polls its state. The owner drains and counts the
notifications in its serve loop. --backend "ucx,progress=0,threads=0"
changes the agent's settings (see Options).

Which transport UCX picked is read from UCX's own info log (the lines it
prints when an endpoint is made), written to a file in the rendezvous
directory unless UCX_LOG_LEVEL is set by the caller."""
from __future__ import annotations

import ctypes
import importlib.metadata
import os
import pickle
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

import workload as W

BACKEND = "UCX"
# A request's transfers are posted as one READ per owner rank; each has its notification.
NOTIF_FMT = "kvx-bench:%d:%d"
# How long close() waits for transfers still in flight to end.
DRAIN_S = 1.0
# Agents and buffers of transfers that never ended: kept until the process exits.
LEFT_IN_FLIGHT: List[Any] = []


def ucx_log_to(cfg: W.Config, name: str) -> Optional[str]:
    """Send UCX's info log (which names the transports of each endpoint) to
    a file, before the agent loads UCX. None where the caller set the level."""
    if "UCX_LOG_LEVEL" in os.environ or not cfg.rdv:
        return None
    path = os.path.join(cfg.rdv, "ucx-%s.%d.log" % (name, os.getpid()))
    os.environ["UCX_LOG_LEVEL"] = "info"
    os.environ["UCX_LOG_FILE"] = path
    return path


def transports_in(path: Optional[str]) -> str:
    """The transports UCX printed for the endpoints to other processes. Such a
    line reads e.g. '<agent> intra-node cfg#1 rma_am(tcp/lo) amo_am(tcp/lo)
    am(tcp/lo cma/memory) ka(tcp/lo)': rma_am is a get emulated over active
    messages (served by the owner's CPU, its data on the am lanes), rma or
    rma_bw a native one."""
    if not path:
        return "ucx:unknown"
    ctypes.CDLL(None).fflush(None)  # UCX writes its log through a buffered FILE
    if not os.path.exists(path):
        return "ucx:unknown"
    with open(path, errors="replace") as f:
        lines = [ln for ln in f if re.search(r" cfg#\d+ ", ln) and " self cfg#" not in ln]
    found = set()
    for line in lines:
        lanes = dict(re.findall(r"\b(rma_am|rma_bw|rma|am)\(([^)]*)\)", line))
        if "rma_am" in lanes:
            found.add("%s (rma over am: %s)" % (lanes["rma_am"], ", ".join(lanes.get("am", "").split())))
        for kind in ("rma", "rma_bw"):
            if kind in lanes:
                found.add("%s (%s)" % (", ".join(lanes[kind].split()), kind))
    return "ucx:" + "; ".join(sorted(found)) if found else "ucx:unknown"


@dataclass
class Options:
    """--backend: "ucx" (or empty), then ",key=value" items: progress=0|1 (NIXL's
    progress thread; on by default, as vLLM leaves it) and threads=N (the UCX
    backend's num_threads; vLLM passes 4)."""
    progress: bool = True
    threads: int = 4

    def __str__(self) -> str:
        return "UCX backend, progress thread %s, num_threads %d" % ("on" if self.progress else "off", self.threads)


def options(cfg: W.Config) -> Options:
    items = [i.strip() for i in cfg.backend.split(",") if i.strip()]
    if items and "=" not in items[0]:
        if items[0].lower() != "ucx":
            raise ValueError("the NIXL runner drives the UCX backend only, not %r" % items[0])
        items = items[1:]
    opt = Options()
    for item in items:
        key, _, value = item.partition("=")
        if key == "progress":
            opt.progress = value in ("1", "true", "yes", "on")
        elif key == "threads":
            opt.threads = int(value)
        else:
            raise ValueError("unknown NIXL option %r in --backend %r" % (key, cfg.backend))
    return opt


def version(opt: Options) -> str:
    """nixl-cu12 from the package metadata; UCX from the libucp that NIXL loaded."""
    nixl = importlib.metadata.version("nixl-cu12")
    ucx = "?"
    with open("/proc/self/maps") as f:
        libs = sorted({line.split()[-1] for line in f if "/libucp" in line})
    if libs:
        ucp = ctypes.CDLL(libs[0])
        ucp.ucp_get_version_string.restype = ctypes.c_char_p
        ucx = ucp.ucp_get_version_string().decode()
    return "nixl-cu12 %s (%s), UCX %s" % (nixl, opt, ucx)


def make_agent(name: str, opt: Options) -> Any:
    from nixl_cu12 import nixl_agent, nixl_agent_config
    # vLLM's NixlConnector: UCX only, num_threads, telemetry on, the progress thread left at its default.
    conf = nixl_agent_config(enable_prog_thread=opt.progress, backends=[BACKEND], num_threads=opt.threads,
                             capture_telemetry=True)
    return nixl_agent(name, conf)


def mem_type(cfg: W.Config) -> str:
    return "VRAM" if cfg.device == "cuda" else "DRAM"


def device_id(region: Any) -> int:
    return max(int(region.get_device()), 0) if hasattr(region, "get_device") else 0


def register(agent: Any, cfg: W.Config, regions: Sequence[Any]) -> Any:
    """Registers every layer region with the UCX backend; returns the reg list (to deregister)."""
    descs = agent.get_reg_descs([(W.addr(r), W.nbytes(r), device_id(r), "") for r in regions], mem_type(cfg))
    agent.register_memory(descs, backends=[BACKEND])
    return descs


# --- descriptor indexes --------------------------------------------------------------
# One descriptor per contiguous piece: per block in HND (or TP 1), per token
# in NHD, where an owner rank's block lands strided among the others'.


def remote_index(cfg: W.Config, layer: int, plane: int, block: int, piece: int = 0) -> int:
    """Where (layer, plane, block, piece) sits in an owner's descriptor list."""
    return ((layer * 2 + plane) * cfg.blocks() + block) * len(cfg.pieces()) + piece


def local_index(cfg: W.Config, layer: int, plane: int, block: int, rank: int, piece: int = 0) -> int:
    """Where owner rank `rank`'s piece of (layer, plane, block) sits in the reader's descriptor list."""
    return (((layer * 2 + plane) * cfg.blocks() + block) * cfg.owner_tp + rank) * len(cfg.pieces()) + piece


def owner_descs(cfg: W.Config, regions: Sequence[Any]) -> np.ndarray:
    """(addr, len, device) per (layer, plane, block, piece), in remote_index order."""
    n, pieces = cfg.blocks(), cfg.pieces()
    out = np.zeros((cfg.num_layers * 2 * n * len(pieces), 3), dtype=np.uint64)
    for layer, region in enumerate(regions):
        base, dev = W.addr(region), device_id(region)
        for plane in range(2):
            for b in range(n):
                for i, (_, off, size) in enumerate(pieces):
                    out[remote_index(cfg, layer, plane, b, i)] = (base + W.remote_offset(cfg, plane, b) + off, size, dev)
    return out


def reader_descs(cfg: W.Config, regions: Sequence[Any]) -> np.ndarray:
    """(addr, len, device) per (layer, plane, block, owner rank, piece), in local_index order."""
    n, pieces = cfg.blocks(), cfg.pieces()
    out = np.zeros((cfg.num_layers * 2 * n * cfg.owner_tp * len(pieces), 3), dtype=np.uint64)
    for layer, region in enumerate(regions):
        base, dev = W.addr(region), device_id(region)
        for plane in range(2):
            for b in range(n):
                for r in range(cfg.owner_tp):
                    for i, (off, _, size) in enumerate(pieces):
                        out[local_index(cfg, layer, plane, b, r, i)] = (base + W.local_offset(cfg, plane, b, r) + off, size, dev)
    return out


# --- the reader -------------------------------------------------------------------


class Reader:
    def __init__(self, cfg: W.Config, regions: List[Any], mds: List[bytes]) -> None:
        self.cfg = cfg
        self.regions = regions
        opt = options(cfg)
        self.log = ucx_log_to(cfg, "reader")
        self.agent = make_agent("kvx-bench-reader-%d" % os.getpid(), opt)
        self.reg = register(self.agent, cfg, regions)
        owners = [pickle.loads(md) for md in mds]
        self.names = [self.agent.add_remote_agent(o["agent"]) for o in owners]
        self.names = [n.decode() if isinstance(n, bytes) else n for n in self.names]
        for o in owners:
            if o.get("pieces") != len(cfg.pieces()):
                raise ValueError("owner rank %d describes %s pieces per block, the reader %d" % (o["rank"], o.get("pieces"), len(cfg.pieces())))
            if o["blocks"] != cfg.blocks() or o["block_bytes"] != cfg.block_bytes or o["layers"] != cfg.num_layers:
                raise ValueError("owner rank %d has %d blocks x %d bytes x %d layers, the reader %d x %d x %d" % (
                    o["rank"], o["blocks"], o["block_bytes"], o["layers"], cfg.blocks(), cfg.block_bytes, cfg.num_layers))
        mt = mem_type(cfg)
        self.local = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", reader_descs(cfg, regions), mt, backends=[BACKEND])
        self.remote = [self.agent.prep_xfer_dlist(name, o["descs"], mt, backends=[BACKEND])
                       for name, o in zip(self.names, owners)]
        # Connect now, so UCX has printed the endpoints' transports before run_reader asks.
        for name in self.names:
            self.agent.make_connection(name, backends=[BACKEND])
        self.transport = self.wait_transport()
        self.version = version(opt)
        # in flight: xfer handle -> (request id, owner rank); transfers left per request
        self.xfers: Dict[Any, Tuple[int, int]] = {}
        self.left: Dict[int, int] = {}
        self.failed: List[Tuple[int, str]] = []

    def wait_transport(self) -> str:
        t0 = time.monotonic()
        while True:
            t = transports_in(self.log)
            if t != "ucx:unknown" or self.log is None or time.monotonic() - t0 > 1.0:
                return t
            time.sleep(0.01)

    def indices(self, local: Sequence[int], remote: Sequence[int], rank: int) -> Tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        li, ri = [], []
        npieces = len(cfg.pieces())
        for layer in range(cfg.num_layers):
            for plane in range(2):
                for lb, rb in zip(local, remote):
                    for i in range(npieces):
                        li.append(local_index(cfg, layer, plane, lb, rank, i))
                        ri.append(remote_index(cfg, layer, plane, rb, i))
        return np.array(li, dtype=np.int32), np.array(ri, dtype=np.int32)

    def post(self, rid: int, local: List[int], remote: List[int]) -> None:
        self.left[rid] = self.cfg.owner_tp
        for rank in range(self.cfg.owner_tp):
            li, ri = self.indices(local, remote, rank)
            try:
                h = self.agent.make_prepped_xfer("READ", self.local, li, self.remote[rank], ri,
                                                 notif_msg=(NOTIF_FMT % (rid, rank)).encode(), backends=[BACKEND])
            except Exception as e:
                self.failed.append((rid, "make_prepped_xfer to owner rank %d: %s: %s" % (rank, type(e).__name__, e)))
                continue
            try:
                state = self.agent.transfer(h)
            except Exception as e:
                state = "ERR (%s: %s)" % (type(e).__name__, e)
            if state.startswith("ERR"):
                self.failed.append((rid, "transfer() to owner rank %d (%s) returned %s" % (rank, self.names[rank], state)))
                self.release(h)
                continue
            self.xfers[h] = (rid, rank)

    def release(self, h: Any) -> Optional[str]:
        try:
            self.agent.release_xfer_handle(h)
            return None
        except Exception as e:
            return "%s: %s" % (type(e).__name__, e)

    def completed(self) -> List[Tuple[int, Optional[str]]]:
        out: List[Tuple[int, Optional[str]]] = []
        for rid, err in self.failed:
            if self.left.pop(rid, None) is not None:
                out.append((rid, err))
        self.failed.clear()
        for h, (rid, rank) in list(self.xfers.items()):
            try:
                state = self.agent.check_xfer_state(h)
            except Exception as e:
                state = "ERR (%s: %s)" % (type(e).__name__, e)
            if state == "PROC":
                continue
            del self.xfers[h]
            rel = self.release(h)
            if rid not in self.left:
                continue  # this request already failed through another rank
            if state != "DONE":
                del self.left[rid]
                out.append((rid, "check_xfer_state of the READ from owner rank %d (%s): %s%s" % (
                    rank, self.names[rank], state, "; release: " + rel if rel else "")))
                continue
            self.left[rid] -= 1
            if self.left[rid] == 0:
                del self.left[rid]
                out.append((rid, None))
        if not out and self.xfers:
            time.sleep(0.0005)  # the progress thread moves the bytes meanwhile
        return out

    def close(self) -> None:
        # Releasing a READ that is still in progress returns success, yet its bytes keep
        # landing in the local buffer afterwards (into freed memory once the regions go,
        # which crashes the progress thread). So wait for every transfer to end first.
        t_end = time.monotonic() + DRAIN_S
        while self.xfers and time.monotonic() < t_end:
            for h in list(self.xfers):
                try:
                    state = self.agent.check_xfer_state(h)
                except Exception:
                    state = "ERR"
                if state != "PROC":
                    del self.xfers[h]
                    self.release(h)
            time.sleep(0.001)
        if self.xfers:
            # Neither released nor freed: this process ends soon, with them in flight.
            LEFT_IN_FLIGHT.append((self.agent, self.regions, list(self.xfers)))
            raise RuntimeError("%d READs still in progress %.0f s after the run ended; left unreleased, "
                               "their buffers kept" % (len(self.xfers), DRAIN_S))
        for d in [self.local] + self.remote:
            d.release()
        for name in self.names:
            self.agent.remove_remote_agent(name)
        self.agent.deregister_memory(self.reg, backends=[BACKEND])


# --- the owner --------------------------------------------------------------------


def owner(cfg: W.Config, rank: int) -> int:
    meter = W.Meter()
    regions = W.owner_regions(cfg, rank)
    opt = options(cfg)
    log = ucx_log_to(cfg, "owner%d" % rank)
    agent = make_agent("kvx-bench-owner%d-%d" % (rank, os.getpid()), opt)
    reg = register(agent, cfg, regions)
    ver = version(opt)
    md = pickle.dumps({"agent": agent.get_agent_metadata(), "rank": rank, "version": ver, "blocks": cfg.blocks(),
                       "block_bytes": cfg.block_bytes, "layers": cfg.num_layers, "pieces": len(cfg.pieces()),
                       "descs": owner_descs(cfg, regions)})
    notifs = {"count": 0, "others": 0}

    def progress() -> None:
        for msgs in agent.get_new_notifs().values():
            for m in msgs:
                notifs["count" if m.startswith(b"kvx-bench:") else "others"] += 1
        time.sleep(0.001)

    def on_report(rep: W.Report) -> None:
        progress()  # the last transfers' notifications may have come after the reader finished
        rep.transport = transports_in(log)
        rep.extra["notifications"] = notifs["count"]
        if notifs["others"]:
            rep.extra["unknown_notifications"] = notifs["others"]

    W.serve_owner(cfg, rank, "nixl", md, meter, version=ver, progress=progress, on_report=on_report)
    agent.deregister_memory(reg, backends=[BACKEND])
    return 0


if __name__ == "__main__":
    c, a = W.parse()
    rc = owner(c, a.rank) if a.role == "owner" else W.run_reader(c, Reader)
    # Skip the C library destructors: with the wheel's bundled libnl-route-3 loaded beside the
    # system's (through libibverbs), every process that registered memory crashes in
    # rtnl_tc_unregister at exit, after its work is done and reported.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
