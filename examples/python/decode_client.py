"""The decode side: a scheduler in this process, one worker process per
decode TP rank. Connects to the prefill server, sends --requests requests
(--inflight at once), reads each one's KV from the prefill ranks that hold
its heads, checks every byte, and checks that nothing leaked on either side.

    UCX_TLS=tcp UCX_NET_DEVICES=lo python decode_client.py --prefill-tp 2 --decode-tp 1

Prints a line per request, a summary, then EXAMPLE PASSED (exit 0) or
EXAMPLE FAILED: <the first problem> (exit 1).
"""
from __future__ import annotations

import argparse
import math
import random
import signal
import sys
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Tuple

import kv_connector as kc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="kvx example: the decode client")
    kc.add_common_args(p)
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--tokens", default="1:256", help="tokens per request: N, or MIN:MAX drawn per request")
    p.add_argument("--inflight", type=int, default=4, help="requests in flight at once")
    p.add_argument("--abandon", type=int, default=0,
                   help="requests given blocks by the prefill side and never read (freed there by lease expiry)")
    p.add_argument("--late", type=int, default=0,
                   help="requests read only after their lease ran out: each must fail with kvx's KVX_ERR_STALE "
                        "(the prefill side retired the blocks), never pass with what the blocks hold next")
    p.add_argument("--timeout-s", type=float, default=120.0, help="the whole run's deadline")
    p.add_argument("--keep-server", action="store_true", help="do not send the server 'shutdown' at the end")
    return p


CLIENT_FLAGS = ("requests", "tokens", "inflight", "abandon", "late", "timeout_s", "keep_server")


def parse_tokens(text: str) -> Tuple[int, int]:
    lo, _, hi = text.partition(":")
    a, b = int(lo), int(hi or lo)
    if a < 1 or b < a:
        raise ValueError("--tokens %s: want N or MIN:MAX with 1 <= MIN <= MAX" % text)
    return a, b


def percentile(values: List[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of them at or below it."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[max(0, min(len(s), math.ceil(q * len(s))) - 1)]


class Run:
    """What the run found: the first problem wins the verdict line."""

    def __init__(self) -> None:
        self.problems: List[str] = []

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def expect(self, what: str, got: Any, want: Any) -> None:
        if got != want:
            self.problem("%s: %s, expected %s" % (what, got, want))


def check_args(args: argparse.Namespace) -> List[str]:
    """What is wrong with the client's flags, in words (empty: nothing)."""
    bad = kc.check_common_args(args)
    try:
        tok_hi = parse_tokens(args.tokens)[1]
    except ValueError as e:
        bad.append(str(e))
        tok_hi = 1
    if args.requests < 1 or args.inflight < 1 or not 0 <= args.abandon or not 0 <= args.late or args.abandon + args.late > args.requests:
        bad.append("want --requests >= 1, --inflight >= 1, --abandon and --late >= 0, and --abandon + --late <= --requests")
    need = math.ceil(tok_hi / max(args.block_size, 1))
    if need > args.num_blocks:
        bad.append("--tokens up to %d need %d blocks, --num-blocks is %d" % (tok_hi, need, args.num_blocks))
    return bad


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    bad = check_args(args)
    if bad:
        kc.say("EXAMPLE FAILED: " + "; ".join(bad))
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cfg = kc.config_from_args(args)
    run = Run()
    try:
        summary = drive(args, cfg, parse_tokens(args.tokens), run)
    except (kc.WorkerFailed, ConnectionError, TimeoutError, RuntimeError, OSError) as e:
        run.problem(str(e))
        summary = []
    except KeyboardInterrupt:
        run.problem("interrupted")
        summary = []
    for line in summary:
        kc.say(line)
    if run.problems:
        for p in run.problems[1:10]:
            kc.say("also: " + p)
        kc.say("EXAMPLE FAILED: " + run.problems[0])
        return 1
    kc.say("EXAMPLE PASSED")
    return 0


def drive(args: argparse.Namespace, cfg: kc.ModelConfig, tokens: Tuple[int, int], run: Run) -> List[str]:
    """Connect, run every request, check both sides; returns the summary lines."""
    t_start = time.monotonic()
    deadline = t_start + args.timeout_s
    server = kc.connect(args.port, args.authkey.encode(), timeout_s=30)
    workers: Optional[kc.WorkerGroup] = None
    try:
        hello = kc.call(server, {"op": "hello"}, "config", timeout_s=30)
        conf = hello["config"]
        # the caches of both sides must describe the same model
        theirs = dict(conf["model"], prefill_tp=conf["prefill_tp"], lease_ms=conf["lease_ms"],
                      decode_tp=args.decode_tp if conf["decode_tp"] is None else conf["decode_tp"])
        ours = dict(asdict(cfg), prefill_tp=args.prefill_tp, lease_ms=args.lease_ms, decode_tp=args.decode_tp)
        differ = ["--%s %s (this client: %s)" % (k.replace("_", "-"), theirs[k], ours[k]) for k in ours if theirs.get(k) != ours[k]]
        if differ:
            raise RuntimeError("the prefill server runs " + ", ".join(differ))
        metadata: List[bytes] = hello["metadata"]
        lease_ms: int = conf["lease_ms"]
        # a read ends (done or failed) well inside the lease, so the prefill
        # side never reuses blocks that a read of this side is still taking
        read_timeout_ms = max(lease_ms // 2, 50)
        depth = max(64, 2 * args.inflight * args.prefill_tp)
        workers = kc.WorkerGroup("decode", kc.decode_worker_main,
                                 lambda r: (r, args.decode_tp, cfg, args.num_blocks, metadata, read_timeout_ms, depth,
                                            args.gpu_offset), args.decode_tp)
        ups = workers.gather("up", timeout_s=120)
        transports: List[str] = []
        for up in ups:
            for peer in up["peers"]:
                first, count = peer["heads"]
                what = "reads heads %d..%d" % (first, first + count - 1) if count else "not read (kvx takes none of its heads from it)"
                kc.say("decode rank %d <- %s rank %d: transport %s, %s"
                       % (up["rank"], peer["name"], peer["rank"], peer["transport"], what))
                if count:
                    transports.append(peer["transport"])
        sources: Dict[int, List[int]] = {up["rank"]: up["sources"] for up in ups}
        pairs = sum(len(s) for s in sources.values())  # reads (and notifications) per request
        kc.call(server, {"op": "readers", "decode_tp": args.decode_tp, "sources": sources}, "readers_ok", timeout_s=30)

        rng = random.Random(args.seed)
        plan = [(i + 1, rng.randint(*tokens)) for i in range(args.requests)]
        picked = rng.sample(range(args.requests), args.abandon + args.late)
        abandoned_ids = {plan[i][0] for i in picked[:args.abandon]}
        late_ids = {plan[i][0] for i in picked[args.abandon:]}
        pool = kc.BlockPool(args.num_blocks, args.seed + 1000)
        # a request that is not done by then has failed (the lease, the read deadline and a margin)
        sched = kc.DecodeScheduler(cfg, pool, server, workers, request_timeout_s=lease_ms / 1000.0 + 30.0)
        finished: List[kc.DecodeRequest] = []
        nxt = 0
        while len(finished) < len(plan):
            if time.monotonic() > deadline:
                raise TimeoutError("--timeout-s %.0f passed with %d of %d requests finished"
                                   % (args.timeout_s, len(finished), len(plan)))
            while nxt < len(plan) and sched.in_flight < args.inflight:
                req_id, ntok = plan[nxt]
                if not sched.submit(req_id, ntok, req_id in abandoned_ids, req_id in late_ids):
                    break  # local blocks come back as requests finish
                nxt += 1
            for r in sched.step(0.02):
                finished.append(r)
                kc.say(request_line(r))
                if r.state == "failed":
                    run.problem("request %d: %s" % (r.req_id, r.error))
        # a late request reads nothing and notifies nobody: to the prefill side it is abandoned
        read = [r for r in finished if r.state not in ("abandoned", "stale")]

        # the prefill side settles: abandoned requests expire one lease after they were prefilled
        stats = settle(server, lease_ms)
        c = stats["counters"]
        n_read, n_abandoned = len(read), len(finished) - len(read)
        blocks_read = sum(r.num_blocks for r in read)
        blocks_abandoned = sum(r.num_blocks for r in finished if r.state in ("abandoned", "stale"))
        run.expect("late requests refused as stale", sum(1 for r in finished if r.state == "stale"), args.late)
        run.expect("prefill notifications from readers", c["notes_ok"], n_read * pairs)
        run.expect("prefill notifications expired", c["notes_expired"], n_abandoned * pairs)
        run.expect("prefill requests freed by notification", c["requests_freed_by_notification"], n_read)
        run.expect("prefill blocks freed by notification", c["blocks_freed_by_notification"], blocks_read)
        run.expect("prefill requests freed by lease expiry", c["requests_freed_by_expiry"], n_abandoned)
        run.expect("prefill blocks freed by lease expiry", c["blocks_freed_by_expiry"], blocks_abandoned)
        for name in ("notes_failed", "notes_unexpected", "notes_wrong_rank", "requests_refused"):
            run.expect("prefill " + name.replace("_", " "), c[name], 0)
        run.expect("prefill requests still held", stats["active"] + stats["waiting"], 0)
        run.expect("prefill pool free blocks", stats["free_blocks"], stats["num_blocks"])
        run.expect("decode pool free blocks", pool.num_free, args.num_blocks)

        byes = workers.stop()
        for rank in range(args.decode_tp):
            bye = byes.get(rank)
            if bye is None:
                run.problem("decode rank %d did not stop cleanly (exit codes %s)" % (rank, workers.exit_codes()))
                continue
            st = bye["stats"]
            run.expect("decode rank %d reads still in flight" % rank, bye["in_flight"], 0)
            # each late request's reads, one per prefill rank read from, end KVX_ERR_STALE
            run.expect("decode rank %d kvx reads failed" % rank, st["reads_failed"], args.late * len(sources[rank]))
            run.expect("decode rank %d kvx reads completed" % rank, st["reads_completed"], n_read * len(sources[rank]))
        if not args.keep_server:
            kc.call(server, {"op": "shutdown"}, "bye", timeout_s=30)

        lat = [r.latency_ms for r in read if r.state == "ok"]
        rd = [r.read_ms for r in read if r.state == "ok"]
        nbytes = sum(r.nbytes for r in read)
        secs = time.monotonic() - t_start
        return [
            "  total: %d requests (%d read, %d abandoned), %d blocks, %.1f MB read in %d reads, %.1f s"
            % (len(finished), n_read, n_abandoned, blocks_read + blocks_abandoned, nbytes / 1e6,
               sum(r.reads for r in read), secs),
            "latency (sent -> every decode rank checked): p50 %.2f ms, p99 %.2f ms, max %.2f ms"
            % (percentile(lat, 0.5), percentile(lat, 0.99), max(lat, default=0.0)),
            "read (first post -> last completion): p50 %.2f ms, p99 %.2f ms" % (percentile(rd, 0.5), percentile(rd, 0.99)),
            "transports: %s" % ", ".join("%s x%d" % (t, transports.count(t)) for t in sorted(set(transports))),
            "prefill freed: by notification %d requests (%d blocks, %d notifications), by lease expiry %d requests "
            "(%d blocks, %d expired); pool %d/%d free"
            % (c["requests_freed_by_notification"], c["blocks_freed_by_notification"], c["notes_ok"],
               c["requests_freed_by_expiry"], c["blocks_freed_by_expiry"], c["notes_expired"], stats["free_blocks"],
               stats["num_blocks"]),
        ]
    finally:
        if workers is not None:
            workers.stop()
        server.close()


def request_line(r: kc.DecodeRequest) -> str:
    head = "req %d: %d block%s" % (r.req_id, r.num_blocks, "" if r.num_blocks == 1 else "s")
    if r.state == "abandoned":
        return head + ", abandoned (never read: the prefill lease frees it)"
    if r.state == "stale":
        return head + ", read after its lease ran out: refused as stale, as it must be (%s)" % (r.error or "")[-160:]
    if r.state == "ok":
        return head + ", %d reads, %.2f ms (read %.2f ms), ok" % (r.reads, r.latency_ms, r.read_ms)
    return head + ", %d reads, %.2f ms, FAILED: %s" % (r.reads, r.latency_ms, r.error)


def settle(server: Any, lease_ms: int) -> Dict[str, Any]:
    """Ask the prefill server for its counters until no request holds blocks
    there, for at most one lease and a margin."""
    deadline = time.monotonic() + lease_ms / 1000.0 + 5.0
    while True:
        stats = kc.call(server, {"op": "stats"}, "stats", timeout_s=30)
        if stats["active"] + stats["waiting"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
