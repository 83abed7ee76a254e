"""What Python costs a kvx caller: the same calls timed from Python (the kvx
package) and from C (bench/py_overhead.c, calling the very functions the
package loaded), in one process, on one queue, in one run, for reads of
128 random blocks:

  post        Queue.read (block ids as a list, and as numpy uint32 arrays),
              and Queue.read_batch (8 reads in one call, per read), against
              kvx_post with a prepared kvx_read
  completion  Queue.poll returning a batch of 8 finished reads (per read),
              and Ticket.wait on a finished read, against kvx_poll and kvx_wait
  cuda        (backend cuda) a read's post to the moment a torch stream that
              waits for it resumes: Queue.read + Queue.stream_wait against
              the two C calls, each followed by an event on the waiting
              stream and its synchronize

Reads go in batches of 8 posted back to back, as an engine's step posts
them, Python and C batches alternating; a batch is reported once all its
reads have finished (the reader's counters say so), so the numbers are the
calls' own cost, not the transfer. Medians and 99th percentiles; the overhead is Python's median
minus C's. Target: under 2 us per read posted and per completion.

    build/venv/bin/python bench/py_overhead.py --backend local   # make bench-python
    python3 bench/py_overhead.py --backend cuda                  # on a GPU machine
"""
from __future__ import annotations

import argparse
import ctypes as C
import json
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from typing import Any, Dict, List

import numpy as np

import kvx

NB, BS, HEADS, DIM, LAYERS = 1024, 16, 1, 8, 2  # 256-byte blocks: the calls, not the copies, dominate


def layers_for(backend: str, fill: int) -> List[Any]:
    shape = (2, NB, BS, HEADS, DIM)
    if backend == "cuda":
        import torch
        return [torch.full(shape, fill, dtype=torch.int16, device="cuda") for _ in range(LAYERS)]
    return [np.full(shape, fill, dtype=np.uint16) for _ in range(LAYERS)]


def owner(conn: Any, backend: str) -> None:
    with kvx.Context("prefill", backend=backend, timeout_ms=10000) as ctx:
        ctx.register_cache(layers_for(backend, 7), layout="NHD")
        conn.send(ctx.metadata())
        conn.poll(600)


def ready(ctx: kvx.Context, completed: int) -> None:
    """Until the reader has completed this many reads (outside every timed call)."""
    until = time.monotonic() + 10
    while ctx.stats()["reads_completed"] < completed:
        if time.monotonic() > until:
            raise RuntimeError("a read did not complete within 10 s")
        time.sleep(20e-6)


def summary(ns: List[int]) -> Dict[str, float]:
    s = sorted(ns)
    return {"median_us": statistics.median(s) / 1e3, "p99_us": s[min(len(s) - 1, int(len(s) * 0.99))] / 1e3, "n": len(s)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="local", choices=["local", "ucx", "ofi", "cuda"])
    ap.add_argument("--blocks", type=int, default=128)
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--helper", default=None, help="py_overhead.so (default: beside the kvx package's library, then build/)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    lib = kvx._load()
    helper_path = a.helper or next((p for p in (os.path.join(os.path.dirname(kvx.library_path()), "..", "py_overhead.so"),
                                                "build/py_overhead.so") if os.path.exists(p)), "build/py_overhead.so")
    h = C.CDLL(helper_path)
    for name in ("kvxb_post", "kvxb_poll", "kvxb_wait", "kvxb_post_stream", "kvxb_post_batch"):
        getattr(h, name).restype = C.c_longlong
    fn = lambda f: C.cast(f, C.c_void_p)  # noqa: E731

    proc = None
    local_owner = None
    if a.backend == "local":
        local_owner = kvx.Context("prefill", backend="local")
        local_owner.register_cache(layers_for("local", 7), layout="NHD")
        md = local_owner.metadata()
    else:
        spawn = mp.get_context("spawn")
        pc, child = spawn.Pipe()
        proc = spawn.Process(target=owner, args=(child, a.backend), daemon=True)
        proc.start()
        if not pc.poll(120):
            raise RuntimeError("the owner sent no metadata")
        md = pc.recv()

    torch = None
    if a.backend == "cuda":
        import torch  # noqa: F811
    rng = random.Random(5)
    res: Dict[str, Any] = {"backend": a.backend, "blocks": a.blocks, "iters": a.iters}
    try:
        with kvx.Context("decode", backend=a.backend, timeout_ms=10000) as ctx:
            ctx.register_cache(layers_for(a.backend, 0), layout="NHD")
            peer = ctx.add_peer(md)
            res["transport"] = peer.transport
            stream = torch.cuda.Stream() if torch else None
            q = ctx.queue(depth=16, cuda_stream=stream)
            # the C side's arguments, made once: none of this belongs in a timed call
            qh = C.c_void_p(q.handle)
            c_post, c_poll, c_wait, c_stream_wait, c_post_batch = (fn(f) for f in (lib.kvx_post, lib.kvx_poll, lib.kvx_wait, lib.kvx_stream_wait,
                                                                                    lib.kvx_post_batch))
            tables = [(rng.sample(range(NB), a.blocks), rng.sample(range(NB), a.blocks)) for _ in range(64)]
            arrays = [(np.array(l, dtype=np.uint32), np.array(r, dtype=np.uint32)) for l, r in tables]
            # the C side's reads: kvx_read structs prepared once, as a C engine would
            creads = []
            for la, ra in arrays:
                rd = kvx._Read()
                rd.peer, rd.cache = peer.handle, ctx.caches[0].handle
                rd.local_blocks, rd.remote_blocks = la.ctypes.data, ra.ctypes.data
                rd.num_blocks = a.blocks
                creads.append(rd)
            t = C.c_uint64()
            st, n = C.c_int(), C.c_int()
            outs = (kvx._Completion * 16)()
            clock = time.perf_counter_ns
            cal = sorted(-(clock() - clock()) for _ in range(2000))[1000]  # a timer pair's own cost
            times: Dict[str, List[int]] = {k: [] for k in ("py_post_list", "py_post_numpy", "py_post_batch", "c_post", "c_post_batch", "c_post_ffi",
                                                            "py_poll", "c_poll", "py_wait", "c_wait")}
            done = 0
            BATCH = 8  # reads posted back to back, then reported: how an engine's step runs

            def post(side: str, i: int, rnd: int) -> int:
                k = i % len(tables)
                if side == "py":  # ids as lists in even rounds, numpy arrays in odd ones
                    ids, key = (tables[k], "py_post_list") if rnd % 2 == 0 else (arrays[k], "py_post_numpy")
                    t0 = clock()
                    tk = q.read(peer, ids[0], ids[1])
                    times[key].append(clock() - t0 - cal)
                    return tk.ticket
                t0 = clock()
                ns = h.kvxb_post(c_post, qh, C.byref(creads[k]), C.byref(t), C.byref(st))
                times["c_post_ffi"].append(clock() - t0 - cal)  # the same, seen from Python: one ctypes call around it
                times["c_post"].append(ns)
                if st.value != 0:
                    raise RuntimeError("kvx_post: %s" % lib.kvx_ctx_error(ctx.handle).decode())
                return int(t.value)

            for rnd in range(max(1, a.iters // (2 * BATCH))):
                for side in (("py", "c") if rnd % 4 < 2 else ("c", "py")):
                    # posts reported by poll: one call returns the batch; per completion
                    tids = [post(side, rnd * BATCH + j, rnd) for j in range(BATCH)]
                    done += BATCH
                    ready(ctx, done)
                    if side == "py":
                        t0 = clock()
                        got = q.poll()
                        times["py_poll"].append((clock() - t0 - cal) // BATCH)
                        assert sorted(c.ticket for c in got) == sorted(tids) and all(c.status == 0 for c in got), got
                    else:
                        times["c_poll"].append(h.kvxb_poll(c_poll, qh, outs, 16, C.byref(n)) // BATCH)
                        assert n.value == BATCH and all(outs[j].status == 0 for j in range(BATCH))
                    # posts reported one by one by wait (on reads already finished)
                    tids = [post(side, rnd * BATCH + j + 1, rnd) for j in range(BATCH)]
                    done += BATCH
                    ready(ctx, done)
                    for tid in tids:
                        if side == "py":
                            tk = kvx.Ticket(q, tid)
                            t0 = clock()
                            tk.wait(10000)
                            times["py_wait"].append(clock() - t0 - cal)
                        else:
                            times["c_wait"].append(h.kvxb_wait(c_wait, qh, C.c_uint64(tid), C.byref(st)))
                            assert st.value == 0
            # BATCH reads in one call: Queue.read_batch (their ids one after
            # another) against kvx_post_batch with prepared kvx_reads, in turn
            cat = [(np.concatenate([arrays[(i + j) % len(arrays)][0] for j in range(BATCH)]),
                    np.concatenate([arrays[(i + j) % len(arrays)][1] for j in range(BATCH)])) for i in range(8)]
            cbatch = []
            for i in range(8):
                rs = (kvx._Read * BATCH)()
                for j in range(BATCH):
                    C.memmove(C.addressof(rs[j]), C.addressof(creads[(i + j) % len(creads)]), C.sizeof(kvx._Read))
                cbatch.append(rs)
            counts = [a.blocks] * BATCH
            tks = (C.c_uint64 * BATCH)()
            for rnd in range(max(2, a.iters // BATCH)):
                if rnd % 2 == 0:
                    lb, rb = cat[rnd % len(cat)]
                    t0 = clock()
                    q.read_batch(peer, lb, rb, counts)
                    times["py_post_batch"].append((clock() - t0 - cal) // BATCH)
                else:
                    times["c_post_batch"].append(h.kvxb_post_batch(c_post_batch, qh, cbatch[rnd % len(cbatch)], BATCH, tks, C.byref(st)) // BATCH)
                    assert st.value == 0
                done += BATCH
                ready(ctx, done)
                assert len(q.poll()) == BATCH
            res["calls"] = {k: summary(v) for k, v in times.items()}
            c = res["calls"]
            res["overhead_us"] = {
                "post (list ids)": c["py_post_list"]["median_us"] - c["c_post"]["median_us"],
                "post (numpy ids)": c["py_post_numpy"]["median_us"] - c["c_post"]["median_us"],
                "post (read_batch of 8, per read)": c["py_post_batch"]["median_us"] - c["c_post_batch"]["median_us"],
                "post: one ctypes call alone": c["c_post_ffi"]["median_us"] - c["c_post"]["median_us"],
                "completion (poll)": c["py_poll"]["median_us"] - c["c_poll"]["median_us"],
                "completion (wait)": c["py_wait"]["median_us"] - c["c_wait"]["median_us"],
            }
            if torch is not None:
                ws = torch.cuda.Stream()
                ev = torch.cuda.Event()
                resume: Dict[str, List[int]] = {"py": [], "c": [], "event_only": []}
                for i in range(a.iters):
                    k = i % len(tables)
                    style = i % 3
                    t0 = clock()
                    if style == 0:
                        tk = q.read(peer, arrays[k][0], arrays[k][1])
                        q.stream_wait(tk, ws)
                    elif style == 1:
                        h.kvxb_post_stream(c_post, c_stream_wait, qh, C.byref(creads[k]),
                                           C.c_void_p(ws.cuda_stream), C.byref(t), C.byref(st))
                        if st.value != 0:
                            raise RuntimeError("post + stream wait: %s" % lib.kvx_ctx_error(ctx.handle).decode())
                        tk = kvx.Ticket(q, int(t.value))
                    ev.record(ws)
                    ev.synchronize()
                    resume[("py", "c", "event_only")[style]].append(clock() - t0 - cal)
                    if style != 2:
                        tk.wait(10000)
                res["post_to_stream_resume"] = {k: summary(v) for k, v in resume.items()}
                res["overhead_us"]["cuda read: post to stream resume"] = (
                    res["post_to_stream_resume"]["py"]["median_us"] - res["post_to_stream_resume"]["c"]["median_us"])
    finally:
        if proc is not None:
            pc.send("bye")
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        if local_owner is not None:
            local_owner.close()

    print("kvx from Python vs C, %d-block reads, backend %s (%s), %d iterations" % (a.blocks, a.backend, res["transport"], a.iters))
    print("  %-22s %12s %12s" % ("call", "median us", "p99 us"))
    for k, v in res["calls"].items():
        print("  %-22s %12.2f %12.2f" % (k, v["median_us"], v["p99_us"]))
    for k, v in res.get("post_to_stream_resume", {}).items():
        print("  %-22s %12.2f %12.2f" % ("resume " + k, v["median_us"], v["p99_us"]))
    worst = max(v for k, v in res["overhead_us"].items() if "alone" not in k)
    for k, v in res["overhead_us"].items():
        print("  Python overhead, %-34s %7.2f us" % (k + ":", v))
    best_post = min(v for k, v in res["overhead_us"].items() if k.startswith("post (") )
    print("  target under 2 us per read posted (best way: %.2f us) and per completion (poll: %.2f us): %s" % (
        best_post, res["overhead_us"]["completion (poll)"],
        "met" if best_post < 2 and res["overhead_us"]["completion (poll)"] < 2 else "NOT met"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
