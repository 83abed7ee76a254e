"""kvx as vLLM's KV connector: ``KvxConnector``, a ``KVConnectorBase_V1``
in pull mode (the decode engine reads the prefill engine's blocks).

    --kv-transfer-config '{"kv_connector": "KvxConnector",
                           "kv_connector_module_path": "kvx.vllm",
                           "kv_role": "kv_producer",      (or kv_consumer, kv_both)
                           "kv_connector_extra_config": {"side_channel_port": 5610}}'

The flow (vLLM 0.32):

- The prefill engine gets a request with ``kv_transfer_params``
  ``{"do_remote_decode": true}``. When it finishes, ``request_finished`` keeps
  its blocks (vLLM frees them only once the workers report the request sent)
  and returns the parameters the decode engine needs: the engine id, where
  its kvx metadata is served, the block ids and their generations, the TP
  size, a hash of the prompt tokens the blocks hold.
- The decode engine gets the same prompt with those parameters.
  ``get_num_new_matched_tokens`` claims the prompt's tokens as an
  asynchronous load; its worker fetches the prefill engine's metadata once
  (the side channel), adds each prefill rank as a kvx peer and posts one kvx
  read per prefill rank it shares heads with, the others told it is done
  with a read of no blocks. A load that fails reports its blocks to vLLM,
  whose ``kv_load_failure_policy`` decides ("recompute" or "fail").
- Each prefill rank reports the request sent once every decode rank said
  it is done (kvx notifications carry the reader's rank and TP size), or
  when its lease (``lease_ms``) ends; then vLLM frees the blocks.
- Blocks carry generations (kvx's): the scheduler counts, per block, the
  steps that write it (computed tokens, loads, zeroing, copies) and tells
  the workers, which retire those blocks before the step writes them. A
  read of a block rewritten since its parameters were made fails with
  StaleError, never returns the new request's bytes.

Settings (``kv_connector_extra_config``; all optional):

- ``backend``: "ucx", "ofi" (None: kvx's default); ``transport_policy``,
  ``net_devices``, ``log_level``, ``ucx_connections``: as kvx.Context takes
  them.
- ``side_channel_host``: the address the prefill engine serves its metadata
  on and names in its parameters (default: vLLM's host IP, $VLLM_HOST_IP).
- ``side_channel_port``: its port (default 5610, plus the data-parallel index).
- ``lease_ms``: how long a prefill engine keeps a finished request's blocks
  for readers that have not come (default 30000).
- ``read_timeout_ms``: a read's deadline on the decode side (default 10000).
- ``metadata_key_file``: the deployment key (16+ bytes; default
  $KVX_METADATA_KEY_FILE): kvx signs and checks metadata with it, and the side
  channel serves metadata only to a client that proves it holds the key.
  Without a key, whoever reaches the side channel's port can read the cache.
"""
from __future__ import annotations

import array
import hashlib
import hmac
import os
import select
import socket
import struct
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set, Tuple

import kvx
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

if TYPE_CHECKING:
    from vllm.attention.backends.abstract import AttentionMetadata
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = init_logger("vllm.kvx")  # under vLLM's logger, whose handler and level apply

PARAMS_VERSION = 1
_SIDE_MAGIC = b"KVXS"
_REPLY_MAGIC = b"KVXM"
_SIDE_VERSION = 1
_NONCE = 32
_MAX_METADATA = 16 << 20       # one rank's metadata, as a client accepts it
_MAX_RANKS = 65536
_SIDE_CLIENTS = 16             # connections the side channel serves at once; more are closed
_SIDE_TIMEOUT_S = 5.0
_RETRY_S = 2.0                 # a prefill engine that failed is asked again this long after


def _cpus_allowed() -> Set[int]:
    """Every core; the kernel keeps a thread's mask within its cpuset."""
    return set(range(os.cpu_count() or 1))


def notify_id(request_id: str) -> int:
    """The kvx notification id both engines derive from the prefill
    engine's request id."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little")


def prompt_hash(tokens: Sequence[int]) -> str:
    """What the decode engine checks its prompt against: blocks of another
    prompt would be read as if they were this one's."""
    return hashlib.blake2b(array.array("q", tokens).tobytes(), digest_size=16).hexdigest()


def _key(extra: Dict[str, Any]) -> Optional[bytes]:
    path = extra.get("metadata_key_file") or os.environ.get("KVX_METADATA_KEY_FILE")
    if not path:
        return None
    with open(path, "rb") as f:
        k = f.read(1025).rstrip(b"\r\n")
    if not 16 <= len(k) <= 1024:
        raise ValueError("kvx: the key in %s is %d bytes; 16 to 1024 are needed" % (path, len(k)))
    return k


def _proof(key: Optional[bytes], nonce: bytes) -> bytes:
    if key is None:
        return bytes(32)
    return hmac.new(key, b"kvx side channel\0" + nonce, hashlib.sha256).digest()


# ---------------------------------------------------------------------------
# The side channel: the prefill engine's scheduler serves every rank's kvx
# metadata; a decode worker fetches it once per engine.
# ---------------------------------------------------------------------------

class SideChannel:
    """Serves {tp_rank: metadata} on host:port. With a key, only to a client
    that answers a fresh nonce with HMAC-SHA-256(key, nonce); what a client
    sends is 32 bytes, read with a deadline, and at most _SIDE_CLIENTS are
    served at once."""

    def __init__(self, host: str, port: int, metadata: Dict[int, bytes], key: Optional[bytes]) -> None:
        body = [_REPLY_MAGIC, struct.pack("<I", len(metadata))]
        for rank in sorted(metadata):
            body += [struct.pack("<II", rank, len(metadata[rank])), metadata[rank]]
        self._reply = b"".join(body)
        self._key = key
        self._slots = threading.BoundedSemaphore(_SIDE_CLIENTS)
        self._sock = socket.create_server((host, port), reuse_port=False)
        self.port = self._sock.getsockname()[1]
        self._stop_r, self._stop_w = os.pipe()
        self._t = threading.Thread(target=self._serve, name="kvx-side-channel", daemon=True)
        self._t.start()

    def _serve(self) -> None:
        while True:
            r, _, _ = select.select([self._sock, self._stop_r], [], [])
            if self._stop_r in r:
                return
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._one, args=(conn,), name="kvx-side-client", daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(_SIDE_TIMEOUT_S)
            nonce = os.urandom(_NONCE)
            conn.sendall(_SIDE_MAGIC + bytes([_SIDE_VERSION, 1 if self._key else 0]) + nonce)
            got = _recv_exact(conn, 32)
            if got is not None and hmac.compare_digest(got, _proof(self._key, nonce)):
                conn.sendall(self._reply)
        except OSError:
            pass
        finally:
            conn.close()
            self._slots.release()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._t.join(5)
        self._sock.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


def _recv_exact(conn: socket.socket, n: int) -> Optional[bytes]:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def fetch_metadata(host: str, port: int, key: Optional[bytes], timeout_s: float = 10.0) -> Dict[int, bytes]:
    """Every rank's metadata from a prefill engine's side channel. Raises
    kvx.PeerError saying what went wrong (nothing listening, no key where
    one is needed, a reply that is not one)."""
    where = "%s:%d" % (host, port)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.settimeout(timeout_s)
            hello = _recv_exact(s, 6 + _NONCE)
            if hello is None or hello[:4] != _SIDE_MAGIC:
                raise kvx.PeerError("kvx side channel %s: not a kvx side channel" % where, -6)
            if hello[4] != _SIDE_VERSION:
                raise kvx.PeerError("kvx side channel %s speaks version %d, this kvx %d" % (where, hello[4], _SIDE_VERSION), -6)
            if hello[5] and key is None:
                raise kvx.PeerError("kvx side channel %s needs the deployment key (metadata_key_file or "
                                    "$KVX_METADATA_KEY_FILE), and this engine has none" % where, -6)
            s.sendall(_proof(key if hello[5] else None, hello[6:]))
            head = _recv_exact(s, 8)
            if head is None:
                raise kvx.PeerError("kvx side channel %s closed without metadata: %s" % (
                    where, "the key differs from the prefill engine's" if hello[5] else "it is busy or stopping"), -6)
            if head[:4] != _REPLY_MAGIC:
                raise kvx.PeerError("kvx side channel %s: a reply that is not metadata" % where, -6)
            (count,) = struct.unpack("<I", head[4:])
            if not 0 < count <= _MAX_RANKS:
                raise kvx.PeerError("kvx side channel %s: %d ranks" % (where, count), -6)
            out: Dict[int, bytes] = {}
            for _ in range(count):
                rh = _recv_exact(s, 8)
                if rh is None:
                    raise kvx.PeerError("kvx side channel %s: the reply ended early" % where, -6)
                rank, n = struct.unpack("<II", rh)
                if n > _MAX_METADATA or rank >= count or rank in out:
                    raise kvx.PeerError("kvx side channel %s: rank %d with %d bytes of metadata" % (where, rank, n), -6)
                md = _recv_exact(s, n)
                if md is None:
                    raise kvx.PeerError("kvx side channel %s: the reply ended early" % where, -6)
                out[rank] = md
            return out
    except OSError as e:
        raise kvx.PeerError("kvx side channel %s: %s" % (where, e), -6) from None


# ---------------------------------------------------------------------------
# What the scheduler tells the workers each step
# ---------------------------------------------------------------------------

@dataclass
class RemotePrefill:
    """A decode request's source, from its kv_transfer_params (checked)."""
    engine_id: str
    request_id: str
    host: str
    port: int
    tp_size: int
    block_ids: List[int]
    generations: List[int]
    num_tokens: int
    prompt_hash: str


@dataclass
class Load:
    """Read remote blocks into local ones. No local blocks: vLLM waits for
    nothing, the prefill engine is only told this request is done with its
    blocks. error: the load cannot be made (vLLM hears its blocks failed)."""
    remote: RemotePrefill
    local_blocks: List[int]
    remote_blocks: List[int]
    generations: List[int]
    error: str = ""


@dataclass
class KvxHandshake(KVConnectorHandshakeMetadata):
    tp_rank: int
    metadata: bytes


@dataclass
class KvxMetadata(KVConnectorMetadata):
    loads: Dict[str, Load] = field(default_factory=dict)
    # request id -> its block ids and their generations, leased to readers from this step
    sends: Dict[str, Tuple[List[int], List[int]]] = field(default_factory=dict)
    # blocks this step writes: retired before it runs
    retire: List[int] = field(default_factory=list)


def parse_remote(params: Dict[str, Any], block_size: int) -> Tuple[Optional[RemotePrefill], str]:
    """A RemotePrefill from kv_transfer_params, or None and why not. The
    parameters come through a router from another engine: every field is
    checked for type and sense."""
    def want(name: str, kind: Any) -> Any:
        v = params.get(name)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise ValueError("%s is %r" % (name, v))
        return v
    try:
        if params.get("kvx") != PARAMS_VERSION:
            raise ValueError("kvx is %r, this connector reads version %d (from another connector?)" % (params.get("kvx"), PARAMS_VERSION))
        rp = RemotePrefill(
            engine_id=want("remote_engine_id", str), request_id=want("remote_request_id", str),
            host=want("remote_host", str), port=want("remote_port", int), tp_size=want("tp_size", int),
            block_ids=list(want("remote_block_ids", list)), generations=list(want("remote_generations", list)),
            num_tokens=want("remote_num_tokens", int), prompt_hash=want("remote_prompt_hash", str))
        if not 0 < rp.port < 65536 or not 0 < rp.tp_size <= _MAX_RANKS:
            raise ValueError("port %d, tp_size %d" % (rp.port, rp.tp_size))
        if any(not isinstance(b, int) or isinstance(b, bool) or not 0 <= b < 1 << 32 for b in rp.block_ids):
            raise ValueError("remote_block_ids holds something other than block ids")
        if len(rp.generations) != len(rp.block_ids) or any(
                not isinstance(g, int) or isinstance(g, bool) or not 0 <= g < 1 << 64 for g in rp.generations):
            raise ValueError("remote_generations is not one generation per block")
        if rp.num_tokens <= 0 or len(rp.block_ids) != -(-rp.num_tokens // block_size):
            raise ValueError("%d blocks for %d tokens of %d per block" % (len(rp.block_ids), rp.num_tokens, block_size))
        return rp, ""
    except ValueError as e:
        return None, str(e)


# ---------------------------------------------------------------------------
# The connector
# ---------------------------------------------------------------------------

class KvxConnector(KVConnectorBase_V1):
    """kvx as vLLM's KV connector; see the module's documentation."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "Optional[KVCacheConfig]" = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        tc = vllm_config.kv_transfer_config
        self._extra: Dict[str, Any] = dict(tc.kv_connector_extra_config or {})
        self.engine_id: str = str(tc.engine_id)
        self._sched: Optional[_Scheduler] = None
        self._worker: Optional[_Worker] = None
        if role == KVConnectorRole.SCHEDULER:
            self._sched = _Scheduler(vllm_config, kv_cache_config, self.engine_id, self._extra)
        else:
            self._worker = _Worker(vllm_config, self.engine_id, self._extra)

    # -- worker side --
    def register_kv_caches(self, kv_caches: Dict[str, Any]) -> None:
        assert self._worker is not None
        self._worker.register(kv_caches)

    def get_handshake_metadata(self) -> Optional[KVConnectorHandshakeMetadata]:
        return self._worker.handshake() if self._worker else None

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert self._worker is not None and isinstance(connector_metadata, KvxMetadata)
        self._worker.bind(connector_metadata)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.post_loads()

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: vLLM schedules a request once get_finished reports it

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        return  # pull mode: readers take the blocks where they lie

    def wait_for_save(self) -> None:
        return

    def get_finished(self, finished_req_ids: Set[str]) -> Tuple[Optional[Set[str]], Optional[Set[str]]]:
        assert self._worker is not None
        return self._worker.finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> Set[int]:
        return self._worker.take_load_errors() if self._worker else set()

    def shutdown(self) -> None:
        if self._worker:
            self._worker.close()
        if self._sched:
            self._sched.close()

    # -- scheduler side --
    def set_xfer_handshake_metadata(self, metadata: Dict[int, KVConnectorHandshakeMetadata]) -> None:
        assert self._sched is not None
        self._sched.serve(metadata)

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> Tuple[Optional[int], bool]:
        assert self._sched is not None
        return self._sched.matched(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        assert self._sched is not None
        self._sched.allocated(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self._sched is not None
        return self._sched.build(scheduler_output, self._kv_cache_manager)

    def request_finished(self, request: "Request", block_ids: Any) -> Tuple[bool, Optional[Dict[str, Any]]]:
        assert self._sched is not None
        return self._sched.finished(request, block_ids)


class _Scheduler:
    def __init__(self, vllm_config: "VllmConfig", kv_cache_config: "Optional[KVCacheConfig]", engine_id: str,
                 extra: Dict[str, Any]) -> None:
        from vllm import envs

        self.engine_id = engine_id
        self.block_size = int(vllm_config.cache_config.block_size)
        self.tp_size = int(vllm_config.parallel_config.tensor_parallel_size)
        self.lease_ms = int(extra.get("lease_ms", 30000))
        self.producer = bool(vllm_config.kv_transfer_config.is_kv_producer)
        self.host = str(extra.get("side_channel_host") or envs.VLLM_HOST_IP or (_host_ip() if self.producer else ""))
        self.port = int(extra.get("side_channel_port", 5610)) + int(vllm_config.parallel_config.data_parallel_index)
        self.key = _key(extra)
        nb = int(kv_cache_config.num_blocks) if kv_cache_config is not None else 0
        # the workers' block generations, mirrored: both advance on the same list each step
        self.gens = array.array("Q", bytes(8 * max(nb, 1)))
        self.loads: Dict[str, Load] = {}
        self.sends: Dict[str, Tuple[List[int], List[int]]] = {}
        self.side: Optional[SideChannel] = None

    def close(self) -> None:
        if self.side:
            self.side.close()
            self.side = None

    def serve(self, metadata: Dict[int, KVConnectorHandshakeMetadata]) -> None:
        """Every TP rank's metadata (vLLM refuses pipeline-parallel ranks
        before this: set_xfer_handshake_metadata_pp_aware)."""
        by_rank: Dict[int, bytes] = {}
        for tp, m in metadata.items():
            if not isinstance(m, KvxHandshake):
                raise ValueError("kvx: handshake metadata of rank %d is %s" % (tp, type(m).__name__))
            by_rank[tp] = m.metadata
        if self.side is None and self.producer:
            self.side = SideChannel(self.host, self.port, by_rank, self.key)
            logger.info("kvx: engine %s serves the metadata of %d rank(s) at %s:%d%s", self.engine_id, len(by_rank),
                        self.host, self.side.port, " to holders of the deployment key" if self.key else
                        " to anyone who reaches it (no metadata_key_file)")

    # A decode request: the prompt's tokens come from the prefill engine.
    def _remote(self, request: "Request") -> Optional[RemotePrefill]:
        p = request.kv_transfer_params
        if not p or not p.get("do_remote_prefill"):
            return None
        rp, why = parse_remote(p, self.block_size)
        if rp is None:
            logger.warning("kvx: request %s: its kv_transfer_params are not usable (%s); its prompt is computed here",
                           request.request_id, why)
            p["do_remote_prefill"] = False
            return None
        prompt = list(request.prompt_token_ids or [])
        if rp.num_tokens > len(prompt) or prompt_hash(prompt[:rp.num_tokens]) != rp.prompt_hash:
            logger.warning("kvx: request %s: the prefill engine's blocks hold another prompt (%d tokens, hash %s) than "
                           "this one (%d tokens); its prompt is computed here", request.request_id, rp.num_tokens,
                           rp.prompt_hash, len(prompt))
            p["do_remote_prefill"] = False
            self.loads[request.request_id] = Load(rp, [], [], [])  # still release the prefill engine's blocks
            return None
        return rp

    def matched(self, request: "Request", num_computed_tokens: int) -> Tuple[Optional[int], bool]:
        rp = self._remote(request)
        if rp is None:
            return 0, False
        count = rp.num_tokens - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def allocated(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        p = request.kv_transfer_params
        if not p or not p.get("do_remote_prefill"):
            return
        p["do_remote_prefill"] = False  # one transfer per request (vLLM asks again after it)
        rp, _ = parse_remote(p, self.block_size)
        if rp is None:
            return
        if num_external_tokens <= 0:  # all found here: only release the prefill engine's blocks
            self.loads[request.request_id] = Load(rp, [], [], [])
            return
        allb = blocks.get_block_ids()[0]
        local = list(blocks.get_unhashed_block_ids_all_groups()[0])
        first = len(allb) - len(local)  # the blocks before are prefix-cache hits here
        if len(allb) > len(rp.block_ids) or first < 0 or local != list(allb[first:]):
            self.loads[request.request_id] = Load(rp, local, [], [], error="%d local blocks (%d found here) do not line up "
                                                  "with the prefill engine's %d" % (len(allb), first, len(rp.block_ids)))
            return
        self.loads[request.request_id] = Load(rp, local, rp.block_ids[first:first + len(local)],
                                              rp.generations[first:first + len(local)])

    def build(self, so: "SchedulerOutput", manager: Any) -> KvxMetadata:
        written: Set[int] = set()
        bs = self.block_size
        for nr in so.scheduled_new_reqs:
            n = so.num_scheduled_tokens.get(nr.req_id, 0)
            ids = nr.block_ids[0] if nr.block_ids else []
            written.update(ids[nr.num_computed_tokens // bs: -(-(nr.num_computed_tokens + n) // bs)])
        cr = so.scheduled_cached_reqs
        if cr.req_ids and manager is None:
            raise RuntimeError("kvx: the scheduler's KV cache manager was never bound to the connector")
        for i, rid in enumerate(cr.req_ids):
            n = so.num_scheduled_tokens.get(rid, 0)
            nc = cr.num_computed_tokens[i]
            ids = manager.get_block_ids(rid)[0]
            written.update(ids[nc // bs: -(-(nc + n) // bs)])
        for ld in self.loads.values():
            written.update(ld.local_blocks)
        written.update(so.new_block_ids_to_zero or ())
        written.update(c.dst_block_id for c in (so.kv_cache_block_copies or ()))
        retire = sorted(b for b in written if 0 <= b < len(self.gens))
        for b in retire:
            self.gens[b] += 1
        meta = KvxMetadata(loads=self.loads, sends=self.sends, retire=retire)
        self.loads, self.sends = {}, {}
        return meta

    def finished(self, request: "Request", block_ids: Any) -> Tuple[bool, Optional[Dict[str, Any]]]:
        from vllm.v1.request import RequestStatus

        p = request.kv_transfer_params
        if not p:
            return False, None
        if p.get("do_remote_prefill"):  # ended before it was scheduled: release the prefill engine's blocks
            p["do_remote_prefill"] = False
            rp, _ = parse_remote(p, self.block_size)
            if rp is not None:
                self.loads[request.request_id] = Load(rp, [], [], [])
            return False, None
        if not p.get("do_remote_decode"):
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            return False, None  # aborted: nothing to hand over
        ids = list(block_ids[0]) if block_ids and isinstance(block_ids[0], (list, tuple)) else list(block_ids or [])
        ntok = min(int(request.num_computed_tokens), int(request.num_prompt_tokens))
        ids = ids[:-(-ntok // self.block_size)] if ntok > 0 else []
        if not ids or self.side is None:
            return False, None
        gens = [self.gens[b] for b in ids]
        self.sends[request.request_id] = (ids, gens)
        prompt = list(request.prompt_token_ids or [])[:ntok]
        return True, {
            "kvx": PARAMS_VERSION,
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self.engine_id,
            "remote_request_id": request.request_id,
            "remote_host": self.host,
            "remote_port": self.side.port,
            "remote_block_ids": ids,
            "remote_generations": gens,
            "remote_num_tokens": ntok,
            "remote_prompt_hash": prompt_hash(prompt),
            "remote_lease_ms": self.lease_ms,
            "tp_size": self.tp_size,
        }


def _host_ip() -> str:
    try:
        from vllm.utils.network_utils import get_ip
        return get_ip()
    except Exception:  # pragma: no cover (older vLLM)
        return "127.0.0.1"


@dataclass
class _Lease:
    nid: int
    deadline: float
    ranks: Set[int] = field(default_factory=set)
    reader_tp: int = 0


@dataclass
class _Remote:
    """A prefill engine this decode worker reads: its peers by rank, once
    its side channel answered. error: why it cannot be read (a new
    handshake is tried for the next request)."""
    future: "Future[Dict[int, bytes]]"
    peers: Dict[int, "kvx.Peer"] = field(default_factory=dict)
    error: Optional[str] = None
    failed_at: float = 0.0

    def fail(self, why: str) -> None:
        self.error, self.failed_at = why, time.monotonic()


@dataclass
class _Pending:
    req_id: str
    load: Load
    rkey: Tuple[str, str, int]
    tickets: int = 0
    failed: Optional[str] = None


class _Worker:
    def __init__(self, vllm_config: "VllmConfig", engine_id: str, extra: Dict[str, Any]) -> None:
        self.cfg = vllm_config
        self.engine_id = engine_id
        self.extra = extra
        self.lease_s = int(extra.get("lease_ms", 30000)) / 1000.0
        self.read_timeout_ms = int(extra.get("read_timeout_ms", 10000))
        self.key = _key(extra)
        self.ctx: Optional[kvx.Context] = None
        self.cache: Optional[kvx.Cache] = None
        self.queue: Optional[kvx.Queue] = None
        self.depth = 1024
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvx-handshake")
        # decode side
        self.remotes: Dict[Tuple[str, str, int], _Remote] = {}
        self.waiting: List[_Pending] = []           # loads not posted yet
        self.inflight: Dict[int, _Pending] = {}     # by tag
        self.tickets_out = 0
        self.next_tag = 1
        self.recving: Set[str] = set()
        self.load_errors: Set[int] = set()
        self.logged_peers: Set[Tuple[str, int]] = set()
        # prefill side
        self.leases: Dict[str, _Lease] = {}
        self.by_nid: Dict[int, str] = {}
        self.early: Dict[int, Tuple[float, List[Tuple[int, int]]]] = {}
        self.sent: Set[str] = set()                 # leases ended, not yet reported
        self.finished_ids: Set[str] = set()         # of those with leases: vLLM said they finished
        self.gen_warned = False

    def register(self, kv_caches: Dict[str, Any]) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

        rank, tp = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        e = self.extra
        # vLLM's CPU workers pin this thread to one core that its compute
        # threads spin on; kvx's progress thread (which serves this rank's
        # readers) inherits the mask at its start, so it starts with every
        # core instead (within the process's cpuset), and this thread gets
        # its own back.
        pinned = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        allowed = _cpus_allowed()
        widened = False
        try:
            if pinned is not None and allowed and allowed != pinned:
                try:
                    os.sched_setaffinity(0, allowed)
                    widened = True
                except OSError as err:  # a container that forbids it: the thread starts pinned, as before
                    logger.info("kvx: could not widen the progress thread's cores (%s)", err)
            self.ctx = kvx.Context(name=self.engine_id[:63], tp_rank=rank, tp_size=tp, backend=e.get("backend"),
                                   timeout_ms=self.read_timeout_ms, transport_policy=e.get("transport_policy"),
                                   metadata_key=self.key, net_devices=e.get("net_devices"), log_level=e.get("log_level"),
                                   ucx_connections=int(e.get("ucx_connections", 0)))
        finally:
            if widened and pinned is not None:
                os.sched_setaffinity(0, pinned)
        heads = int(self.cfg.model_config.get_total_num_kv_heads())
        self.cache = self.ctx.register_cache(kv_caches, layout=None, block_size=int(self.cfg.cache_config.block_size),
                                             generations=True, total_heads=heads if heads < tp else None)
        self.queue = self.ctx.queue(depth=self.depth)
        logger.info("kvx: engine %s rank %d of %d: %d layers registered as %s, backend %s", self.engine_id, rank, tp,
                    len(kv_caches), self.cache.layout, self.ctx.stats()["backend"])

    def handshake(self) -> KvxHandshake:
        assert self.ctx is not None
        return KvxHandshake(tp_rank=self.ctx.tp_rank, metadata=self.ctx.metadata())

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None

    # -- every step, before the model runs --
    def bind(self, meta: KvxMetadata) -> None:
        assert self.cache is not None
        if meta.retire:
            self.cache.retire(meta.retire)  # before this step writes them: a reader of the old bytes gets StaleError
        now = time.monotonic()
        for rid, (ids, gens) in meta.sends.items():
            mine = self.cache.generations(ids)
            if mine != list(gens) and not self.gen_warned:
                self.gen_warned = True  # a bug, not a peer's doing: its readers will get StaleError, never wrong bytes
                logger.error("kvx: request %s: the scheduler's block generations differ from this worker's (%s, %s)",
                             rid, list(gens)[:8], mine[:8])
            nid = notify_id(rid)
            lease = _Lease(nid, now + self.lease_s)
            self.leases[rid] = lease
            self.by_nid[nid] = rid
            for rank, tp in self.early.pop(nid, (0.0, []))[1]:
                self._arrived(lease, rank, tp)
        for rid, ld in meta.loads.items():
            self.waiting.append(_Pending(rid, ld, (ld.remote.engine_id, ld.remote.host, ld.remote.port)))

    # -- decode side: loads --
    def _remote(self, pend: _Pending) -> _Remote:
        r = self.remotes.get(pend.rkey)
        # after a failure, loads fail at once for a while; then a new handshake
        if r is None or (r.error and time.monotonic() - r.failed_at > _RETRY_S and not self._busy(pend.rkey)):
            if r is not None:
                for p in r.peers.values():
                    p.remove()
            rp = pend.load.remote
            r = _Remote(self.pool.submit(fetch_metadata, rp.host, rp.port, self.key))
            self.remotes[pend.rkey] = r
        return r

    def _busy(self, rkey: Tuple[str, str, int]) -> bool:
        return any(p.rkey == rkey for p in self.inflight.values())

    def _connect(self, rp: RemotePrefill, r: _Remote) -> None:
        assert self.ctx is not None and self.cache is not None
        try:
            mds = r.future.result()
            if len(mds) != rp.tp_size:
                raise kvx.MismatchError("its side channel serves %d ranks, the request says tp_size %d" % (len(mds), rp.tp_size))
            for rank in sorted(mds):
                p = self.ctx.add_peer(mds[rank])
                r.peers[rank] = p
                if p.name != rp.engine_id[:63]:
                    raise kvx.MismatchError("it serves engine %s's metadata (restarted?)" % p.name)
                if (rp.engine_id, rank) not in self.logged_peers:
                    self.logged_peers.add((rp.engine_id, rank))
                    first, count = p.heads(self.cache)
                    logger.info("kvx: rank %d reads engine %s rank %d of %d%s over %s", self.ctx.tp_rank, rp.engine_id,
                                rank, rp.tp_size, " (heads %d..%d)" % (first, first + count - 1) if count else
                                " (no heads: only tells it when done)", p.transport)
        except kvx.Error as e:
            r.fail(str(e))
            for p in r.peers.values():
                p.remove()
            r.peers.clear()

    def post_loads(self) -> None:
        if not self.waiting or self.queue is None:
            return
        keep: List[_Pending] = []
        for pend in self.waiting:
            rp = pend.load.remote
            r = self._remote(pend)
            if not r.future.done():
                keep.append(pend)
                continue
            if not r.peers and not r.error:
                self._connect(rp, r)
            if r.error:
                self._fail(pend, "engine %s at %s:%d: %s" % (rp.engine_id, rp.host, rp.port, r.error))
                continue
            if len(r.peers) + self.tickets_out > self.depth:
                keep.append(pend)  # the queue is full: at the next step
                continue
            self._post(pend, r)
        self.waiting = keep

    def _post(self, pend: _Pending, r: _Remote) -> None:
        assert self.queue is not None and self.cache is not None
        ld = pend.load
        nid = notify_id(ld.remote.request_id)
        tag = self.next_tag
        self.next_tag += 1
        for rank in sorted(r.peers):
            peer = r.peers[rank]
            try:
                if ld.remote_blocks and not ld.error and peer.heads(self.cache)[1]:
                    # the blocks were retired when the scheduler's step list was bound
                    self.queue.read(peer, ld.local_blocks, ld.remote_blocks, cache=self.cache, notify_id=nid,
                                    tag=tag, remote_generations=ld.generations)
                else:
                    self.queue.notify(peer, nid, tag=tag)
                pend.tickets += 1
            except kvx.Error as e:
                pend.failed = pend.failed or "rank %d: %s" % (rank, e)
                if isinstance(e, kvx.PeerError):
                    r.fail(str(e))
        pend.failed = pend.failed or ld.error or None
        if pend.tickets:
            self.inflight[tag] = pend
            self.tickets_out += pend.tickets
        else:
            self._done(pend)

    def _fail(self, pend: _Pending, why: str) -> None:
        pend.failed = pend.failed or why
        self._done(pend)

    def _done(self, pend: _Pending) -> None:
        ld = pend.load
        if not ld.local_blocks:  # vLLM waits for nothing: it only told the prefill engine
            if pend.failed:
                logger.info("kvx: request %s: telling engine %s it is done failed: %s", pend.req_id, ld.remote.engine_id,
                            pend.failed)
            return
        if pend.failed:
            self.load_errors.update(ld.local_blocks)
            logger.warning("kvx: request %s: the load of %d blocks from engine %s failed: %s", pend.req_id,
                           len(ld.local_blocks), ld.remote.engine_id, pend.failed)
        self.recving.add(pend.req_id)

    def _poll(self) -> None:
        if self.queue is None:
            return
        while self.inflight:
            done = self.queue.poll(256)
            for c in done:
                pend = self.inflight.get(c.tag)
                if pend is None:
                    continue
                self.tickets_out -= 1
                if not c.ok:
                    err = c.error
                    pend.failed = pend.failed or str(err)
                    r = self.remotes.get(pend.rkey)
                    if isinstance(err, kvx.PeerError) and r is not None:
                        r.fail(str(err))  # a new handshake for a later request
                pend.tickets -= 1
                if pend.tickets == 0:
                    del self.inflight[c.tag]
                    self._done(pend)
            if len(done) < 256:
                return

    # -- prefill side: leases --
    @staticmethod
    def _arrived(lease: _Lease, rank: int, tp: int) -> None:
        lease.ranks.add(rank)
        lease.reader_tp = lease.reader_tp or tp

    def _notes(self) -> None:
        if self.ctx is None:
            return
        now = time.monotonic()
        for n in self.ctx.notifications():
            if not n.done:
                continue
            rid = self.by_nid.get(n.id)
            if rid is None:  # before its lease (a quick reader): kept for a lease's length
                if n.id not in self.early and len(self.early) >= 65536:
                    self.early.pop(next(iter(self.early)))
                self.early.setdefault(n.id, (now, []))[1].append((n.reader_rank, n.reader_tp_size))
                continue
            self._arrived(self.leases[rid], n.reader_rank, n.reader_tp_size)
        for nid in [k for k, (t, _) in self.early.items() if now - t > self.lease_s]:
            del self.early[nid]
        for rid, lease in list(self.leases.items()):
            if lease.reader_tp and len(lease.ranks) >= lease.reader_tp:
                self._end(rid, lease)
            elif now >= lease.deadline:
                missing = sorted(set(range(lease.reader_tp)) - lease.ranks)
                logger.warning("kvx: request %s: its lease of %.0f ms ended with %s; its blocks are released", rid,
                               self.lease_s * 1000, "no reader done" if not lease.reader_tp else
                               "decode rank(s) %s of %d not done" % (missing, lease.reader_tp))
                self._end(rid, lease)

    def _end(self, rid: str, lease: _Lease) -> None:
        del self.leases[rid]
        self.by_nid.pop(lease.nid, None)
        self.sent.add(rid)

    def finished(self, finished_req_ids: Set[str]) -> Tuple[Optional[Set[str]], Optional[Set[str]]]:
        self.finished_ids |= {r for r in finished_req_ids if r in self.leases or r in self.sent}
        self.post_loads()
        self._poll()
        self._notes()
        sending = self.sent & self.finished_ids
        self.sent -= sending
        self.finished_ids -= sending
        recving, self.recving = self.recving, set()
        return (sending or None), (recving or None)

    def take_load_errors(self) -> Set[int]:
        e, self.load_errors = self.load_errors, set()
        return e
