"""The pieces of a KV connector, split the way vLLM's NixlConnector is split,
with kvx doing the reads.

Prefill side
    PrefillScheduler   (the prefill server's main process) owns the block
                       pool: admits requests, hands block ids to its workers,
                       answers the decode side with the request's block ids,
                       and frees a request's blocks once every decode rank
                       that reads them has notified, or once the lease ran out.
    prefill_worker_main  one process per prefill TP rank: holds that rank's KV
                       heads of every layer, registered with kvx; runs the fake
                       model into the blocks it is given; declares the
                       notifications it expects (ctx.expect, with the lease as
                       the deadline); forwards what ctx.notifications() says.
Decode side
    DecodeScheduler    (the decode client's main process) owns its own block
                       pool: allocates local blocks, asks the prefill side for
                       each request, hands (local, remote) block pairs to its
                       workers, frees the local blocks when they are done.
    decode_worker_main  one process per decode TP rank: adds every prefill rank
                       as a kvx peer, posts one read per request per prefill
                       rank whose heads overlap its own, learns completions
                       with q.poll(), and checks every byte it received
                       against the fake model.
Side channel
    TCP on 127.0.0.1 through multiprocessing.connection (HMAC handshake with
    an authkey, then pickled dicts that each carry an "op"). kvx itself ships
    no metadata: the side channel carries ctx.metadata() of every prefill rank.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import queue
import random
import signal
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.connection import wait as _wait
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple, cast

import torch

import kvx

DEFAULT_PORT = 5577
DEFAULT_LEASE_MS = 2000
# A notify id names one (request, decode rank): req_id * NOTIFY_STRIDE + rank.
NOTIFY_STRIDE = 1024
DTYPES: Dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Values are compared as raw bits (an integer view of the same width), so
# that a check never depends on float comparison rules.
_BITS: Dict[int, torch.dtype] = {2: torch.int16, 4: torch.int32}
# kvx's status of an expectation that ran out (kvx.TimeoutError's code).
EXPIRED = kvx.TimeoutError.status


def wait(conns: Sequence[Connection], timeout_s: float) -> List[Connection]:
    """The connections among conns with something to read (or closed)."""
    return cast(List[Connection], _wait(conns, timeout_s))


def say(*parts: Any) -> None:
    """Print a line in one write and flush it: the output goes to pipes and
    logs shared with other processes, and a run that fails should still show
    everything up to the failure."""
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def notify_id(req_id: int, decode_rank: int) -> int:
    return req_id * NOTIFY_STRIDE + decode_rank


# --- the model's shape -----------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """What both sides must agree on for their caches to fit together."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    block_size: int
    layout: str  # "NHD" or "HND" (vLLM's names)
    dtype: str  # a key of DTYPES
    device: str  # "cpu" or "cuda"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def heads(self, rank: int, tp: int) -> Tuple[int, int]:
        """(first global head, count) of the KV heads TP rank `rank` of `tp`
        holds. With fewer heads than ranks every rank holds one whole head
        (replicated), as vLLM does."""
        return rank * self.num_kv_heads // tp, max(self.num_kv_heads // tp, 1)

    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def cache_shape(self, num_blocks: int, heads: int) -> Tuple[int, ...]:
        if self.layout == "NHD":
            return (2, num_blocks, self.block_size, heads, self.head_size)
        return (2, num_blocks, heads, self.block_size, self.head_size)


def config_from_args(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(num_layers=args.num_layers, num_kv_heads=args.num_kv_heads, head_size=args.head_size,
                       block_size=args.block_size, layout=args.layout, dtype=args.dtype, device=args.device)


# --- the block pool --------------------------------------------------------------


class BlockPool:
    """The free block ids of one KV cache. Ids are taken at random from the
    free set, so a request's blocks are scattered as in an engine that has run
    for a while: the reads cannot count on consecutive ids."""

    def __init__(self, num_blocks: int, seed: int) -> None:
        self.num_blocks = num_blocks
        self._free: List[int] = list(range(num_blocks))
        self._used: Set[int] = set()
        self._rng = random.Random(seed)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> Optional[List[int]]:
        """n block ids, or None when fewer are free (the caller waits)."""
        if n > len(self._free):
            return None
        out: List[int] = []
        for _ in range(n):
            i = self._rng.randrange(len(self._free))
            self._free[i], self._free[-1] = self._free[-1], self._free[i]
            out.append(self._free.pop())
        self._used.update(out)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise RuntimeError("block %d freed but not allocated" % b)
            self._used.remove(b)
            self._free.append(b)


# --- the fake model --------------------------------------------------------------

_P = 2_147_483_647  # a prime below 2**31: the squares below stay inside int64


def fake_kv(cfg: ModelConfig, req_id: int, layer: int, num_tokens: int, head_first: int, head_count: int,
            device: torch.device) -> torch.Tensor:
    """K and V of one layer for positions [0, num_tokens) and global heads
    [head_first, head_first + head_count): shape [2, num_tokens, heads, head_size].

    Each value is a function of (request, layer, K/V, position, global head,
    dim): a linear mix taken through two rounds of squaring modulo a prime,
    folded to an integer in [-125, 125], which float16, bfloat16 and float32
    all hold exactly. A reader recomputes the bytes of exactly the heads it
    holds, wherever their blocks sit."""
    i64: Dict[str, Any] = {"dtype": torch.int64, "device": device}
    kv = torch.arange(2, **i64).view(2, 1, 1, 1)
    pos = torch.arange(num_tokens, **i64).view(1, -1, 1, 1)
    head = torch.arange(head_first, head_first + head_count, **i64).view(1, 1, -1, 1)
    dim = torch.arange(cfg.head_size, **i64).view(1, 1, 1, -1)
    base = (req_id * 7919 + layer * 104729 + 12345) % _P
    x = (kv * 1299709 + pos * 15485863 + head * 32452843 + dim * 49979687 + base) % _P
    x = (x * x + 1) % _P
    x = (x * x + 7) % _P
    return (x % 251 - 125).to(cfg.torch_dtype)


def _in_block_layout(cfg: ModelConfig, kv: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """[2, tokens, heads, dim] as [2, blocks, ...one block in the cache's layout]."""
    x = kv.view(2, num_blocks, cfg.block_size, kv.shape[2], cfg.head_size)
    return x if cfg.layout == "NHD" else x.permute(0, 1, 3, 2, 4)


def write_request(cfg: ModelConfig, caches: Sequence[torch.Tensor], req_id: int, blocks: Sequence[int],
                  head_first: int, head_count: int) -> None:
    """The prefill forward pass of the fake model: every layer's K and V of
    the request, whole blocks (the tail of the last block too, so that a
    reader can check every byte it reads)."""
    device = caches[0].device
    idx = torch.tensor(list(blocks), dtype=torch.long, device=device)
    n = len(blocks) * cfg.block_size
    for layer, cache in enumerate(caches):
        cache[:, idx] = _in_block_layout(cfg, fake_kv(cfg, req_id, layer, n, head_first, head_count, device), len(blocks))


def check_request(cfg: ModelConfig, caches: Sequence[torch.Tensor], req_id: int, local_blocks: Sequence[int],
                  remote_blocks: Sequence[int], head_first: int, head_count: int) -> Optional[str]:
    """Compare every byte of the request's local blocks, every layer, K and V,
    with the fake model for the heads this rank holds. The comparison runs
    where the cache is (on the GPU for CUDA caches); only the verdict, and on
    a mismatch the first wrong element, come back to the host. None: all equal."""
    device = caches[0].device
    bits = _BITS[cfg.elem_bytes]
    idx = torch.tensor(list(local_blocks), dtype=torch.long, device=device)
    nb = len(local_blocks)
    for layer, cache in enumerate(caches):
        got = cache[:, idx].contiguous()
        want = _in_block_layout(cfg, fake_kv(cfg, req_id, layer, nb * cfg.block_size, head_first, head_count, device),
                                nb).contiguous()
        bad = got.view(bits) != want.view(bits)
        if not bool(bad.any()):  # one device-to-host copy per layer
            continue
        first = int(bad.reshape(-1).nonzero()[0].item())
        per_block = bad[0, 0].numel()
        plane, rest = divmod(first, nb * per_block)
        j, elem = divmod(rest, per_block)
        # the element's place in the block, in the cache's own order
        if cfg.layout == "NHD":
            tok, rest2 = divmod(elem, head_count * cfg.head_size)
            h, d = divmod(rest2, cfg.head_size)
        else:
            h, rest2 = divmod(elem, cfg.block_size * cfg.head_size)
            tok, d = divmod(rest2, cfg.head_size)
        mask = (1 << (8 * cfg.elem_bytes)) - 1
        g, w = got.reshape(-1)[first], want.reshape(-1)[first]
        gb, wb = int(got.view(bits).reshape(-1)[first].item()) & mask, int(want.view(bits).reshape(-1)[first].item()) & mask
        return ("first wrong byte: request %d, layer %d, %s of local block %d (remote block %d, block %d of the "
                "request), byte offset %d (token %d, head %d, dim %d), expected %g (0x%0*x), got %g (0x%0*x)"
                % (req_id, layer, "KV"[plane], local_blocks[j], remote_blocks[j], j, elem * cfg.elem_bytes,
                   j * cfg.block_size + tok, head_first + h, d, float(w.item()), 2 * cfg.elem_bytes, wb,
                   float(g.item()), 2 * cfg.elem_bytes, gb))
    return None


# --- devices ---------------------------------------------------------------------


def pick_device(kind: str, rank: int, gpu_offset: int) -> torch.device:
    """cpu, or GPU (rank + offset) % count, made the current device (kvx's
    CUDA context drives the device of its caches)."""
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda: torch sees no GPU here")
    if not kvx.cuda_available():
        raise RuntimeError("--device cuda: the kvx library loaded (%s) has no CUDA backend" % kvx.library_path())
    dev = torch.device("cuda", (rank + gpu_offset) % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    return dev


def kvx_backend(kind: str) -> Optional[str]:
    """GPU caches read over CUDA IPC; host caches over the default backend
    (UCX here)."""
    return "cuda" if kind == "cuda" else None


def make_caches(cfg: ModelConfig, num_blocks: int, heads: int, device: torch.device) -> List[torch.Tensor]:
    """One tensor per layer, as an engine allocates its KV cache."""
    return [torch.zeros(cfg.cache_shape(num_blocks, heads), dtype=cfg.torch_dtype, device=device)
            for _ in range(cfg.num_layers)]


# --- processes -------------------------------------------------------------------


class WorkerFailed(RuntimeError):
    """A worker process reported an error, died, or did not answer in time."""


def _worker_setup() -> None:
    # Ctrl-C reaches the whole process group: let the scheduler stop its
    # workers in order. Several processes share the CPUs: one torch thread each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


def _report_crash(conn: Connection, side: str, rank: int, exc: BaseException) -> None:
    text = "%s rank %d: %s: %s" % (side, rank, type(exc).__name__, exc)
    traceback.print_exc()
    try:
        conn.send({"op": "error", "rank": rank, "text": text})
    except (OSError, ValueError):
        pass


class WorkerGroup:
    """One spawned process per TP rank, each with a pipe to the scheduler.
    Spawn, not fork: a fresh interpreter per rank, as CUDA requires."""

    def __init__(self, name: str, target: Callable[..., None], args_of_rank: Callable[[int], Tuple[Any, ...]],
                 size: int) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        self.conns: List[Connection] = []
        self.procs: List[Any] = []
        self._stopped = False
        for rank in range(size):
            parent, child = ctx.Pipe()
            # daemon: stopped when the scheduler exits; a scheduler killed outright
            # leaves its workers an EOF on the pipe, on which they exit
            p = ctx.Process(target=target, args=(child,) + args_of_rank(rank), name="%s-%d" % (name, rank), daemon=True)
            p.start()
            child.close()  # so that the parent sees EOF when the worker dies
            self.conns.append(parent)
            self.procs.append(p)

    def rank_of(self, conn: Connection) -> int:
        return self.conns.index(conn)

    def recv(self, conn: Connection) -> Dict[str, Any]:
        """One message of a worker; a worker's error or death raises."""
        rank = self.rank_of(conn)
        try:
            msg: Dict[str, Any] = conn.recv()
        except (EOFError, OSError):
            self.procs[rank].join(1)
            raise WorkerFailed("%s rank %d exited (exit code %s)" % (self.name, rank, self.procs[rank].exitcode))
        if msg.get("op") == "error":
            raise WorkerFailed(msg["text"])
        return msg

    def gather(self, op: str, timeout_s: float) -> List[Dict[str, Any]]:
        """The message `op` from every rank, in rank order."""
        got: Dict[int, Dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < len(self.conns):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(len(self.conns))) - set(got))
                raise WorkerFailed("%s ranks %s did not send %r within %.0f s" % (self.name, missing, op, timeout_s))
            for conn in wait([c for i, c in enumerate(self.conns) if i not in got], min(left, 0.5)):
                msg = self.recv(conn)
                if msg.get("op") != op:
                    raise WorkerFailed("%s rank %d sent %r while %r was awaited" % (self.name, self.rank_of(conn), msg.get("op"), op))
                got[self.rank_of(conn)] = msg
        return [got[r] for r in range(len(self.conns))]

    def stop(self, timeout_s: float = 10.0) -> Dict[int, Dict[str, Any]]:
        """Ask every worker to stop; returns the ranks' last words ("bye"
        messages, with their kvx stats). Whatever does not stop in time is
        terminated, then killed. Safe to call twice."""
        byes: Dict[int, Dict[str, Any]] = {}
        if self._stopped:
            return byes
        self._stopped = True
        for conn in self.conns:
            try:
                conn.send({"op": "stop"})
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout_s
        open_conns = list(self.conns)
        while open_conns and time.monotonic() < deadline:
            for conn in wait(open_conns, 0.2):
                rank = self.rank_of(conn)
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    open_conns.remove(conn)
                    continue
                if msg.get("op") == "bye":
                    byes[rank] = msg
                    open_conns.remove(conn)
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(3)
            if p.is_alive():
                p.kill()
                p.join(3)
        for conn in self.conns:
            conn.close()
        return byes

    def exit_codes(self) -> List[Optional[int]]:
        return [p.exitcode for p in self.procs]


# --- the side channel ------------------------------------------------------------


class SideChannelServer:
    """Accepts decode schedulers on 127.0.0.1. A thread accepts (and runs the
    authkey handshake), so the scheduler's loop never blocks on a client."""

    def __init__(self, port: int, authkey: bytes) -> None:
        self._listener = Listener(("127.0.0.1", port), authkey=authkey)
        self.port: int = cast(Tuple[str, int], self._listener.address)[1]
        self._new: "queue.Queue[Connection]" = queue.Queue()
        self._closed = False
        threading.Thread(target=self._accept, name="side-channel-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                self._new.put(self._listener.accept())
            except (mp.AuthenticationError, EOFError, ConnectionError):
                time.sleep(0.05)  # a client with the wrong key, or one that hung up: keep serving
            except OSError:
                return  # the listener is closed

    def new_connections(self) -> List[Connection]:
        out: List[Connection] = []
        while True:
            try:
                out.append(self._new.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._closed = True
        self._listener.close()


def connect(port: int, authkey: bytes, timeout_s: float) -> Connection:
    """The decode scheduler's end of the side channel; retries while the
    server is still starting."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return Client(("127.0.0.1", port), authkey=authkey)
        except mp.AuthenticationError as e:
            raise ConnectionError("the side channel on 127.0.0.1:%d refused this client (%s): is --authkey the server's?"
                                  % (port, e)) from None
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise ConnectionRefusedError("no prefill server listens on 127.0.0.1:%d (waited %.0f s)" % (port, timeout_s))
            time.sleep(0.1)


def call(conn: Connection, msg: Dict[str, Any], want: str, timeout_s: float) -> Dict[str, Any]:
    """Send and wait for the reply `want` (used when nothing else is in flight)."""
    conn.send(msg)
    if not conn.poll(timeout_s):
        raise TimeoutError("the prefill server did not answer %r within %.0f s" % (msg["op"], timeout_s))
    reply: Dict[str, Any] = conn.recv()
    if reply.get("op") == "error":
        raise RuntimeError("the prefill server refused %r: %s" % (msg["op"], reply.get("text")))
    if reply.get("op") != want:
        raise RuntimeError("the prefill server answered %r with %r" % (msg["op"], reply.get("op")))
    return reply


# --- prefill: worker side --------------------------------------------------------


def prefill_worker_main(conn: Connection, rank: int, tp: int, cfg: ModelConfig, num_blocks: int,
                        gpu_offset: int) -> None:
    """One prefill TP rank: registers its KV cache, runs the fake model into
    the blocks the scheduler names, expects one notification per decode rank
    that will read them, and forwards every notification kvx delivers."""
    try:
        _worker_setup()
        device = pick_device(cfg.device, rank, gpu_offset)
        head_first, head_count = cfg.heads(rank, tp)
        caches = make_caches(cfg, num_blocks, head_count, device)
        # progress_thread (the default): over TCP, the owner's progress serves the reads
        with kvx.Context("prefill", tp_rank=rank, tp_size=tp, backend=kvx_backend(cfg.device)) as ctx:
            # block generations: a read that expects a block's old generation
            # fails (StaleError) instead of returning the next request's KV
            cache = ctx.register_cache(caches, layout=cfg.layout, total_heads=cfg.num_kv_heads, generations=True)
            conn.send({"op": "up", "rank": rank, "metadata": ctx.metadata(), "heads": (head_first, head_count)})
            while True:
                if conn.poll(0.005):
                    while conn.poll(0):
                        msg = conn.recv()
                        if msg["op"] == "stop":
                            conn.send({"op": "bye", "rank": rank, "stats": ctx.stats()})
                            return
                        if msg["op"] == "prefill":
                            # the blocks go to a new request: retired before they are written
                            cache.retire(msg["blocks"])
                            write_request(cfg, caches, msg["req_id"], msg["blocks"], head_first, head_count)
                            if device.type == "cuda":
                                # the blocks must hold the KV before any reader may see them
                                torch.cuda.synchronize(device)
                            # the lease: each reader's notification, or an expiry, comes
                            # exactly once; an expiry retires the blocks, so a reader that
                            # comes later is refused, never served what they hold next
                            for nid in msg["notify_ids"]:
                                ctx.expect(nid, msg["lease_ms"], retire=(cache, msg["blocks"]))
                            conn.send({"op": "ready", "rank": rank, "req_id": msg["req_id"],
                                       "generations": cache.generations(msg["blocks"])})
                notes = ctx.notifications()
                if notes:
                    conn.send({"op": "notes", "rank": rank, "notes": [(n.id, n.status, n.reader_rank) for n in notes]})
    except (EOFError, BrokenPipeError):
        return  # the scheduler went away: nothing left to serve
    except BaseException as e:
        _report_crash(conn, "prefill", rank, e)
        sys.exit(1)


# --- prefill: scheduler side -----------------------------------------------------


@dataclass
class PrefillRequest:
    req_id: int
    num_tokens: int
    blocks: List[int]
    client: Connection
    waiting_ready: Set[int]  # prefill ranks still running the model
    generations: Dict[int, List[int]]  # prefill rank -> its generation of each block, sent with the ids
    expected: Set[Tuple[int, int]]  # (prefill rank, notify id) not yet notified nor expired
    expired: int = 0


@dataclass
class PrefillCounters:
    requests_admitted: int = 0
    requests_refused: int = 0
    notes_ok: int = 0  # a reader notified
    notes_expired: int = 0  # a lease ran out
    notes_failed: int = 0  # any other status
    notes_unexpected: int = 0  # for no request in flight, or not expected from that rank
    notes_wrong_rank: int = 0  # the reader's rank is not the one the notify id names
    requests_freed_by_notification: int = 0
    blocks_freed_by_notification: int = 0
    requests_freed_by_expiry: int = 0
    blocks_freed_by_expiry: int = 0


class PrefillScheduler:
    """The prefill server's scheduler: one block table shared by its TP ranks
    (every rank holds the same block ids, each for its own heads), requests
    admitted as blocks are free, blocks freed by notification or lease."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, prefill_tp: int, lease_ms: int, workers: WorkerGroup,
                 metadata: List[bytes], seed: int, side_channel: SideChannelServer,
                 decode_tp: Optional[int] = None) -> None:
        self.cfg = cfg
        self.side_channel = side_channel
        self.pool = BlockPool(num_blocks, seed)
        self.prefill_tp = prefill_tp
        self.lease_ms = lease_ms
        self.workers = workers
        self.metadata = metadata
        self.decode_tp = decode_tp  # None: any decode TP
        self.readers: Dict[int, List[int]] = {}  # prefill rank -> decode ranks that read from it
        self.active: Dict[int, PrefillRequest] = {}
        self.waiting: Deque[Tuple[Connection, int, int]] = deque()  # (client, req_id, num_tokens) until blocks free
        self.counters = PrefillCounters()
        self.clients: List[Connection] = []
        self.last_activity = time.monotonic()
        self.shutdown = False

    # the side channel

    def add_client(self, conn: Connection) -> None:
        self.clients.append(conn)
        self.last_activity = time.monotonic()

    def _reply(self, conn: Connection, msg: Dict[str, Any]) -> None:
        if conn not in self.clients:
            return  # that decode went away; its requests run out by lease
        try:
            conn.send(msg)
        except (OSError, ValueError):
            self._drop_client(conn)

    def _drop_client(self, conn: Connection) -> None:
        if conn in self.clients:
            self.clients.remove(conn)
            conn.close()
        self.waiting = deque(w for w in self.waiting if w[0] is not conn)

    def config(self) -> Dict[str, Any]:
        return {"model": asdict(self.cfg), "num_blocks": self.pool.num_blocks, "prefill_tp": self.prefill_tp,
                "lease_ms": self.lease_ms, "decode_tp": self.decode_tp}

    def _on_client(self, conn: Connection, msg: Dict[str, Any]) -> None:
        self.last_activity = time.monotonic()
        op = msg.get("op")
        if op == "hello":
            self._reply(conn, {"op": "config", "config": self.config(), "metadata": self.metadata})
        elif op == "readers":
            dtp, sources = int(msg["decode_tp"]), msg["sources"]
            if self.decode_tp is not None and dtp != self.decode_tp:
                self._reply(conn, {"op": "error", "text": "this prefill server runs --decode-tp %d, the client %d" % (self.decode_tp, dtp)})
                return
            readers: Dict[int, List[int]] = {p: [] for p in range(self.prefill_tp)}
            for d, ps in sources.items():
                for p in ps:
                    if int(p) not in readers or not 0 <= int(d) < dtp:
                        self._reply(conn, {"op": "error", "text": "decode rank %s cannot read prefill rank %s" % (d, p)})
                        return
                    readers[int(p)].append(int(d))
            self.readers = {p: sorted(ds) for p, ds in readers.items()}
            self._reply(conn, {"op": "readers_ok", "readers": self.readers})
        elif op == "prefill":
            self._on_prefill(conn, int(msg["req_id"]), int(msg["num_tokens"]))
        elif op == "stats":
            self._reply(conn, {"op": "stats", "counters": asdict(self.counters), "free_blocks": self.pool.num_free,
                               "num_blocks": self.pool.num_blocks, "active": len(self.active), "waiting": len(self.waiting)})
        elif op == "shutdown":
            self._reply(conn, {"op": "bye"})
            self.shutdown = True
        else:
            self._reply(conn, {"op": "error", "text": "unknown op %r" % (op,)})

    def _on_prefill(self, conn: Connection, req_id: int, num_tokens: int) -> None:
        why = ""
        if not any(self.readers.values()):
            why = "no readers declared (send 'readers' first)"
        elif req_id < 0 or num_tokens <= 0:
            why = "req_id %d, %d tokens" % (req_id, num_tokens)
        elif self.cfg.blocks_for(num_tokens) > self.pool.num_blocks:
            why = "%d tokens need %d blocks, the pool has %d" % (num_tokens, self.cfg.blocks_for(num_tokens), self.pool.num_blocks)
        elif req_id in self.active or any(w[1] == req_id for w in self.waiting):
            why = "request %d is already in flight" % req_id
        if why:
            self.counters.requests_refused += 1
            self._reply(conn, {"op": "error", "req_id": req_id, "text": why})
            return
        self.waiting.append((conn, req_id, num_tokens))
        self._admit()

    def _admit(self) -> None:
        """Start waiting requests, in order, while the pool has their blocks."""
        while self.waiting:
            conn, req_id, num_tokens = self.waiting[0]
            blocks = self.pool.allocate(self.cfg.blocks_for(num_tokens))
            if blocks is None:
                return  # blocks come back by notification or lease
            self.waiting.popleft()
            expected = {(p, notify_id(req_id, d)) for p, ds in self.readers.items() for d in ds}
            self.active[req_id] = PrefillRequest(req_id, num_tokens, blocks, conn, set(range(self.prefill_tp)), {}, expected)
            self.counters.requests_admitted += 1
            for p, wconn in enumerate(self.workers.conns):
                wconn.send({"op": "prefill", "req_id": req_id, "num_tokens": num_tokens, "blocks": blocks,
                            "notify_ids": [notify_id(req_id, d) for d in self.readers[p]], "lease_ms": self.lease_ms})

    # the workers

    def _on_worker(self, rank: int, msg: Dict[str, Any]) -> None:
        op = msg.get("op")
        if op == "ready":
            req = self.active.get(msg["req_id"])
            if req is None:
                return
            req.waiting_ready.discard(rank)
            req.generations[rank] = list(msg["generations"])
            if not req.waiting_ready:
                # every rank holds the KV and expects its readers: hand out the blocks
                self._reply(req.client, {"op": "prefilled", "req_id": req.req_id, "blocks": req.blocks,
                                         "generations": req.generations, "lease_ms": self.lease_ms})
                self._maybe_free(req)
        elif op == "notes":
            for nid, status, reader_rank in msg["notes"]:
                self._on_note(rank, nid, status, reader_rank)
        else:
            raise WorkerFailed("prefill rank %d sent %r" % (rank, op))

    def _on_note(self, rank: int, nid: int, status: int, reader_rank: int) -> None:
        req_id, decode_rank = divmod(nid, NOTIFY_STRIDE)
        req = self.active.get(req_id)
        if req is None or (rank, nid) not in req.expected:
            self.counters.notes_unexpected += 1
            return
        req.expected.remove((rank, nid))
        if status == 0:
            self.counters.notes_ok += 1
            if reader_rank != decode_rank:
                self.counters.notes_wrong_rank += 1
        else:
            req.expired += 1
            if status == EXPIRED:
                self.counters.notes_expired += 1
            else:
                self.counters.notes_failed += 1
        self._maybe_free(req)

    def _maybe_free(self, req: PrefillRequest) -> None:
        """A request's blocks go back once every rank ran the model and every
        expected notification came or expired: no reader can still want them."""
        if req.waiting_ready or req.expected:
            return
        self.pool.free(req.blocks)
        del self.active[req.req_id]
        c = self.counters
        if req.expired:
            c.requests_freed_by_expiry += 1
            c.blocks_freed_by_expiry += len(req.blocks)
        else:
            c.requests_freed_by_notification += 1
            c.blocks_freed_by_notification += len(req.blocks)
        self._admit()

    # the loop

    def step(self, timeout_s: float) -> None:
        """Wait up to timeout_s for anything, and handle all of it."""
        for conn in self.side_channel.new_connections():
            self.add_client(conn)
        ready = wait(self.clients + self.workers.conns, timeout_s)
        for conn in ready:
            if conn in self.workers.conns:
                rank = self.workers.rank_of(conn)
                self._on_worker(rank, self.workers.recv(conn))
                continue
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                self._drop_client(conn)
                continue
            try:
                self._on_client(conn, msg)
            except (AttributeError, KeyError, TypeError, ValueError) as e:
                # a malformed message costs its sender an error, not the server its life
                self._reply(conn, {"op": "error", "text": "bad message %.200r: %s: %s" % (msg, type(e).__name__, e)})


# --- decode: worker side ---------------------------------------------------------


@dataclass
class _InFlight:
    """One request's reads on one decode rank."""

    req_id: int
    local: List[int]
    remote: List[int]
    generations: Dict[int, List[int]]  # prefill rank -> the generations it sent for remote
    first_post: float
    left: int = 0  # reads posted and not yet reported
    reads: int = 0
    nbytes: int = 0
    last_done: float = 0.0
    error: Optional[str] = None


def decode_worker_main(conn: Connection, rank: int, tp: int, cfg: ModelConfig, num_blocks: int,
                       prefill_metadata: List[bytes], read_timeout_ms: int, queue_depth: int, gpu_offset: int) -> None:
    """One decode TP rank: connects to every prefill rank, reads each request
    from the prefill ranks that hold its heads, checks every byte."""
    try:
        _worker_setup()
        device = pick_device(cfg.device, rank, gpu_offset)
        head_first, head_count = cfg.heads(rank, tp)
        caches = make_caches(cfg, num_blocks, head_count, device)
        with kvx.Context("decode", tp_rank=rank, tp_size=tp, backend=kvx_backend(cfg.device)) as ctx:
            cache = ctx.register_cache(caches, layout=cfg.layout, total_heads=cfg.num_kv_heads)
            peers = [ctx.add_peer(md) for md in prefill_metadata]
            # kvx splits heads itself: a read from a prefill rank copies the
            # heads it shares with this rank; ranks sharing none are not read
            sources = [p for p in peers if p.heads(cache)[1] > 0]
            conn.send({"op": "up", "rank": rank, "heads": (head_first, head_count),
                       "peers": [{"rank": p.rank, "name": p.name, "transport": p.transport, "heads": p.heads(cache)}
                                 for p in peers],
                       "sources": [p.rank for p in sources]})
            q = ctx.queue(depth=queue_depth)
            inflight: Dict[int, _InFlight] = {}
            stale_s = read_timeout_ms / 1000.0 + 10.0  # kvx fails a read at its deadline; this is a backstop

            def finish(f: _InFlight) -> None:
                if f.error is None:
                    f.error = check_request(cfg, caches, f.req_id, f.local, f.remote, head_first, head_count)
                conn.send({"op": "done", "rank": rank, "req_id": f.req_id, "error": f.error, "reads": f.reads,
                           "bytes": f.nbytes, "first_post": f.first_post, "last_done": f.last_done or time.monotonic()})
                del inflight[f.req_id]

            while True:
                # short waits while reads are out: the time to notice a completion is part of the latency
                if conn.poll(0.0005 if inflight else 0.02):
                    while conn.poll(0):
                        msg = conn.recv()
                        if msg["op"] == "stop":
                            conn.send({"op": "bye", "rank": rank, "stats": ctx.stats(), "in_flight": len(inflight)})
                            return
                        if msg["op"] == "read":
                            f = _InFlight(msg["req_id"], msg["local"], msg["remote"], msg["generations"], time.monotonic())
                            inflight[f.req_id] = f
                            for p in sources:
                                try:
                                    q.read(p, f.local, f.remote, notify_id=notify_id(f.req_id, rank), tag=f.req_id,
                                           timeout_ms=read_timeout_ms, remote_generations=f.generations[p.rank])
                                except kvx.Error as e:
                                    f.error = "posting the read from prefill rank %d: %s" % (p.rank, e)
                                    break
                                f.left += 1
                                f.reads += 1
                            if f.left == 0:
                                finish(f)
                for c in q.poll():
                    f2 = inflight.get(c.tag)
                    if f2 is None:
                        continue  # a read given up on below
                    f2.left -= 1
                    f2.nbytes += c.bytes
                    f2.last_done = time.monotonic()
                    if c.status != 0 and f2.error is None:
                        f2.error = "a read failed: %s" % c.error
                    if f2.left == 0:
                        finish(f2)
                now = time.monotonic()
                for f3 in [f for f in inflight.values() if now - f.first_post > stale_s]:
                    f3.error = f3.error or "%d of %d reads not reported %.0f s after posting" % (f3.left, f3.reads, stale_s)
                    f3.left = 0
                    finish(f3)
    except (EOFError, BrokenPipeError):
        return
    except BaseException as e:
        _report_crash(conn, "decode", rank, e)
        sys.exit(1)


# --- decode: scheduler side ------------------------------------------------------


@dataclass
class DecodeRequest:
    req_id: int
    num_tokens: int
    num_blocks: int
    abandon: bool  # given blocks by the prefill side, then never read
    local_blocks: List[int]
    sent_at: float
    remote_blocks: List[int] = field(default_factory=list)
    generations: Dict[int, List[int]] = field(default_factory=dict)  # per prefill rank, for remote_blocks
    waiting: Set[int] = field(default_factory=set)  # decode ranks still reading
    reads: int = 0
    nbytes: int = 0
    read_start: float = math.inf
    read_end: float = 0.0
    done_at: float = 0.0
    error: Optional[str] = None
    state: str = "prefill"  # prefill -> [late ->] reading -> ok | failed | abandoned | stale
    late: bool = False  # read only after the prefill lease ran out: must fail as stale
    read_after: float = 0.0

    @property
    def latency_ms(self) -> float:
        return (self.done_at - self.sent_at) * 1e3

    @property
    def read_ms(self) -> float:
        return (self.read_end - self.read_start) * 1e3 if self.reads else 0.0


class DecodeScheduler:
    """The decode side's scheduler: allocates local blocks, asks the prefill
    server for the request, hands block pairs to its workers and frees the
    local blocks when every worker is done (or the request is dropped)."""

    def __init__(self, cfg: ModelConfig, pool: BlockPool, server: Connection, workers: WorkerGroup,
                 request_timeout_s: float) -> None:
        self.cfg = cfg
        self.pool = pool
        self.server = server
        self.workers = workers
        self.request_timeout_s = request_timeout_s
        self.requests: Dict[int, DecodeRequest] = {}  # in flight

    @property
    def in_flight(self) -> int:
        return len(self.requests)

    def submit(self, req_id: int, num_tokens: int, abandon: bool, late: bool = False) -> bool:
        """Send a request to the prefill side; False while local blocks are short."""
        n = self.cfg.blocks_for(num_tokens)
        # local blocks first: once the prefill side holds blocks, its lease runs,
        # and the read must not wait for this side's pool
        local = self.pool.allocate(n)
        if local is None:
            return False
        self.requests[req_id] = DecodeRequest(req_id, num_tokens, n, abandon, local, time.monotonic(), late=late)
        self.server.send({"op": "prefill", "req_id": req_id, "num_tokens": num_tokens})
        return True

    def _finish(self, req: DecodeRequest, state: str, error: Optional[str] = None, free: bool = True) -> DecodeRequest:
        req.state, req.done_at = state, time.monotonic()
        req.error = req.error or error
        if free:
            self.pool.free(req.local_blocks)
        del self.requests[req.req_id]
        return req

    def step(self, timeout_s: float) -> List[DecodeRequest]:
        """Wait up to timeout_s; returns the requests that finished."""
        done: List[DecodeRequest] = []
        for conn in wait([self.server] + self.workers.conns, timeout_s):
            if conn is self.server:
                try:
                    msg = self.server.recv()
                except (EOFError, OSError):
                    raise ConnectionError("the prefill server closed the side channel")
                done += self._on_server(msg)
            else:
                done += self._on_worker(self.workers.rank_of(conn), self.workers.recv(conn))
        now = time.monotonic()
        for req in [r for r in self.requests.values() if r.state == "late" and now >= r.read_after]:
            self._send_reads(req)
        for req in [r for r in self.requests.values() if now - r.sent_at > self.request_timeout_s]:
            # blocks a read may still land in are not given back: the leak check reports them
            done.append(self._finish(req, "failed", "no answer within %.0f s (state %s, waiting for decode ranks %s)"
                                     % (self.request_timeout_s, req.state, sorted(req.waiting)), free=False))
        return done

    def _on_server(self, msg: Dict[str, Any]) -> List[DecodeRequest]:
        req = self.requests.get(msg.get("req_id", -1))
        if msg.get("op") == "error":
            if req is None:
                raise RuntimeError("the prefill server: %s" % msg.get("text"))
            return [self._finish(req, "failed", "the prefill server refused it: %s" % msg.get("text"))]
        if msg.get("op") != "prefilled" or req is None:
            raise RuntimeError("unexpected message from the prefill server: %r" % (msg,))
        req.remote_blocks = list(msg["blocks"])
        req.generations = {int(r): list(g) for r, g in msg["generations"].items()}
        if len(req.remote_blocks) != req.num_blocks:
            return [self._finish(req, "failed", "the prefill server gave %d blocks for %d" % (len(req.remote_blocks), req.num_blocks))]
        if req.abandon:
            # a decode that went away: never read, never notified; the
            # prefill side gets its blocks back when the lease runs out
            return [self._finish(req, "abandoned")]
        if req.late:
            # a decode that comes back after the lease ran out: the prefill side
            # has retired the blocks (and may have given them to another request)
            req.state, req.read_after = "late", time.monotonic() + msg["lease_ms"] / 1000.0 + 1.0
            return []
        self._send_reads(req)
        return []

    def _send_reads(self, req: DecodeRequest) -> None:
        req.state = "reading"
        req.waiting = set(range(len(self.workers.conns)))
        for wconn in self.workers.conns:
            wconn.send({"op": "read", "req_id": req.req_id, "local": req.local_blocks, "remote": req.remote_blocks,
                        "generations": req.generations})

    def _on_worker(self, rank: int, msg: Dict[str, Any]) -> List[DecodeRequest]:
        if msg.get("op") != "done":
            raise WorkerFailed("decode rank %d sent %r" % (rank, msg.get("op")))
        req = self.requests.get(msg["req_id"])
        if req is None or rank not in req.waiting:
            return []
        req.waiting.discard(rank)
        req.reads += msg["reads"]
        req.nbytes += msg["bytes"]
        if msg["reads"]:
            # time.monotonic is one clock for every process of this host
            req.read_start = min(req.read_start, msg["first_post"])
            req.read_end = max(req.read_end, msg["last_done"])
        if msg["error"] and req.error is None:
            req.error = "decode rank %d: %s" % (rank, msg["error"])
        if req.waiting:
            return []
        if req.late:  # refused as stale is right; anything else is not
            if req.error and "KVX_ERR_STALE" in req.error:
                return [self._finish(req, "stale")]
            return [self._finish(req, "failed", None if req.error else "a read after the lease ran out passed: it must fail as stale")]
        return [self._finish(req, "failed" if req.error else "ok")]


# --- command lines ---------------------------------------------------------------


def add_common_args(p: argparse.ArgumentParser) -> None:
    """The flags both sides take (run_example.py passes them to both)."""
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="side channel port on 127.0.0.1 (server: 0 picks a free one)")
    p.add_argument("--authkey", default="kvx-example", help="side channel key (HMAC handshake)")
    p.add_argument("--prefill-tp", type=int, default=2, help="prefill TP ranks (worker processes)")
    p.add_argument("--decode-tp", type=int, default=1, help="decode TP ranks (worker processes)")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-blocks", type=int, default=128, help="blocks in this side's pool")
    p.add_argument("--block-size", type=int, default=16, help="tokens per block")
    p.add_argument("--num-kv-heads", type=int, default=4, help="the model's KV heads (split over the TP ranks)")
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--layout", choices=["NHD", "HND"], default="NHD", help="vLLM's KV cache layout")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu: host tensors, kvx's default backend; cuda: GPU tensors, kvx's CUDA backend")
    p.add_argument("--gpu-offset", type=int, default=0, help="rank r uses GPU (r + offset) %% count")
    p.add_argument("--lease-ms", type=int, default=DEFAULT_LEASE_MS,
                   help="how long the prefill side keeps a request's blocks for readers that do not notify")
    p.add_argument("--seed", type=int, default=1)


COMMON_FLAGS = ("port", "authkey", "prefill_tp", "decode_tp", "num_layers", "num_blocks", "block_size",
                "num_kv_heads", "head_size", "layout", "dtype", "device", "gpu_offset", "lease_ms", "seed")


def argv_of(args: argparse.Namespace, names: Sequence[str], **override: Any) -> List[str]:
    """Flags that reproduce these parsed values (for handing them on)."""
    out: List[str] = []
    for name in names:
        value = override.get(name, getattr(args, name))
        if isinstance(value, bool):
            if value:
                out.append("--" + name.replace("_", "-"))
        elif value is not None:
            out += ["--" + name.replace("_", "-"), str(value)]
    return out


def check_common_args(args: argparse.Namespace) -> List[str]:
    """What is wrong with the flags, in words (empty: nothing)."""
    bad: List[str] = []
    for name in ("prefill_tp", "decode_tp", "num_layers", "num_blocks", "block_size", "num_kv_heads", "head_size"):
        if getattr(args, name) < 1:
            bad.append("--%s must be at least 1" % name.replace("_", "-"))
    for name in ("prefill_tp", "decode_tp"):
        tp, h = getattr(args, name), args.num_kv_heads
        if tp >= 1 and h >= 1 and h % tp and tp % h:
            bad.append("--%s %d and --num-kv-heads %d: one must divide the other" % (name.replace("_", "-"), tp, h))
    if args.decode_tp >= NOTIFY_STRIDE:
        bad.append("--decode-tp must be below %d (notify ids are req_id * %d + decode rank)" % (NOTIFY_STRIDE, NOTIFY_STRIDE))
    if args.lease_ms < 100:
        bad.append("--lease-ms must be at least 100")
    return bad
