"""The same stopwatch on two connectors, for the side-by-side in
pd_two_hosts.py --bench: KvxConnector and vLLM's NixlConnector, each
subclassed to append, per request, when its load was handed to the worker
(the step's metadata bound) and when the worker reported it finished, as
JSON lines to $KVX_TIMING_LOG."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Iterable

from kvx.vllm import KvxConnector, KvxMetadata


class _Stopwatch:
    def _note(self, what: str, rids: Iterable[str]) -> None:
        path = os.environ.get("KVX_TIMING_LOG")
        if not path:
            return
        t = time.monotonic()
        with open(path, "a") as f:
            for rid in rids:
                f.write(json.dumps({"ev": what, "req": rid, "t": t, "pid": os.getpid()}) + "\n")

    def _loads(self, meta: Any) -> Iterable[str]:
        raise NotImplementedError

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        super().bind_connector_metadata(connector_metadata)  # type: ignore[misc]
        self._note("start", self._loads(connector_metadata))

    def get_transfer_results(self, finished_req_ids: Any) -> Any:
        r = super().get_transfer_results(finished_req_ids)  # type: ignore[misc]
        self._note("done", r.finished_recving)
        return r


class TimedKvx(_Stopwatch, KvxConnector):
    def _loads(self, meta: KvxMetadata) -> Iterable[str]:
        return [rid for rid, ld in meta.loads.items() if ld.local_blocks]


try:
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlConnector

    class TimedNixl(_Stopwatch, NixlConnector):  # type: ignore[misc,valid-type]
        def _loads(self, meta: Any) -> Iterable[str]:
            return list(getattr(meta, "reqs_to_recv", {}) or {})
except ImportError:  # pragma: no cover (another vLLM)
    pass
