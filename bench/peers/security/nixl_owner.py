"""A NIXL owner as bench/peers starts one (lib_nixl.make_agent with the
default Options: UCX backend, progress thread on, num_threads 4; the layer
regions of workload.owner_regions registered as DRAM), plus one thing the
bench owner does not have: a canary buffer that is never registered.

    nixl_owner.py OUTDIR SECONDS

Writes into OUTDIR:
  owner0.md    the metadata exactly as lib_nixl.owner publishes it (a pickle
               of the agent metadata and the descriptors)
  canary.json  {"pid", "version", "canary_addr", "canary_len", "regions": [[addr, len], ...],
               "region0_head": hex of its first 16 bytes}
               (what a test harness needs to aim at; the rogue gets no rkey)
  ready        written last
Then serves (NIXL's progress thread does the work) until OUTDIR/stop exists
or SECONDS pass, printing every notification it is handed and every change
of the canary, and exits with os._exit like lib_nixl does."""
from __future__ import annotations

import ctypes
import json
import os
import pickle
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import lib_nixl as L  # noqa: E402
import workload as W  # noqa: E402

CANARY = b"NIXL-OWNER-CANARY:never-registered:0123456789"


def main() -> int:
    out, life = sys.argv[1], float(sys.argv[2])
    cfg = W.Config(library="nixl", block_bytes=4096, num_layers=2, num_blocks=4, rdv=out)
    regions = W.owner_regions(cfg, 0)
    opt = L.Options()
    agent = L.make_agent("kvx-bench-owner0-%d" % os.getpid(), opt)
    L.register(agent, cfg, regions)
    canary = ctypes.create_string_buffer(CANARY, 64)  # never registered with NIXL or UCX
    ver = L.version(opt)
    md = pickle.dumps({"agent": agent.get_agent_metadata(), "rank": 0, "version": ver, "blocks": cfg.blocks(),
                       "block_bytes": cfg.block_bytes, "layers": cfg.num_layers, "pieces": len(cfg.pieces()),
                       "descs": L.owner_descs(cfg, regions)})
    W.put(cfg, "owner0.md", md)
    W.put(cfg, "canary.json", json.dumps({
        "pid": os.getpid(), "version": ver, "canary_addr": ctypes.addressof(canary), "canary_len": len(CANARY),
        "regions": [[W.addr(r), W.nbytes(r)] for r in regions],
        "region0_head": bytes(regions[0][:16]).hex()}).encode())
    W.put(cfg, "ready", b"")
    print("owner: pid %d, %s, canary at 0x%x: %r" % (os.getpid(), ver, ctypes.addressof(canary), canary.value),
          flush=True)
    seen = canary.raw
    first = bytes(regions[0][:16])
    t_end = time.monotonic() + life
    while time.monotonic() < t_end and not os.path.exists(os.path.join(out, "stop")):
        for name, msgs in agent.get_new_notifs().items():
            for m in msgs:
                print("owner: notification from agent %r: %r" % (name, m), flush=True)
        if canary.raw != seen:
            seen = canary.raw
            print("owner: canary is now %r" % canary.value, flush=True)
            W.put(cfg, "canary.now", canary.value)
        if bytes(regions[0][:16]) != first:
            first = bytes(regions[0][:16])
            print("owner: registered region 0 now starts with %r" % first, flush=True)
        time.sleep(0.02)
    print("owner: exiting normally, canary %r" % canary.value, flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
