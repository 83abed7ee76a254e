#!/usr/bin/env python3
"""vLLM with kvx as its KV connector, prefill and decode on two hosts, against
one engine alone. Run by tests/vllm/two_hosts.sh, which makes the hosts (two
network namespaces joined by a veth pair) and passes them here.

Each engine runs in its own process tree (vllm.LLM, its engine core and
worker), started with `ip netns exec` and driven over a Unix socket (the
file system is shared between namespaces): prompts in, tokens, logprobs,
kv_transfer_params and prompt-token metrics out. The driver plays vLLM's
P/D proxy: the prompt to the prefill engine with max_tokens 1 and
{"do_remote_decode": true}, then the same prompt with the returned
kv_transfer_params to the decode engine.

Checks (each prints "ok ..." or "FAIL ..."; the exit status is the number of
failures, capped):

  match      greedy tokens and logprobs of prefill+decode equal the single
             engine's, for prompts of 1 to 130 tokens, one at a time and five
             in flight, and again with prefix-cache hits on both sides; the
             decode engine computed none of their prompt tokens (vLLM's
             prompt_tokens_by_source metrics)
  released   the prefill engine's blocks are free once the decode engine read
             them (kv_cache_usage with one probe request running)
  expired    a request the decode engine never reads holds its blocks for the
             lease (lease_ms), then they are freed, and the lease's end is logged
  stale      a read after the lease ended and the blocks were reused fails
             with kvx's StaleError (logged on the decode side), vLLM
             recomputes (kv_load_failure_policy "recompute") and the tokens
             are still the single engine's, never another request's KV
  misrouted  kv_transfer_params of another prompt are refused (the prompt
             hash differs): computed locally, the tokens are right
  killed     the prefill engine killed with a request not yet read: the
             decode engine's load fails within its deadline, vLLM recomputes,
             the tokens are right
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
import traceback
import socket
from multiprocessing.connection import Connection
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
BLOCKS = 128          # small, so that the stale check can cycle through every block
LEASE_MS = 6000
READ_TIMEOUT_MS = 4000
MAX_TOKENS = 12
PREFILL = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
           "remote_block_ids": None, "remote_host": None, "remote_port": None}


# --------------------------------------------------------------------------
# One engine, in its own process (and namespace), serving the driver
# --------------------------------------------------------------------------

def serve(fd: str, name: str) -> None:
    conn = Connection(int(fd))
    opts = conn.recv()
    try:
        import engines

        engines.setup_env()
        kvc = None
        if opts.get("kv_role"):
            kvc = engines.kv_config(opts["kv_role"], connector=opts["connector"], module_path=opts["module"],
                                    engine_id=opts["engine_id"], kv_load_failure_policy="recompute",
                                    kv_connector_extra_config=opts["extra"])
        t0 = time.monotonic()
        llm = engines.make_engine(opts["model_dir"], kvc, num_gpu_blocks_override=BLOCKS,
                                  tensor_parallel_size=opts.get("tp", 1))
        engines.run_prompts(llm, [[7]], 1)  # the first forward after start-up is slow: not in any check
        conn.send(("ready", round(time.monotonic() - t0, 1)))
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            if msg[0] == "usage":  # blocks in use while one 1-token probe runs
                engines.run_prompts(llm, [[5]], 1)
                conn.send(("ok", _usage(llm)))
                continue
            _, prompts, max_tokens, params = msg
            m0 = engines.prompt_metrics(llm)
            t0 = time.monotonic()
            res = engines.run_prompts(llm, prompts, max_tokens, 5, params)
            took = time.monotonic() - t0
            time.sleep(0.2)  # the last step's stats reach the registry
            conn.send(("ok", [r.__dict__ for r in res], engines.metrics_delta(m0, engines.prompt_metrics(llm)), took))
        engines.shutdown(llm)
        conn.send(("stopped", None))
    except BaseException as e:
        try:
            conn.send(("error", "%s: %r\n%s" % (name, e, traceback.format_exc())))
        except Exception:
            pass
        raise


def _usage(llm: Any) -> float:
    for m in llm.get_metrics():
        if m.name == "vllm:kv_cache_usage_perc":
            return float(m.value)
    return -1.0


class Engine:
    """The driver's handle on one engine process."""

    def __init__(self, name: str, ns: Optional[str], env: Dict[str, str], opts: Dict[str, Any], logdir: str) -> None:
        self.name = name
        mine, theirs = socket.socketpair()  # kept open through ip netns exec: the file system is not needed
        cmd = ([] if ns is None else ["ip", "netns", "exec", ns]) + ["env"] + ["%s=%s" % kv for kv in env.items()] + [
            sys.executable, os.path.abspath(__file__), "--serve", str(theirs.fileno()), name]
        self.log_path = os.path.join(logdir, name + ".log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     pass_fds=[theirs.fileno()])
        theirs.close()
        self.conn = Connection(mine.detach())
        self.conn.send(opts)
        self.ready_s: Optional[float] = None
        self.took = 0.0

    def _recv(self, timeout: float = 300) -> Any:
        if not self.conn.poll(timeout):
            raise RuntimeError("%s: no answer in %.0f s (log: %s)" % (self.name, timeout, self.log_path))
        msg = self.conn.recv()
        if msg[0] == "error":
            raise RuntimeError(msg[1])
        return msg

    def ready(self) -> float:
        self.ready_s = self._recv(400)[1]
        return self.ready_s

    def run(self, prompts: List[List[int]], max_tokens: int, params: Optional[List[Dict[str, Any]]] = None,
            timeout: float = 300):
        self.conn.send(("run", prompts, max_tokens, params))
        _, res, metrics, self.took = self._recv(timeout)
        return res, metrics

    def usage(self) -> float:
        self.conn.send(("usage",))
        return self._recv()[1]

    def logged(self) -> str:
        self.log.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.conn.send(("stop",))
                self._recv(60)
            except Exception:
                pass
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.kill()
        self.conn.close()


# --------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------

class Checks:
    """ok/FAIL lines for kvx; for another connector (observe), what it did,
    counted as no failure: the comparison, not a test of it."""

    def __init__(self, observe: str = "") -> None:
        self.failed = 0
        self.passed = 0
        self.observe = observe

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if self.observe:
            print("%s %s: %s%s" % (self.observe, "does" if ok else "does NOT", what, (" (" + detail + ")") if detail and not ok else ""),
                  flush=True)
            return ok
        if ok:
            self.passed += 1
            print("ok %s" % what, flush=True)
        else:
            self.failed += 1
            print("FAIL %s%s" % (what, (": " + detail) if detail else ""), flush=True)
        return ok


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and everything it started."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for p in [root] + root.children(recursive=True):
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def same(d: Dict[str, Any], r: Dict[str, Any], tol: float = 1e-4) -> str:
    """'' if decode's tokens and logprobs are the reference's, else how not."""
    if d.get("finish_reason") not in ("length", "stop"):
        return "finished with %s" % d.get("finish_reason")
    if d["tokens"] != r["tokens"]:
        return "tokens %s, alone %s" % (d["tokens"], r["tokens"])
    for i, (a, b) in enumerate(zip(d["logprobs"], r["logprobs"])):
        t = d["tokens"][i]
        if t in a and t in b and abs(a[t] - b[t]) > tol:
            return "logprob of token %d at %d: %.6f, alone %.6f" % (t, i, a[t], b[t])
    return ""


def bench(a: Any, P: Engine, D: Engine, prompts: List[List[int]], alone: Dict[Any, Dict[str, Any]], timing_log: str) -> None:
    """N requests one at a time: the prefill engine's time, the decode
    engine's time to its first token (a run of max_tokens 1: scheduling, the
    load, one forward), the load's time under the connector's stopwatch
    (handed to the worker to reported finished), each side's CPU seconds,
    and whether the first token is the single engine's."""
    import json

    rows = []
    for p in prompts:
        c0p, c0d = cpu_seconds(P.proc.pid), cpu_seconds(D.proc.pid)
        pres, _ = P.run([p], 1, [dict(PREFILL)])
        dres, _ = D.run([p], 1, [pres[0]["kv_transfer_params"]])
        rows.append({"prefill_s": P.took, "ttft_s": D.took, "cpu_p": cpu_seconds(P.proc.pid) - c0p,
                     "cpu_d": cpu_seconds(D.proc.pid) - c0d, "equal": dres[0]["tokens"][:1] == alone[tuple(p)]["tokens"][:1]})
    loads: Dict[str, Dict[str, float]] = {}
    if os.path.exists(timing_log):
        for line in open(timing_log):
            e = json.loads(line)
            loads.setdefault(e["req"], {}).setdefault(e["ev"], e["t"])
    xfer = sorted(v["done"] - v["start"] for v in loads.values() if "start" in v and "done" in v)[-len(prompts):] if loads else []

    def med(xs: List[float]) -> float:
        xs = sorted(xs)
        return xs[len(xs) // 2] if xs else float("nan")
    print("bench %s %s: %d requests of 500 tokens, one at a time; median transfer %.1f ms (handed to the worker to finished), "
          "decode time to first token %.1f ms, prefill %.1f ms, CPU s per request prefill %.3f decode %.3f, equal first tokens %d/%d"
          % (a.connector, a.backend if a.connector == "kvx" else "ucx", len(rows), med(xfer) * 1e3, med([r["ttft_s"] for r in rows]) * 1e3,
             med([r["prefill_s"] for r in rows]) * 1e3, med([r["cpu_p"] for r in rows]), med([r["cpu_d"] for r in rows]),
             sum(r["equal"] for r in rows), len(rows)), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", nargs=2, metavar=("SOCKET", "NAME"))
    ap.add_argument("--ns", nargs=2, metavar=("PREFILL_NS", "DECODE_NS"))
    ap.add_argument("--ip", nargs=2, metavar=("PREFILL_IP", "DECODE_IP"))
    ap.add_argument("--dev", nargs=2, metavar=("PREFILL_DEV", "DECODE_DEV"))
    ap.add_argument("--model-dir", default=os.path.join(HERE, "..", "..", "build", "vllm-model"))
    ap.add_argument("--logs", default="build/test-logs/vllm")
    ap.add_argument("--backend", default="ucx")
    ap.add_argument("--connector", default="kvx", choices=["kvx", "nixl"],
                    help="nixl: vLLM's NixlConnector in the same engines (its import through tests/vllm/nixl_shim.py)")
    ap.add_argument("--prefill-tp", type=int, default=1)
    ap.add_argument("--read-timeout-ms", type=int, default=READ_TIMEOUT_MS,
                    help="the decode engine's read deadline (more where cores are shared by more workers than they can carry)")
    ap.add_argument("--bench", type=int, default=0, metavar="N",
                    help="then N requests one at a time, timed (both connectors under the same stopwatch)")
    a = ap.parse_args()
    if a.serve:
        serve(*a.serve)
        return 0

    import engines

    engines.setup_env()
    engines.ensure_model(a.model_dir)
    os.makedirs(a.logs, exist_ok=True)
    rnd = random.Random(27)

    def prompt(n: int) -> List[int]:
        return [rnd.randrange(3, 1024) for _ in range(n)]

    singles = [prompt(n) for n in (1, 40, 100)]
    batch = [prompt(n) for n in (7, 32, 64, 65, 130)]
    repeat = [singles[1], batch[2], singles[2]]  # full blocks found in both engines' prefix caches
    p_expire, p_stale, p_other, p_mis, p_killed = prompt(70), prompt(90), prompt(50), prompt(60), prompt(80)
    fillers = [prompt(1000) for _ in range(5)]   # 5 x 32 blocks: every free block is written again
    timed = [prompt(500) for _ in range(a.bench)]
    everything = singles + batch + [p_expire, p_stale, p_other, p_mis, p_killed] + timed
    nixl = a.connector == "nixl"
    cores = os.cpu_count() or 1
    bind_p = "0|1" if a.prefill_tp == 2 and cores >= 2 else "|".join(["0"] * a.prefill_tp)
    bind_d = "1" if cores >= 2 else "0"

    base_env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1",
                "PYTHONPATH": HERE + os.pathsep + os.environ.get("PYTHONPATH", "")}
    c = Checks("NixlConnector" if nixl else "")
    if nixl:
        shim = subprocess.run([sys.executable, os.path.join(HERE, "nixl_shim.py"), os.path.join(a.logs, "nixl-shim")],
                              capture_output=True, text=True)
        if shim.returncode:
            print("NixlConnector cannot be loaded here: %s" % (shim.stderr or shim.stdout).strip())
            return 2
        base_env["PYTHONPATH"] = shim.stdout.strip() + os.pathsep + base_env["PYTHONPATH"]
    conn = {"connector": "TimedNixl" if nixl else ("TimedKvx" if a.bench else "KvxConnector"),
            "module": "timed_connectors" if nixl or a.bench else "kvx.vllm"}
    timing_log = os.path.join(a.logs, "timing-%s.jsonl" % a.connector)
    if os.path.exists(timing_log):
        os.unlink(timing_log)
    engines_up: List[Engine] = []
    try:
        # The single engine first, alone on the cores.
        ref = Engine("alone", None, dict(base_env, VLLM_CPU_OMP_THREADS_BIND="0"),
                     {"model_dir": a.model_dir}, a.logs)
        engines_up.append(ref)
        print("single engine up in %.1f s" % ref.ready(), flush=True)
        alone = {tuple(p): r for p, r in zip(everything, ref.run(everything, MAX_TOKENS)[0])}
        ref.stop()

        common = {"backend": a.backend, "lease_ms": LEASE_MS, "read_timeout_ms": a.read_timeout_ms, "side_channel_port": 5610}
        if nixl:  # its lease, in seconds; its side channel from the environment
            common = {"kv_lease_duration": LEASE_MS // 1000, "kv_recompute_threshold": 0}
        net = {"UCX_TLS": "tcp", "FI_PROVIDER": "tcp", "KVX_TIMING_LOG": timing_log}
        P = Engine("prefill", a.ns[0], dict(base_env, VLLM_CPU_OMP_THREADS_BIND=bind_p, KVX_HOST_ID="kvx-host-a",
                                             FI_TCP_IFACE=a.dev[0], UCX_NET_DEVICES=a.dev[0], VLLM_NIXL_SIDE_CHANNEL_HOST=a.ip[0],
                                             VLLM_NIXL_SIDE_CHANNEL_PORT="5600", **net),
                   dict(conn, model_dir=a.model_dir, kv_role="kv_producer", engine_id="prefill-%d" % os.getpid(), tp=a.prefill_tp,
                        extra=common if nixl else dict(common, side_channel_host=a.ip[0], net_devices=a.dev[0])), a.logs)
        engines_up.append(P)
        D = Engine("decode", a.ns[1], dict(base_env, VLLM_CPU_OMP_THREADS_BIND=bind_d, KVX_HOST_ID="kvx-host-b",
                                            FI_TCP_IFACE=a.dev[1], UCX_NET_DEVICES=a.dev[1], VLLM_NIXL_SIDE_CHANNEL_HOST=a.ip[1],
                                            VLLM_NIXL_SIDE_CHANNEL_PORT="5601", **net),
                   dict(conn, model_dir=a.model_dir, kv_role="kv_consumer", engine_id="decode-%d" % os.getpid(),
                        extra=common if nixl else dict(common, net_devices=a.dev[1])), a.logs)
        engines_up.append(D)
        print("prefill engine up in %.1f s, decode engine in %.1f s" % (P.ready(), D.ready()), flush=True)

        def pd(prompts: List[List[int]], params: Optional[List[Dict[str, Any]]] = None):
            pres, _ = P.run(prompts, 1, [dict(PREFILL) for _ in prompts])
            kv = params or [r["kv_transfer_params"] for r in pres]
            dres, dm = D.run(prompts, MAX_TOKENS, kv)
            return pres, dres, dm

        # match
        for label, group in (("one at a time", [[p] for p in singles]), ("five in flight", [batch]),
                             ("again, with prefix-cache hits on both sides", [repeat])):
            bad, ext, local, want = [], 0.0, 0.0, 0.0
            failed_before = D.logged().count("kvx: request")
            for prompts in group:
                pres, dres, dm = pd(prompts)
                for p, pr, dr in zip(prompts, pres, dres):
                    why = same(dr, alone[tuple(p)])
                    if not pr["kv_transfer_params"]:
                        why = "the prefill engine returned no kv_transfer_params"
                    if why:
                        bad.append("%d tokens: %s" % (len(p), why))
                src = "vllm:prompt_tokens_by_source{source=%s}"
                ext += dm.get(src % "external_kv_transfer", 0)
                local += dm.get(src % "local_compute", 0)
                # what its own cache lacked; a 1-token prompt is vLLM's to compute (it samples from the last one)
                ones = sum(len(p) == 1 for p in prompts)
                want += sum(len(p) for p in prompts) - dm.get(src % "local_cache_hit", 0) - ones
                local -= ones
            c.check(not bad, "match, %s: decode's tokens and logprobs are the single engine's" % label, "; ".join(bad))
            # vLLM counts a load's tokens as read when it admits the request; one that fails is recomputed
            # afterwards, which its counters do not show: the connector's warnings do
            failed = 0 if nixl else D.logged().count("kvx: request") - failed_before
            c.check(local == 0 and ext == want and not failed,
                    "match, %s: the decode engine computed no prompt token it could read (%d read, %d computed, %d loads failed)"
                    % (label, ext, local, failed), "%d tokens read, %d computed, %d wanted read, %d loads failed (%s)"
                    % (ext, local, want, failed, D.log_path))

        if a.bench:
            bench(a, P, D, timed, alone, timing_log)

        # released
        u = P.usage()
        c.check(0 <= u <= 1.5 / (BLOCKS - 1), "released: once read, the prefill engine's blocks are free (usage %.3f with a probe)" % u)

        # expired: the decode engine never reads it
        pres, _ = P.run([p_expire], 1, [dict(PREFILL)])
        held = P.usage()
        time.sleep(LEASE_MS / 1000 + 1.5)
        u = P.usage()
        c.check(held > 1.5 / (BLOCKS - 1) and u <= 1.5 / (BLOCKS - 1) and (nixl or "lease of %d ms ended with no reader done" % LEASE_MS in P.logged()),
                "expired: an unread request held its blocks (usage %.3f), freed at the lease's end (%.3f), logged" % (held, u))

        # stale: read after the lease ended and the blocks were written again
        spres, _ = P.run([p_stale], 1, [dict(PREFILL)])
        time.sleep(LEASE_MS / 1000 + 1.5)
        for f in fillers:  # plain requests, freed at once: they cycle through every free block
            P.run([f], 1)
        dres, _ = D.run([p_stale], MAX_TOKENS, [spres[0]["kv_transfer_params"]])
        why = same(dres[0], alone[tuple(p_stale)])
        log = D.logged()
        c.check(not why and (nixl or ("generation" in log and "retired it" in log)),
                "stale: a read of reused blocks fails with StaleError (logged), vLLM recomputes, the tokens are right",
                why or "no StaleError in %s" % D.log_path)

        # misrouted: another prompt's parameters
        opres, _ = P.run([p_other], 1, [dict(PREFILL)])
        dres, _ = D.run([p_mis], MAX_TOKENS, [opres[0]["kv_transfer_params"]])
        why = same(dres[0], alone[tuple(p_mis)])
        c.check(not why and (nixl or "hold another prompt" in D.logged()),
                "misrouted: kv_transfer_params of another prompt are refused (computed here), the tokens are right", why)

        # killed: the prefill engine dies with a request not yet read
        kpres, _ = P.run([p_killed], 1, [dict(PREFILL)])
        P.kill()
        t0 = time.monotonic()
        limit = a.read_timeout_ms / 1000 + 20
        try:  # a connector that waits on a dead engine for good is a finding, bounded here
            dres, _ = D.run([p_killed], MAX_TOKENS, [kpres[0]["kv_transfer_params"]], timeout=limit + 100)
        except RuntimeError as e:
            c.check(False, "killed: with the prefill engine dead, the decode engine's load fails within %.0f s" % limit,
                    "no answer in %.0f s: %s" % (time.monotonic() - t0, e))
            if not nixl:
                raise
            dres = None  # the decode engine is stuck: nothing more to ask it
        if dres is not None:
            took = time.monotonic() - t0
            why = same(dres[0], alone[tuple(p_killed)])
            c.check(not why and took < limit,
                    "killed: with the prefill engine dead, the decode engine's load fails in %.1f s, vLLM recomputes, the tokens are right"
                    % took, why)
            dres, _ = D.run([singles[1]], MAX_TOKENS)
            c.check(not same(dres[0], alone[tuple(singles[1])]), "killed: the decode engine serves on")
            u = D.usage()
            c.check(0 <= u <= 1.5 / (BLOCKS - 1), "the decode engine ends with every block free (usage %.3f with a probe)" % u)
    except Exception:
        traceback.print_exc()
        c.failed += 1
        for e in engines_up:
            print("--- last lines of %s" % e.log_path)
            print("\n".join(e.logged().splitlines()[-30:]))
    finally:
        for e in engines_up:
            e.stop()
    if not nixl:
        print("%d passed, %d failed" % (c.passed, c.failed))
    return min(c.failed, 100)


if __name__ == "__main__":
    sys.exit(main())
