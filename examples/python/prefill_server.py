"""The prefill side: a scheduler in this process, one worker process per
prefill TP rank, a side channel on 127.0.0.1 for decode clients.

    UCX_TLS=tcp UCX_NET_DEVICES=lo python prefill_server.py --prefill-tp 2

Prints "prefill server: listening on 127.0.0.1:PORT" once every rank's cache
is registered; exits when a client sends "shutdown", or after --idle-s
seconds without a message from any client.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import List, Optional

import kv_connector as kc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="kvx example: the prefill server")
    kc.add_common_args(p)
    p.add_argument("--idle-s", type=float, default=120.0, help="exit after this long without a client message")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    bad = kc.check_common_args(args)
    if bad:
        kc.say("prefill server: " + "; ".join(bad))
        return 2
    # a plain SIGTERM would skip the finally below and leave the workers to find out by EOF
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cfg = kc.config_from_args(args)
    workers: Optional[kc.WorkerGroup] = None
    side: Optional[kc.SideChannelServer] = None
    status = 0
    try:
        workers = kc.WorkerGroup("prefill", kc.prefill_worker_main,
                                 lambda r: (r, args.prefill_tp, cfg, args.num_blocks, args.gpu_offset), args.prefill_tp)
        ups = workers.gather("up", timeout_s=120)
        for up in ups:
            first, count = up["heads"]
            kc.say("prefill rank %d: heads %d..%d, %d blocks x %d layers registered, metadata %d bytes"
                   % (up["rank"], first, first + count - 1, args.num_blocks, args.num_layers, len(up["metadata"])))
        side = kc.SideChannelServer(args.port, args.authkey.encode())
        sched = kc.PrefillScheduler(cfg, args.num_blocks, args.prefill_tp, args.lease_ms, workers,
                                    [up["metadata"] for up in ups], args.seed, side, args.decode_tp)
        kc.say("prefill server: listening on 127.0.0.1:%d (prefill TP %d, %s, %s, %s, lease %d ms)"
               % (side.port, args.prefill_tp, cfg.layout, cfg.dtype, cfg.device, args.lease_ms))
        while not sched.shutdown:
            sched.step(0.05)
            if time.monotonic() - sched.last_activity > args.idle_s:
                kc.say("prefill server: no client message for %.0f s: exiting" % args.idle_s)
                break
        c = sched.counters
        kc.say("prefill server: %d requests; freed by notification %d (%d blocks), by lease expiry %d (%d blocks); "
               "%d still held; pool %d/%d free"
               % (c.requests_admitted, c.requests_freed_by_notification, c.blocks_freed_by_notification,
                  c.requests_freed_by_expiry, c.blocks_freed_by_expiry, len(sched.active), sched.pool.num_free,
                  args.num_blocks))
    except (kc.WorkerFailed, OSError) as e:
        kc.say("prefill server: FAILED: %s" % e)
        status = 1
    except KeyboardInterrupt:
        kc.say("prefill server: interrupted")
        status = 130
    finally:
        if side is not None:
            side.close()
        if workers is not None:
            byes = workers.stop()
            missing = [r for r in range(args.prefill_tp) if r not in byes]
            if missing and status == 0:
                kc.say("prefill server: FAILED: ranks %s did not stop cleanly (exit codes %s)" % (missing, workers.exit_codes()))
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
