"""make bench-peers: kvx, NIXL and Mooncake on the same KV workload
(bench/peers/workload.py), in one run, every byte checked.

For each cell (block size x owner TP x random/consecutive blocks) and each
library row, the owner processes (one per owner rank) and the reader start
fresh, meet through files in a temporary directory, and report JSON: GB/s,
request latency p50/p99, CPU seconds per GB on the owner and the reader,
peak RSS of each process, and the transport each library chose. A row that
cannot run (refused, crashed, hung past its deadline, wrong bytes) says why,
with the command, and the run goes on.

With --runs N each cell runs every row N times, the rows of a cell taking
turns (round i starts at the i-th row), so that what the machine does
meanwhile falls on every library alike; summary.md then gives each row's
median GB/s with its lowest and highest, the owner's median CPU per GB, and
the best kvx row's median over the best other library's.

    build/peers/bin/python bench/peers/bench_peers.py [--rows kvx-ucx1.13,nixl,...] [--sizes 4096,65536] [--runs 3]
Writes build/bench-peers/results.jsonl, table.md, summary.md and peers.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import statistics
import time
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
OUT = os.path.join(ROOT, "build", "bench-peers")

UCX_TCP = {"UCX_TLS": "tcp", "UCX_NET_DEVICES": "lo"}
# label: (runner, --backend, environment)
ROWS: Dict[str, Tuple[str, str, Dict[str, str]]] = {
    "kvx ucx1.13": ("lib_kvx.py", "ucx", dict(UCX_TCP)),
    "kvx ucx1.22": ("lib_kvx.py", "ucx", dict(UCX_TCP, KVX_LIBRARY=os.path.join(ROOT, "build", "peers", "kvx122", "libkvx.so"))),
    # one connection to each peer (kvx_ucx_desc.connections = 1): the same
    # as the row above in pack; in spread that row opens 4 (the default to
    # another host over TCP; docs/ucx.md, "Connections")
    "kvx ucx1.22 x1": ("lib_kvx.py", "ucx", dict(UCX_TCP, KVX_UCX_CONNECTIONS="1",
                                                 KVX_LIBRARY=os.path.join(ROOT, "build", "peers", "kvx122", "libkvx.so"))),
    "kvx ofi-tcp": ("lib_kvx.py", "ofi", {"FI_PROVIDER": "tcp", "FI_TCP_IFACE": "lo"}),
    "nixl": ("lib_nixl.py", "ucx", dict(UCX_TCP)),
    # NIXL's progress thread polls with a zero timeout (a core per process):
    # the same without it, the owner progressing from its serve loop
    "nixl-noprog": ("lib_nixl.py", "ucx,progress=0,threads=0", dict(UCX_TCP)),
    "mooncake": ("lib_mooncake.py", "tcp", {}),
}
# GPU memory (--device cuda), two processes on one GPU: each library picks
# its transports itself (NIXL refuses UCX_TLS=tcp on a host with GPUs).
# UCX leaves cuda_ipc gets off where GPUs are not joined by NVLink (one GPU
# included): "ipc-get" rows turn them on, as an engine on such a host would.
UCX122_GPU = os.path.join(ROOT, "build", "gpu", "ucx122")
IPC_GET = {"UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y"}
GPU_ROWS: Dict[str, Tuple[str, str, Dict[str, str]]] = {
    "kvx cuda": ("lib_kvx.py", "cuda", {}),
    "kvx ucx1.22": ("lib_kvx.py", "ucx", {"KVX_LIBRARY": os.path.join(UCX122_GPU, "python", "libkvx_cuda.so"),
                                          "LD_LIBRARY_PATH+": os.path.join(UCX122_GPU, "libucx", "lib")}),
    "kvx ucx1.22 ipc-get": ("lib_kvx.py", "ucx", dict(IPC_GET, KVX_LIBRARY=os.path.join(UCX122_GPU, "python", "libkvx_cuda.so"),
                                                      **{"LD_LIBRARY_PATH+": os.path.join(UCX122_GPU, "libucx", "lib")})),
    "nixl": ("lib_nixl.py", "ucx", {}),
    "nixl ipc-get": ("lib_nixl.py", "ucx", dict(IPC_GET)),
    "mooncake": ("lib_mooncake.py", "tcp", {}),
    "mooncake nvlink": ("lib_mooncake.py", "nvlink_intra", {}),
}


def row_of(label: str, device: str) -> Tuple[str, str, Dict[str, str]]:
    """A row's runner, backend and environment; "NAME+" entries are prepended to $NAME."""
    runner, backend, env = (GPU_ROWS if device == "cuda" else ROWS)[label]
    out = {}
    for k, v in env.items():
        if k.endswith("+"):
            k = k[:-1]
            v = v + (":" + os.environ[k] if os.environ.get(k) else "")
        out[k] = v
    return runner, backend, out


def device_copy_gbps(nbytes: int) -> float:
    """The reference on the GPU: one large device-to-device copy, GB/s (read + write of nbytes counted once)."""
    import torch
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        best = max(best, nbytes / (s.elapsed_time(e) / 1e3) / 1e9)
    return best


class TwoHosts:
    """Two network namespaces joined by a veth pair (spread): owners in one,
    the reader in the other, each bound to its own veth address. Removed on
    exit, also on failure."""

    def __init__(self) -> None:
        tag = os.getpid()
        self.a, self.b = "kvxpA%d" % tag, "kvxpB%d" % tag
        self.va, self.vb = "kpa%d" % tag, "kpb%d" % tag
        self.ipa, self.ipb = "10.212.%d.1" % (tag % 250), "10.212.%d.2" % (tag % 250)
        r = self._pair("up", self.a, self.b, self.va, self.vb, self.ipa, self.ipb)
        if r.returncode != 0:
            self.close()
            raise RuntimeError("cannot make two namespaces: %s" % r.stderr.strip())

    @staticmethod
    def _pair(what: str, *args: str) -> "subprocess.CompletedProcess[str]":
        """netns_pair_up / netns_pair_down of tests/lib/netns_pair.sh, which the shell scripts share."""
        return subprocess.run(["bash", "-c", '. "$0" && netns_pair_%s "$@"' % what, os.path.join(ROOT, "tests", "lib", "netns_pair.sh")] + list(args),
                              capture_output=True, text=True)

    def side(self, owner: bool) -> Tuple[List[str], Dict[str, str]]:
        """The command prefix and environment of one side."""
        ns, dev, ip, host = (self.a, self.va, self.ipa, "kvx-host-a") if owner else (self.b, self.vb, self.ipb, "kvx-host-b")
        return ["ip", "netns", "exec", ns], {"UCX_NET_DEVICES": dev, "FI_TCP_IFACE": dev, "KVX_HOST_ID": host,
                                             "KVX_PEERS_HOST": ip}

    def close(self) -> None:
        self._pair("down", self.a, self.b, self.va)


def blocks_per_request(block_bytes: int, layers: int) -> int:
    """32 blocks, fewer for large ones: about 8 MiB per request and owner rank."""
    return max(2, min(32, (8 << 20) // (layers * 2 * block_bytes)))


def run_cell(label: str, cell: Dict[str, Any], deadline_s: float, logdir: str,
             hosts: Optional[TwoHosts] = None) -> Dict[str, Any]:
    """One library on one cell: pack (this host, loopback) when hosts is None, else spread."""
    runner, backend, env_add = row_of(label, cell.get("device", "cpu"))
    env_add = dict(env_add, KVX_PEERS_HOST="127.0.0.1")
    pre_o: List[str] = []
    pre_r: List[str] = []
    env_o = env_r = env_add
    if hosts is not None:
        pre_o, eo = hosts.side(True)
        pre_r, er = hosts.side(False)
        env_o, env_r = dict(env_add, **eo), dict(env_add, **er)
    rdv = tempfile.mkdtemp(prefix="kvx-peers-")
    args = ["--library", label.split()[0], "--backend", backend, "--rdv", rdv, "--deadline-s", str(deadline_s)]
    for k, v in cell.items():
        args += ["--" + k.replace("_", "-"), str(v).lower() if isinstance(v, bool) else str(v)]
    py = sys.executable
    script = os.path.join(HERE, runner)
    mode = "pack" if hosts is None else "spread"
    name = "%s_%s_%s_tp%d_%d_%s" % (label.replace(" ", "-"), cell.get("layout", "HND"), "rand" if cell["random_blocks"] else "cons",
                                    cell["owner_tp"], cell["block_bytes"], mode)
    cmd_reader = pre_r + ["env"] + ["%s=%s" % kv for kv in env_r.items()] + [py, script, "--role", "reader"] + args
    shown = " ".join(shlex.quote(c) for c in cmd_reader)
    row: Dict[str, Any] = {"library": label, "mode": mode, **cell, "ok": False, "error": "", "command": shown}
    procs: List[subprocess.Popen] = []
    logs = []
    try:
        for r in range(cell["owner_tp"]):
            lf = open(os.path.join(logdir, name + "_owner%d.log" % r), "w")
            logs.append(lf)
            cmd = pre_o + ["env"] + ["%s=%s" % kv for kv in env_o.items()] + [py, script, "--role", "owner", "--rank", str(r)] + args
            procs.append(subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True))
        lf = open(os.path.join(logdir, name + "_reader.log"), "w")
        logs.append(lf)
        reader = subprocess.Popen(cmd_reader, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(reader)
        try:
            rc = reader.wait(deadline_s + 30)
        except subprocess.TimeoutExpired:
            rc = None
        until = time.monotonic() + 15
        for p in procs[:-1]:
            try:
                p.wait(max(0.1, until - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        reports = {}
        for f in os.listdir(rdv):
            if f.endswith(".json") and not f.startswith("."):
                with open(os.path.join(rdv, f)) as fh:
                    reports[f[:-5]] = json.load(fh)
        rd = reports.get("reader0")
        if rc is None:
            row["error"] = "hung: the reader was still running %.0f s after its deadline (killed)" % 30
        elif rd is None:
            row["error"] = "the reader exited %s without a report (crash?): see %s" % (rc, os.path.join(logdir, name + "_reader.log"))
        else:
            row.update({k: rd[k] for k in ("ok", "error", "transport", "version", "gbps", "lat_p50_ms", "lat_p99_ms", "bytes")})
            row["reader_cpu_s_per_gb"] = rd["cpu_s_per_gb"]
            row["reader_rss_mb"] = rd["max_rss_mb"]
            owners = [reports[k] for k in sorted(reports) if k.startswith("owner")]
            if rd["bytes"] and owners:
                row["owner_cpu_s_per_gb"] = sum(o["cpu_s"] for o in owners) / (rd["bytes"] / 1e9)
                row["owner_rss_mb"] = max(o["max_rss_mb"] for o in owners)
            if len(owners) < cell["owner_tp"]:
                row["error"] = (row["error"] + "; " if row["error"] else "") + "%d of %d owners reported" % (len(owners), cell["owner_tp"])
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except OSError:
                    pass
                p.wait()
        for lf in logs:
            lf.close()
        shutil.rmtree(rdv, ignore_errors=True)
    return row


def table(rows: List[Dict[str, Any]]) -> str:
    """Markdown: one line per cell and library, and kvx / NIXL for kvx's rows."""
    def key(r: Dict[str, Any]) -> Tuple[Any, ...]:
        return (r["mode"], r.get("layout", "HND"), r["owner_tp"], r["random_blocks"], r["block_bytes"])
    nixl = {key(r): r for r in rows if r["library"] == "nixl" and r["ok"]}
    out = ["| mode | layout | TP | blocks | block | library | GB/s | kvx/NIXL | p50 ms | p99 ms | owner CPU s/GB | reader CPU s/GB | owner RSS MB | reader RSS MB | transport | version |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lay = r.get("layout", "HND")
        size = "%d KiB" % (r["block_bytes"] >> 10)
        kind = "random" if r["random_blocks"] else "consecutive"
        if not r["ok"]:
            out.append("| %s | %s | %d->1 | %s | %s | %s | FAILED: %s | | | | | | | | `%s` | |" % (
                r["mode"], lay, r["owner_tp"], kind, size, r["library"], r["error"].replace("|", "/")[:300], r["command"]))
            continue
        ratio = ""
        if r["library"].startswith("kvx") and key(r) in nixl and nixl[key(r)]["gbps"]:
            ratio = "%.2f" % (r["gbps"] / nixl[key(r)]["gbps"])
        out.append("| %s | %s | %d->1 | %s | %s | %s | %.3f | %s | %.2f | %.2f | %.2f | %.2f | %.0f | %.0f | %s | %s |" % (
            r["mode"], lay, r["owner_tp"], kind, size, r["library"], r["gbps"], ratio, r["lat_p50_ms"], r["lat_p99_ms"],
            r.get("owner_cpu_s_per_gb", 0.0), r["reader_cpu_s_per_gb"], r.get("owner_rss_mb", 0.0), r["reader_rss_mb"],
            r["transport"], r.get("version", "")))
    return "\n".join(out) + "\n"


def summary(rows: List[Dict[str, Any]]) -> str:
    """Markdown: per cell, each library's median GB/s (lowest-highest) over
    its runs, the best kvx row's median over the best other library's, and
    the owner's median CPU seconds per GB. A failed run counts as 0 GB/s."""
    def cell(r: Dict[str, Any]) -> Tuple[Any, ...]:
        return (r["mode"], r.get("layout", "HND"), r["owner_tp"], r["random_blocks"], r["block_bytes"])
    libs: List[str] = []
    for r in rows:
        if r["library"] not in libs:
            libs.append(r["library"])
    runs: Dict[Tuple[Any, ...], Dict[str, List[Dict[str, Any]]]] = {}
    for r in rows:
        runs.setdefault(cell(r), {}).setdefault(r["library"], []).append(r)
    n = max((len(v) for c in runs.values() for v in c.values()), default=0)
    out = ["GB/s, median (lowest-highest) of %d run%s; best kvx / best peer: medians" % (n, "" if n == 1 else "s"), "",
           "| mode | layout | TP | blocks | block | " + " | ".join(libs) + " | best kvx / best peer |",
           "|" + "---|" * (len(libs) + 6)]
    cpu = ["", "Owner CPU seconds per GB, median", "",
           "| mode | layout | TP | blocks | block | " + " | ".join(libs) + " |", "|" + "---|" * (len(libs) + 5)]
    for c in sorted(runs):
        mode, lay, tp, rnd, bb = c
        head = "| %s | %s | %d->1 | %s | %d KiB | " % (mode, lay, tp, "random" if rnd else "consecutive", bb >> 10)
        med: Dict[str, float] = {}
        cols, cpus = [], []
        for lib in libs:
            rs = runs[c].get(lib, [])
            g = [r["gbps"] if r["ok"] else 0.0 for r in rs]
            o = [r["owner_cpu_s_per_gb"] for r in rs if r["ok"] and "owner_cpu_s_per_gb" in r]
            if not g:
                cols.append("")
                cpus.append("")
                continue
            med[lib] = statistics.median(g)
            cols.append("%.2f (%.2f-%.2f)" % (med[lib], min(g), max(g)) if len(g) > 1 else "%.2f" % g[0])
            cpus.append("%.2f" % statistics.median(o) if o else "")
        kvx = [v for lib, v in med.items() if lib.startswith("kvx")]
        peer = [v for lib, v in med.items() if not lib.startswith("kvx")]
        ratio = "%.2f" % (max(kvx) / max(peer)) if kvx and peer and max(peer) > 0 else ""
        out.append(head + " | ".join(cols) + " | " + ratio + " |")
        cpu.append(head + " | ".join(cpus) + " |")
    return "\n".join(out + cpu) + "\n"


# GB/s on a log axis once the plotted values span this factor or more: the GPU
# rows run from 0.03 GB/s (NHD, 4 KiB) to 77 GB/s (kvx's CUDA backend), where a
# linear axis draws the small blocks, where kvx leads 10-30x, as one flat line.
LOG_Y_SPAN = 10.0


def plot(rows: List[Dict[str, Any]], png: str) -> Optional[str]:
    """One panel per (TP, random/consecutive), a line per library, GB/s over the block size.
    The GB/s axis is logarithmic (every panel alike) when the values span LOG_Y_SPAN or more."""
    if not shutil.which("gnuplot"):
        return "gnuplot is not installed: no plot"
    libs = sorted({r["library"] for r in rows})
    panels = sorted({(r["mode"], r.get("layout", "HND"), r["owner_tp"], r["random_blocks"]) for r in rows})
    gbps = [r["gbps"] for r in rows if r["ok"] and r["gbps"] > 0]
    log_y = bool(gbps) and max(gbps) >= LOG_Y_SPAN * min(gbps)
    tmp = tempfile.mkdtemp(prefix="kvx-peers-plot-")
    script = ["set terminal pngcairo noenhanced size 1400,%d" % ((520 if log_y else 450) * ((len(panels) + 1) // 2)),
              "set output '%s'" % png, "set multiplot layout %d,2" % ((len(panels) + 1) // 2),
              "set logscale x 2", "set format x '%.0b %BB'", "set xlabel 'block (per layer, K or V, owner rank)'",
              "set ylabel 'GB/s%s'" % (" (log scale)" if log_y else ""),
              "set key top left", "set grid"]
    if log_y:
        # the key under each panel: on a log axis the lines run through the top left
        script += ["set logscale y 10", "set format y '%g'", "set mytics 10", "set grid mytics", "set key below horizontal"]
    for mode, lay, tp, rnd in panels:
        plots = []
        for lib in libs:
            by_size: Dict[int, List[float]] = {}  # several runs: their median
            for r in rows:
                if r["library"] == lib and r["mode"] == mode and r.get("layout", "HND") == lay and r["owner_tp"] == tp \
                        and r["random_blocks"] == rnd and r["ok"] and (r["gbps"] > 0 or not log_y):
                    by_size.setdefault(r["block_bytes"], []).append(r["gbps"])
            pts = sorted((bb, statistics.median(g)) for bb, g in by_size.items())
            if not pts:
                continue
            f = os.path.join(tmp, "%s_%s_%s_%d_%d.dat" % (lib.replace(" ", "_"), mode, lay, tp, rnd))
            with open(f, "w") as fh:
                fh.write("\n".join("%d %f" % p for p in pts) + "\n")
            # one line type per library, so a library has one colour in every panel
            plots.append("'%s' using 1:2 with linespoints lt %d title '%s'" % (f, libs.index(lib) + 1, lib))
        script.append("set title '%s, %s, TP %d->1, %s blocks'" % (mode, lay, tp, "random" if rnd else "consecutive"))
        script.append("plot " + ", ".join(plots) if plots else "plot 0 title 'no row ran'")
    script.append("unset multiplot")
    r = subprocess.run(["gnuplot"], input="\n".join(script), text=True, capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return None if r.returncode == 0 else "gnuplot: " + r.stderr.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=None, help="comma-separated labels of " + ", ".join(ROWS)
                    + " (default: all of them); with --device cuda: of " + ", ".join(GPU_ROWS))
    ap.add_argument("--sizes", default="4096,16384,65536,262144,1048576")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--patterns", default="random,consecutive")
    ap.add_argument("--layouts", default="HND", help="HND, NHD: the reader's layout (in NHD an owner rank's block lands as a piece per token)")
    ap.add_argument("--check", default="", help="each | batch (default: batch on the GPU, each on the host): see workload.py")
    ap.add_argument("--modes", default="pack,spread", help="pack: this host over loopback; spread: two network namespaces")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--request-bytes", type=int, default=128 << 20, help="bytes each row moves per cell (about)")
    ap.add_argument("--inflight", type=int, default=8)
    ap.add_argument("--deadline-s", type=float, default=120)
    ap.add_argument("--runs", type=int, default=1, help="times each row runs each cell, the rows taking turns (summary.md: median and range)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the caches in GPU memory (pack only)")
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--strict", action="store_true", help="exit 1 when a row failed (for tests)")
    ap.add_argument("--replot", action="store_true", help="only the table and plot, from OUT/results.jsonl")
    a = ap.parse_args()
    table_rows = GPU_ROWS if a.device == "cuda" else ROWS
    if a.rows is None:
        a.rows = ",".join(table_rows)
    if a.device == "cuda":
        a.modes = "pack"
    labels = [r.strip() for r in a.rows.split(",") if r.strip()]
    dashed = {k.replace(" ", "-"): k for k in table_rows}  # kvx-ucx1.13: no quoting needed
    labels = [dashed.get(lab, lab) for lab in labels]
    for lab in labels:
        if lab not in table_rows:
            print("unknown row %r: %s" % (lab, ", ".join(table_rows)))
            return 2
    os.makedirs(os.path.join(a.out, "logs"), exist_ok=True)
    rows: List[Dict[str, Any]] = []
    if a.replot:
        with open(os.path.join(a.out, "results.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        labels = []
    jl = open(os.path.join(a.out, "results.jsonl"), "a" if a.replot else "w")
    hosts: Optional[TwoHosts] = None
    try:
        for mode in a.modes.split(",") if labels else []:
            if mode == "spread":
                try:
                    hosts = TwoHosts()
                except RuntimeError as e:
                    print("spread rows skipped: %s" % e)
                    continue
            for lay, tp, pat, bb in [(lay, int(tp), pat, int(bb)) for lay in a.layouts.split(",") for tp in a.tp.split(",")
                                     for pat in a.patterns.split(",") for bb in a.sizes.split(",")]:
                b = blocks_per_request(bb, a.layers)
                per_req = b * a.layers * 2 * bb * tp
                cell = {"block_bytes": bb, "num_layers": a.layers, "blocks_per_request": b, "owner_tp": tp,
                        "random_blocks": pat == "random", "inflight": a.inflight, "device": a.device,
                        "layout": lay, "check": a.check, "requests": max(8, min(512, a.request_bytes // per_req))}
                for i, lab in [(i, labels[(i + j) % len(labels)]) for i in range(max(1, a.runs)) for j in range(len(labels))]:
                    t0 = time.monotonic()
                    row = run_cell(lab, cell, a.deadline_s, os.path.join(a.out, "logs"), hosts if mode == "spread" else None)
                    row["wall_s"] = time.monotonic() - t0
                    row["run"] = i
                    rows.append(row)
                    jl.write(json.dumps(row) + "\n")
                    jl.flush()
                    print("%-6s %-3s %-12s TP %d->1 %-11s %7d B%s: %s" % (mode, lay, lab, tp, pat, bb, " (run %d)" % (i + 1) if a.runs > 1 else "", "%.3f GB/s, p50 %.2f ms, %s" % (
                        row["gbps"], row["lat_p50_ms"], row["transport"]) if row["ok"] else "FAILED: " + row["error"]), flush=True)
    finally:
        if hosts is not None:
            hosts.close()
    jl.close()
    if a.device == "cuda" and not a.replot:
        ref = device_copy_gbps(a.request_bytes)
        print("reference: one %d MiB device-to-device copy: %.1f GB/s" % (a.request_bytes >> 20, ref))
        with open(os.path.join(a.out, "reference.json"), "w") as f:
            json.dump({"device_copy_gbps": ref, "bytes": a.request_bytes}, f)
    md = table(rows)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(md)
    print(md)
    sm = summary(rows)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(sm)
    print(sm)
    why = plot(rows, os.path.join(a.out, "peers.png"))
    print(why or "plot: %s" % os.path.join(a.out, "peers.png"))
    failed = [r for r in rows if not r["ok"]]
    print("%d rows, %d failed" % (len(rows), len(failed)))
    return 1 if a.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
