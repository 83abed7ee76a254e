"""Mooncake's transfer engine in make bench-peers: the classic engine over
the protocol given as --backend ("tcp", the default; on GPU memory also
"nvlink_intra", its same-host CUDA IPC path), peers found by the P2P handshake (metadata server
"P2PHANDSHAKE", no etcd). Each owner rank registers its layer regions and
publishes its session name (host:rpc_port) and the regions' addresses. The
reader registers its regions and, per request and owner rank, submits one
batch_transfer_async_read with one entry per contiguous copy (runs of
blocks merged where both sides are contiguous).

The Python binding has no non-blocking status call for a batch:
get_batch_transfer_status blocks (spinning, GIL released) until its
batches finish, fail or time out, and transfer_check_status looks at a
batch's first entry only. So one waiter thread waits on the submitted
batches in order and hands finished ones to completed(), which itself
waits a few milliseconds at most."""
from __future__ import annotations

import importlib.metadata
import json
import os
import queue
import sys
import threading
from typing import Any, Dict, List, Optional, Tuple

import workload as W

PROTOCOL = "tcp"  # set from --backend
ENGINE_IN_USE = False  # a thread is still inside the engine: exit without destroying it
# The INFO log prints a line per finished batch ("Batch Transfer completed!").
os.environ.setdefault("MC_LOG_LEVEL", "WARNING")

try:
    import mooncake.engine as mc_engine
except ImportError as e:  # the CUDA wheels need libcudart.so.12 and libcuda.so.1 even for host memory
    mc_engine = None
    IMPORT_ERROR = "cannot import mooncake.engine: %s" % e
else:
    IMPORT_ERROR = ""


def host() -> str:
    return os.environ.get("KVX_PEERS_HOST") or os.environ.get("MC_BENCH_HOST", "127.0.0.1")


def version() -> str:
    """The distribution that provides the imported engine: the CUDA and non-CUDA wheels differ in name."""
    loaded = os.path.realpath(mc_engine.__file__) if mc_engine else ""
    for d in importlib.metadata.distributions():
        name = d.metadata["Name"] or ""
        if name.startswith("mooncake-transfer-engine") and loaded and \
                os.path.realpath(str(d.locate_file("mooncake/" + os.path.basename(loaded)))) == loaded:
            return "%s %s" % (name, d.version)
    return "mooncake-transfer-engine (version unknown)"


def transport() -> str:
    return "mooncake %s (P2PHANDSHAKE; batch_transfer_async_read, one waiter thread on get_batch_transfer_status)" % PROTOCOL


def start_engine() -> Any:
    if mc_engine is None:
        raise RuntimeError(IMPORT_ERROR)
    eng = mc_engine.TransferEngine()
    rc = eng.initialize(host(), "P2PHANDSHAKE", PROTOCOL, "")
    if rc != 0:
        raise RuntimeError("TransferEngine.initialize(%r, 'P2PHANDSHAKE', %r, '') returned %d" % (host(), PROTOCOL, rc))
    return eng


def register(eng: Any, regions: List[Any]) -> None:
    addrs, lens = [W.addr(r) for r in regions], [W.nbytes(r) for r in regions]
    rc = eng.batch_register_memory(addrs, lens)
    if rc != 0:
        raise RuntimeError("batch_register_memory returned %d" % rc)


def merged(cfg: W.Config, local: List[int], remote: List[int]) -> Dict[int, List[Tuple[int, int, int, int]]]:
    """Per owner rank, the request's copies as (layer, local offset, remote
    offset, bytes), runs merged where both sides are contiguous."""
    out: Dict[int, List[Tuple[int, int, int, int]]] = {r: [] for r in range(cfg.owner_tp)}
    for rank, layer, lo, ro, n in sorted(W.copies(cfg, local, remote)):
        runs = out[rank]
        if runs and runs[-1][0] == layer and runs[-1][1] + runs[-1][3] == lo and runs[-1][2] + runs[-1][3] == ro:
            runs[-1] = (layer, runs[-1][1], runs[-1][2], runs[-1][3] + n)
        else:
            runs.append((layer, lo, ro, n))
    return out


def size_queue(cfg: W.Config) -> int:
    """The TCP transport rejects a peer's transfers beyond 1024 queued plus
    1024 waiting for admission (the batch then fails); size the queue to the
    window: inflight requests of B x L x 2 entries each per owner rank."""
    want = cfg.inflight * cfg.blocks_per_request * cfg.num_layers * 2 * len(cfg.pieces())
    os.environ.setdefault("MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER", str(min(65535, max(1024, want))))
    return int(os.environ["MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER"])


class Reader:
    def __init__(self, cfg: W.Config, regions: List[Any], mds: List[bytes]) -> None:
        self.cfg = cfg
        queued = size_queue(cfg)  # read when the transport starts
        self.eng = start_engine()
        self.regions = regions
        register(self.eng, regions)
        self.base = [W.addr(r) for r in regions]
        self.peers = [json.loads(md) for md in mds]
        self.transport, self.version = "%s; queue %d per peer" % (transport(), queued), version()
        self.left: Dict[int, int] = {}  # request -> owner ranks not finished yet
        self.todo: "queue.Queue[Optional[Tuple[int, int, str]]]" = queue.Queue()
        self.done: "queue.Queue[Tuple[int, Optional[str]]]" = queue.Queue()
        self.waiter = threading.Thread(target=self.wait_loop, name="mooncake-waiter", daemon=True)
        self.waiter.start()

    def post(self, rid: int, local: List[int], remote: List[int]) -> None:
        self.left[rid] = self.cfg.owner_tp
        for rank, runs in merged(self.cfg, local, remote).items():
            peer = self.peers[rank]
            lo = [self.base[layer] + off for layer, off, _, _ in runs]
            ro = [peer["regions"][layer] + off for layer, _, off, _ in runs]
            lens = [n for _, _, _, n in runs]
            bid = self.eng.batch_transfer_async_read(peer["session"], lo, ro, lens)
            if bid == 0:  # the documented failure value (the peer could not be opened, or submit failed)
                self.done.put((rid, "batch_transfer_async_read from %s returned 0" % peer["session"]))
            else:
                self.todo.put((rid, bid, peer["session"]))

    def wait_loop(self) -> None:
        while True:
            item = self.todo.get()
            if item is None:
                return
            rid, bid, session = item
            rc = self.eng.get_batch_transfer_status([bid])  # frees the batch id, done or failed
            self.done.put((rid, None if rc == 0 else "get_batch_transfer_status: %d (read from %s failed or timed out)" % (rc, session)))

    def completed(self) -> List[Tuple[int, Optional[str]]]:
        out: List[Tuple[int, Optional[str]]] = []
        try:
            got = [self.done.get(timeout=0.005)]
        except queue.Empty:
            return out
        while True:
            try:
                got.append(self.done.get_nowait())
            except queue.Empty:
                break
        for rid, err in got:
            if rid not in self.left:  # already reported as failed
                continue
            if err:
                del self.left[rid]
                out.append((rid, err))
                continue
            self.left[rid] -= 1
            if self.left[rid] == 0:
                del self.left[rid]
                out.append((rid, None))
        return out

    def close(self) -> None:
        global ENGINE_IN_USE
        self.todo.put(None)
        # after a peer fails, its queued batches fail within about a second
        self.waiter.join(timeout=2.0)
        if self.waiter.is_alive():
            # still inside get_batch_transfer_status: unregistering or
            # destroying the engine under it would be a use after free
            ENGINE_IN_USE = True
            raise RuntimeError("a batch was still in flight 2 s after close; engine left as it is")
        self.eng.batch_unregister_memory(self.base)


def owner(cfg: W.Config, rank: int) -> int:
    meter = W.Meter()
    regions = W.owner_regions(cfg, rank)
    try:
        eng = start_engine()
        register(eng, regions)
    except RuntimeError as e:
        return unusable(cfg, "owner", rank, str(e))
    md = {"session": "%s:%d" % (host(), eng.get_rpc_port()), "regions": [W.addr(r) for r in regions]}
    W.serve_owner(cfg, rank, "mooncake", json.dumps(md).encode(), meter, transport=transport(), version=version())
    eng.batch_unregister_memory([W.addr(r) for r in regions])
    return 0


def unusable(cfg: W.Config, role: str, rank: int, error: str) -> int:
    """A process whose engine cannot start reports why at once (a reader
    without the engine does not wait for owners until the deadline)."""
    W.write_report(cfg, W.Report(role, "mooncake", rank, ok=False, error=error, transport=transport()))
    if role == "reader":
        W.put(cfg, "reader.done", b"")
    print(error, file=sys.stderr)
    return 1


if __name__ == "__main__":
    c, a = W.parse()
    PROTOCOL = c.backend or PROTOCOL
    if PROTOCOL.startswith("nvlink"):
        os.environ.setdefault("MC_INTRANODE_NVLINK", "1")  # the engine picks its intra-node NVLink transport by this
    if IMPORT_ERROR:
        sys.exit(unusable(c, a.role, a.rank, IMPORT_ERROR))
    rc = owner(c, a.rank) if a.role == "owner" else W.run_reader(c, Reader)
    if ENGINE_IN_USE:
        # the engine's destructor aborts ("terminate called without an active
        # exception") under a thread still waiting in it; the report is written
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)
