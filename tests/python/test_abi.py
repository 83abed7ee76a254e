"""The package's struct mirrors against the library's kvx_abi_fields(): they
agree field by field, and the check that runs at load catches what a size
check would not (two fields of one size swapped, a field dropped into the
padding), and a field or struct present on one side only. Run by make test."""
import ctypes as C
import os
import shutil
import subprocess
import sys

import pytest

import kvx
from kvx import _structs

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
GEN = os.path.join(ROOT, "tools", "gen_pymirrors.py")


def table():
    return kvx._abi_table(kvx._load())


def rebuilt(cls, fields):
    """A new ctypes class with cls's name and these fields."""
    return type(cls.__name__, (C.Structure,), {"_fields_": fields})


def swapped(cls, a, b):
    f = list(cls._fields_)
    i, j = [n for n, x in enumerate(f) if x[0] in (a, b)]
    f[i], f[j] = f[j], f[i]
    return rebuilt(cls, f)


def test_mirrors_match_the_library():
    t = table()
    kvx._check_mirrors(t, _structs.MIRRORS)
    assert set(t) == set(_structs.MIRRORS)
    for cname, cls in _structs.MIRRORS.items():
        assert t[cname][None][1] == C.sizeof(cls), cname
        assert [f[0] for f in cls._fields_] == [n for n in t[cname] if n is not None], cname
    # the names the package and its users (bench/py_overhead.py) reach them by
    assert kvx._Read is _structs._Read and kvx._CtxDesc is _structs._CtxDesc
    assert kvx._QueueDesc.cuda.size == C.sizeof(kvx._QueueCuda)


@pytest.mark.parametrize("cname,a,b", [("kvx_layout", "num_blocks", "block_tokens"),
                                       ("kvx_read", "local_blocks", "remote_blocks"),
                                       ("kvx_stats", "reads_posted", "reads_completed"),
                                       ("kvx_ctx_desc", "name", "host_id")])
def test_swapped_fields_are_caught(cname, a, b):
    good = _structs.MIRRORS[cname]
    bad = swapped(good, a, b)
    assert C.sizeof(bad) == C.sizeof(good)  # what the size check alone passed
    with pytest.raises(ImportError) as e:
        kvx._check_mirrors(table(), dict(_structs.MIRRORS, **{cname: bad}), "libkvx.so")
    msg = str(e.value)
    assert "%s.%s: offset" % (cname, a) in msg and "%s.%s: offset" % (cname, b) in msg, msg


def test_fields_and_structs_on_one_side_only_are_caught():
    n = _structs._Notification
    renamed = rebuilt(n, n._fields_[:-1] + [("tp_size", C.c_int)])  # same size, a field on each side only
    assert C.sizeof(renamed) == C.sizeof(n)
    with pytest.raises(ImportError) as e:
        kvx._check_mirrors(table(), dict(_structs.MIRRORS, kvx_notification=renamed), "libkvx.so")
    assert "kvx_notification.tp_size: here (offset 16, 4 bytes), not in libkvx.so" in str(e.value), str(e.value)
    assert "kvx_notification.peer_tp_size: in libkvx.so, not here" in str(e.value), str(e.value)
    short = rebuilt(n, n._fields_[:-1])
    with pytest.raises(ImportError, match=r"kvx_notification\.peer_tp_size: in libkvx\.so, not here"):
        kvx._check_mirrors(table(), dict(_structs.MIRRORS, kvx_notification=short), "libkvx.so")
    longer = rebuilt(n, n._fields_[:-1] + [("peer_tp_size", C.c_int), ("extra", C.c_int)])
    with pytest.raises(ImportError, match=r"kvx_notification\.extra: here \(offset 20, 4 bytes\), not in"):
        kvx._check_mirrors(table(), dict(_structs.MIRRORS, kvx_notification=longer))
    t = table()
    del t["kvx_stats"]
    with pytest.raises(ImportError, match=r"kvx_stats: mirrored here \(_Stats\), not in"):
        kvx._check_mirrors(t, _structs.MIRRORS)
    t = table()
    t["kvx_new"] = {None: (0, 8), "x": (0, 8)}
    with pytest.raises(ImportError, match=r"kvx_new: in .*, not mirrored here"):
        kvx._check_mirrors(t, _structs.MIRRORS)


def test_the_check_runs_at_load(monkeypatch):
    """_load refuses a library whose table disagrees with the mirrors."""
    bad = swapped(_structs._Layout, "num_heads", "head_dim")
    monkeypatch.setattr(kvx, "_lib", None)
    monkeypatch.setattr(kvx, "_MIRRORS", dict(_structs.MIRRORS, kvx_layout=bad))
    with pytest.raises(ImportError, match=r"kvx_layout\.num_heads: offset 12, 4 bytes in libkvx(_cuda)?\.so; offset 16"):
        kvx._load()


@pytest.mark.skipif(not os.path.exists(GEN), reason="not run from the repository")
def test_generator_check_fails_on_a_stale_module(tmp_path):
    """gen_pymirrors.py --check passes on the tree and fails, with a diff,
    once a public struct changes and _structs.py is not regenerated."""
    ok = subprocess.run([sys.executable, GEN, "--check"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    os.makedirs(tmp_path / "python" / "kvx")
    shutil.copy(os.path.join(ROOT, "python", "kvx", "_structs.py"), tmp_path / "python" / "kvx")
    with open(os.path.join(ROOT, "kvx.h")) as f:
        h = f.read()
    a, b = "    uint32_t num_blocks;\n", "    uint32_t block_tokens;\n"
    assert h.count(a + b) == 1
    (tmp_path / "kvx.h").write_text(h.replace(a + b, b + a))
    stale = subprocess.run([sys.executable, GEN, "--check", "--root", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert stale.returncode == 1, stale.stdout + stale.stderr
    assert '+        ("block_tokens", C.c_uint32),' in stale.stdout and '-        ("block_tokens", C.c_uint32),' in stale.stdout
    assert "python/kvx/_structs.py is stale" in stale.stdout, stale.stdout
