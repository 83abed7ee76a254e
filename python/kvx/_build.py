"""Builds libkvx.so from kvx's headers with the backends this machine has.

Run by setup.py (``pip install ./python``) and by ``python -m kvx._build OUT``.
Nothing here is compiled against Python: the library is plain C, bound with
ctypes, so one build serves every CPython and every torch.

Backends:
  UCX        ``pkg-config ucx``, or the prefix in ``$KVX_UCX_PREFIX`` (a UCX
             install or the ``libucx`` wheel's package directory: include/, lib/)
  libfabric  ``pkg-config libfabric``
  CUDA       ``$CUDA_HOME`` or /usr/local/cuda (include/cuda.h): a second
             library, libkvx_cuda.so, the same backends plus KVX_CUDA (GPU
             caches, the CUDA IPC backend, stream-ordered completion)
``KVX_PY_BACKENDS=ucx,ofi,cuda`` (or ``none``) narrows the choice; the local
backend (memcpy between contexts of one process) is always there.

libkvx_cuda.so is not linked against libcuda: the driver's library exists
only where a GPU driver is installed, and the package must import
everywhere. The loader (kvx/__init__.py) opens libcuda.so.1 into the global
namespace first and only then this library, whose cu* calls bind to it; where
libcuda.so.1 cannot be opened it loads libkvx.so, without CUDA.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

# The C file of the library: kvx's implementation, which exports
# kvx_abi_fields(), the table the bindings check their struct mirrors against.
_SOURCE = r"""
#define KVX_IMPLEMENTATION
#include "kvx.h"
"""


def _run(cmd: List[str]) -> Optional[str]:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def headers_dir() -> str:
    """The repository root that holds kvx.h ($KVX_HEADERS overrides)."""
    env = os.environ.get("KVX_HEADERS")
    if env:
        return env
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "..", ".."), os.path.join(here, "include")):
        if os.path.exists(os.path.join(cand, "kvx.h")):
            return os.path.abspath(cand)
    raise RuntimeError("kvx: cannot find kvx.h (set KVX_HEADERS to the directory that holds it)")


def find_backends() -> Dict[str, Dict[str, List[str]]]:
    """Each backend found: its -D, compile and link flags."""
    want = os.environ.get("KVX_PY_BACKENDS", "ucx,ofi,cuda")
    wanted = set() if want == "none" else {w.strip() for w in want.split(",") if w.strip()}
    found: Dict[str, Dict[str, List[str]]] = {}
    if "ucx" in wanted:
        prefix = os.environ.get("KVX_UCX_PREFIX")
        if prefix:
            lib = os.path.join(prefix, "lib")
            found["ucx"] = {"defs": ["-DKVX_UCX"], "cflags": ["-I" + os.path.join(prefix, "include")],
                            "libs": ["-L" + lib, "-Wl,-rpath," + lib, "-lucp", "-luct", "-lucs", "-lucm"]}
        else:
            cflags, libs = _run(["pkg-config", "--cflags", "ucx"]), _run(["pkg-config", "--libs", "ucx"])
            if libs is not None:
                found["ucx"] = {"defs": ["-DKVX_UCX"], "cflags": shlex.split(cflags or ""), "libs": shlex.split(libs)}
    if "ofi" in wanted:
        cflags, libs = _run(["pkg-config", "--cflags", "libfabric"]), _run(["pkg-config", "--libs", "libfabric"])
        if libs is not None:
            found["ofi"] = {"defs": ["-DKVX_OFI"], "cflags": shlex.split(cflags or ""), "libs": shlex.split(libs)}
    cuda = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if "cuda" in wanted and os.path.exists(os.path.join(cuda, "include", "cuda.h")):
        # -isystem: cuda.h has unnamed unions that -pedantic refuses in C99
        found["cuda"] = {"defs": ["-DKVX_CUDA"], "cflags": ["-isystem", os.path.join(cuda, "include")], "libs": []}
    return found


def _compile(cc: str, hdr: str, backends: Dict[str, Dict[str, List[str]]], out: str) -> List[str]:
    """One shared library with these backends; returns the command."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kvx_py.c")
        with open(src, "w") as f:
            f.write(_SOURCE)
        cmd = [cc, "-std=c99", "-D_GNU_SOURCE", "-O2", "-g", "-fPIC", "-shared",
               "-Wall", "-Wextra", "-pedantic", "-Werror", "-I" + hdr]
        for b in backends.values():
            cmd += b["defs"] + b["cflags"]
        cmd += [src, "-o", out]
        for b in backends.values():
            cmd += b["libs"]
        cmd += ["-lpthread"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("kvx: building %s failed:\n%s\n%s%s" % (os.path.basename(out), " ".join(cmd), r.stdout, r.stderr))
    return cmd


def versions(backends: Dict[str, Dict[str, List[str]]]) -> Dict[str, str]:
    """The version of each backend's library as built against (UCX, libfabric, CUDA's headers)."""
    out: Dict[str, str] = {}
    if "ucx" in backends:
        prefix = os.environ.get("KVX_UCX_PREFIX")
        v = None
        if prefix:
            try:
                with open(os.path.join(prefix, "include", "ucp", "api", "ucp_version.h")) as f:
                    txt = f.read()
                maj = txt.split("UCP_API_MAJOR")[1].split()[0]
                mnr = txt.split("UCP_API_MINOR")[1].split()[0]
                v = "%s.%s (%s)" % (maj, mnr, prefix)
            except (OSError, IndexError):
                v = "unknown (%s)" % prefix
        else:
            v = _run(["pkg-config", "--modversion", "ucx"])
        out["ucx"] = v or "unknown"
    if "ofi" in backends:
        out["ofi"] = _run(["pkg-config", "--modversion", "libfabric"]) or "unknown"
    if "cuda" in backends:
        out["cuda"] = "headers of %s" % (os.environ.get("CUDA_HOME") or "/usr/local/cuda")
    return out


def build(out_dir: str, cc: Optional[str] = None, headers: Optional[str] = None) -> str:
    """Compiles libkvx.so (and libkvx_cuda.so where CUDA's headers are) into
    out_dir; returns what it built, in words (backends and versions). Raises
    on failure, with the compiler's output."""
    cc = cc or os.environ.get("CC", "cc")
    hdr = headers or headers_dir()
    backends = find_backends()
    os.makedirs(out_dir, exist_ok=True)
    host = {k: v for k, v in backends.items() if k != "cuda"}
    info = {"headers": hdr, "libraries": {}}  # type: Dict[str, Any]
    out = os.path.join(out_dir, "libkvx.so")
    info["libraries"]["libkvx.so"] = {"backends": sorted(host) + ["local"], "command": _compile(cc, hdr, host, out)}
    cuda_lib = os.path.join(out_dir, "libkvx_cuda.so")
    if "cuda" in backends:
        info["libraries"]["libkvx_cuda.so"] = {"backends": sorted(backends) + ["local"],
                                               "command": _compile(cc, hdr, backends, cuda_lib)}
    elif os.path.exists(cuda_lib):
        os.remove(cuda_lib)  # a stale one from an earlier build would be loaded
    info["versions"] = versions(backends)
    with open(os.path.join(out_dir, "build_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    return "%s with backends %s" % (out, ", ".join("%s %s" % (b, info["versions"].get(b, "")) if b in info["versions"] else b
                                                  for b in info["libraries"]["libkvx.so"]["backends"])) + (
        "; libkvx_cuda.so with cuda" if "cuda" in backends else "")


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))))
