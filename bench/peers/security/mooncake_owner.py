"""A Mooncake owner as bench/peers starts one (lib_mooncake.start_engine:
TransferEngine.initialize(127.0.0.1, "P2PHANDSHAKE", "tcp", ""); the layer
regions of workload.owner_regions registered with batch_register_memory),
plus a canary buffer that is never registered.

    mooncake_owner.py OUTDIR SECONDS

Writes OUTDIR/owner.json ({"pid", "version", "session", "rpc_port",
"canary_addr", "canary_len", "regions": [[addr, len], ...], "region0_head"})
and OUTDIR/ready, then serves until OUTDIR/stop exists or SECONDS pass,
printing every change of the canary and of the first bytes of region 0."""
from __future__ import annotations

import ctypes
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lib_mooncake as M  # noqa: E402
import workload as W  # noqa: E402

CANARY = b"MOONCAKE-OWNER-CANARY:never-registered:0123456789"


def main() -> int:
    out, life = sys.argv[1], float(sys.argv[2])
    cfg = W.Config(library="mooncake", backend="tcp", block_bytes=4096, num_layers=2, num_blocks=4, rdv=out)
    regions = W.owner_regions(cfg, 0)
    eng = M.start_engine()
    M.register(eng, regions)
    canary = ctypes.create_string_buffer(CANARY, 64)  # never registered
    info = {"pid": os.getpid(), "version": M.version(), "session": "%s:%d" % (M.host(), eng.get_rpc_port()),
            "rpc_port": eng.get_rpc_port(), "canary_addr": ctypes.addressof(canary), "canary_len": len(CANARY),
            "regions": [[W.addr(r), W.nbytes(r)] for r in regions],
        "region0_head": bytes(regions[0][:16]).hex()}
    W.put(cfg, "owner.json", json.dumps(info).encode())
    W.put(cfg, "ready", b"")
    print("owner: pid %d, %s, session %s, canary at 0x%x" % (os.getpid(), info["version"], info["session"],
                                                             info["canary_addr"]), flush=True)
    seen, first = canary.raw, bytes(regions[0][:16])
    t_end = time.monotonic() + life
    while time.monotonic() < t_end and not os.path.exists(os.path.join(out, "stop")):
        if canary.raw != seen:
            seen = canary.raw
            print("owner: canary is now %r" % canary.value, flush=True)
        if bytes(regions[0][:16]) != first:
            first = bytes(regions[0][:16])
            print("owner: registered region 0 now starts with %r" % first, flush=True)
            W.put(cfg, "region0.now", first)
        time.sleep(0.02)
    print("owner: exiting normally, canary %r" % canary.value, flush=True)
    eng.batch_unregister_memory([W.addr(r) for r in regions])
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
