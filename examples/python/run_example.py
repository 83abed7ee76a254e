"""Both sides in one command: starts prefill_server.py, waits until it
listens, runs decode_client.py with the same flags, stops the server.

    UCX_TLS=tcp UCX_NET_DEVICES=lo python run_example.py --prefill-tp 2 --decode-tp 1 --abandon 2

Takes decode_client.py's flags (and --idle-s for the server). --port 0, the
default here, lets the server pick a free port. Exit status: the client's
(1 also when the client passed but the server did not exit cleanly).
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from typing import IO, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import decode_client  # noqa: E402
import kv_connector as kc  # noqa: E402

LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")


def _forward(stream: IO[str], lines: "queue.Queue[str]") -> None:
    """Echo the server's output, marked, and hand each line to the main thread."""
    for line in stream:
        # one write per line: the client writes to the same stdout
        sys.stdout.write("[prefill] " + line.rstrip("\n") + "\n")
        sys.stdout.flush()
        lines.put(line)


def stop(proc: "subprocess.Popen[str]", grace_s: float) -> Optional[int]:
    """Wait for the server to exit by itself, then terminate, then kill."""
    for escalate in (None, proc.terminate, proc.kill):
        if escalate is not None:
            escalate()
        try:
            return proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            grace_s = 5.0
    return proc.poll()


def main(argv: Optional[List[str]] = None) -> int:
    parser = decode_client.build_parser()
    parser.set_defaults(port=0)
    parser.add_argument("--idle-s", type=float, default=120.0, help="the server's idle deadline")
    args = parser.parse_args(argv)
    bad = decode_client.check_args(args)
    if bad:  # before the server spends its start-up on a run that cannot go
        print("EXAMPLE FAILED: " + "; ".join(bad), flush=True)
        return 2
    # a plain SIGTERM would skip the finally that stops the server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    py = [sys.executable, "-u"]
    server_cmd = py + [os.path.join(HERE, "prefill_server.py")] + kc.argv_of(args, kc.COMMON_FLAGS + ("idle_s",))
    server = subprocess.Popen(server_cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=_forward, args=(server.stdout, lines), daemon=True).start()
    client_rc = 1
    try:
        port = 0
        deadline = time.monotonic() + 120
        while not port:
            if server.poll() is not None and lines.empty():
                print("EXAMPLE FAILED: the prefill server exited (%s) before it listened" % server.returncode, flush=True)
                return 1
            if time.monotonic() > deadline:
                print("EXAMPLE FAILED: the prefill server did not listen within 120 s", flush=True)
                return 1
            try:
                m = LISTENING.search(lines.get(timeout=0.2))
            except queue.Empty:
                continue
            if m:
                port = int(m.group(1))
        client_cmd = py + [os.path.join(HERE, "decode_client.py")] + kc.argv_of(
            args, kc.COMMON_FLAGS + decode_client.CLIENT_FLAGS, port=port)
        try:
            client_rc = subprocess.run(client_cmd, timeout=args.timeout_s + 60).returncode
        except subprocess.TimeoutExpired:
            print("EXAMPLE FAILED: the decode client ran past --timeout-s + 60 s", flush=True)
            client_rc = 1
        except KeyboardInterrupt:
            client_rc = 130
    finally:
        # a client that passed has sent "shutdown"; one that failed may not have,
        # and --keep-server leaves the server running on purpose
        server_rc = stop(server, 15.0 if client_rc == 0 and not args.keep_server else 2.0)
    if client_rc == 0 and server_rc != 0 and not args.keep_server:
        print("EXAMPLE FAILED: the prefill server exited with %s" % server_rc, flush=True)
        return 1
    return client_rc


if __name__ == "__main__":
    sys.exit(main())
