"""Pulls the UCX worker address out of an owner's published NIXL metadata
and writes it, alone, to a file: that is all the rogue gets.

    nixl_worker_addr.py OWNER_MD OUTFILE

The agent metadata (nixlAgentData::getLocalMD) is a nixlSerDes string:
"nixlSerDes|", then tagged fields, each TAG, an 8-byte little-endian length,
the bytes and "|": "Agent" (name), "Conns" (8-byte count), then per backend
"t" (its name) and "c" (its connection info; for UCX, nixlUcxEngine::getConnInfo
returns the worker address of its first worker), then the memory section.
Only the fields up to the "c" of "UCX" are read; the memory section (with
the registered regions and their rkeys) is not used."""
from __future__ import annotations

import pickle
import struct
import sys


def fields(blob: bytes):
    if not blob.startswith(b"nixlSerDes|"):
        raise ValueError("not a nixlSerDes string")
    off = 11
    while off < len(blob):
        for tag in (b"Agent", b"Conns", b"t", b"c"):
            if blob.startswith(tag, off) and off + len(tag) + 8 <= len(blob):
                (n,) = struct.unpack_from("<Q", blob, off + len(tag))
                start = off + len(tag) + 8
                if start + n < len(blob) and blob[start + n:start + n + 1] == b"|":
                    yield tag.decode(), blob[start:start + n]
                    off = start + n + 1
                    break
        else:
            return  # the memory section (or something unknown): stop


def worker_address(agent_md: bytes) -> bytes:
    backend = None
    for tag, value in fields(agent_md):
        if tag == "t":
            backend = value
        elif tag == "c" and backend == b"UCX":
            return value
    raise ValueError("no UCX connection info in the metadata")


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        md = pickle.load(f)  # lib_nixl publishes a pickle; a harness-side step, not the rogue
    addr = worker_address(md["agent"])
    with open(sys.argv[2], "wb") as f:
        f.write(addr)
    print("UCX worker address: %d bytes" % len(addr))
