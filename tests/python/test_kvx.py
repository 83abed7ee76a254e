"""kvx from Python: byte-verified reads between processes (multiprocessing,
spawn) over the default backend (UCX over TCP on loopback in make test), in
vLLM's layouts, with TP splits, notifications, deadlines, a killed owner, and
the bad inputs refused before anything is posted. Run by make test."""
import array
import multiprocessing as mp
import os
import signal
import time
import weakref

import numpy as np
import pytest

import kvx

import generation_owner

try:
    import torch
except ImportError:  # torch is optional for the package; make test installs it
    torch = None

NB, BS, HEADS, DIM, LAYERS = 32, 4, 4, 8, 3
SPAWN = mp.get_context("spawn")


def global_cache(layout, layer, seed, dtype, heads=HEADS):
    """The model's whole layer (every KV head), as the producer fills it."""
    rng = np.random.default_rng(seed * 1000 + layer)
    if layout == "MLA":
        shape = (NB, BS, DIM * 4)
    elif layout == "NHD":
        shape = (2, NB, BS, heads, DIM)
    else:
        shape = (2, NB, heads, BS, DIM)
    return rng.integers(0, 255, size=shape, dtype=np.uint8).view(np.uint8).astype(dtype)


def head_axis(layout):
    return {"NHD": 3, "HND": 2}.get(layout)


def rank_slice(layout, arr, rank, tp, total_heads=HEADS):
    """What TP rank `rank` of `tp` holds of a global layer."""
    ax = head_axis(layout)
    if ax is None:
        return np.ascontiguousarray(arr)
    h = max(total_heads // tp, 1)
    first = rank * total_heads // tp  # replicated heads (fewer than tp): every rank holds one whole
    idx = [slice(None)] * arr.ndim
    idx[ax] = slice(first, first + h)
    return np.ascontiguousarray(arr[tuple(idx)])


def owner(conn, layout, rank, tp, seed, dtype, total_heads, expect, use_torch):
    """A producer process: registers its cache, sends its metadata, reports
    the notifications it gets, stays until told to go."""
    tensors = [rank_slice(layout, global_cache(layout, l, seed, dtype, total_heads), rank, tp, total_heads) for l in range(LAYERS)]
    if use_torch:
        tensors = [torch.from_numpy(t) for t in tensors]
    with kvx.Context("prefill", tp_rank=rank, tp_size=tp, timeout_ms=5000) as ctx:
        ctx.register_cache(tensors, layout=layout, total_heads=total_heads if total_heads != HEADS else None)
        for e in expect:
            ctx.expect(e[0], e[1], readers=e[2] if len(e) > 2 else 1)
        conn.send(ctx.metadata())
        got = []
        while True:
            if conn.poll(0.05):
                msg = conn.recv()
                if msg == "notes":
                    conn.send([(n.id, n.status, n.reader_rank, n.reader_tp_size) for n in got])
                    continue
                break
            got += ctx.notifications()


class Owner:
    def __init__(self, layout="NHD", rank=0, tp=1, seed=1, dtype=np.uint16, total_heads=HEADS, expect=(), use_torch=False):
        self.conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=owner, args=(child, layout, rank, tp, seed, dtype, total_heads, list(expect), use_torch))
        self.proc.start()
        if not self.conn.poll(60):
            self.proc.kill()
            raise RuntimeError("owner did not send its metadata")
        self.md = self.conn.recv()

    def notes(self, settle=0.3):
        time.sleep(settle)
        self.conn.send("notes")
        return self.conn.recv() if self.conn.poll(10) else None

    def stop(self):
        if self.proc.is_alive():
            try:
                self.conn.send("bye")
            except OSError:
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
        self.proc.join(5)


@pytest.fixture(autouse=True)
def loopback(monkeypatch):
    monkeypatch.setenv("UCX_NET_DEVICES", os.environ.get("UCX_NET_DEVICES", "lo"))
    monkeypatch.setenv("UCX_TLS", os.environ.get("UCX_TLS", "tcp"))


def reader_cache(layout, rank, tp, dtype, total_heads=HEADS, use_torch=False):
    zeros = [np.zeros_like(rank_slice(layout, global_cache(layout, 0, 0, dtype, total_heads), rank, tp, total_heads)) for _ in range(LAYERS)]
    return [torch.from_numpy(z) for z in zeros] if use_torch else zeros


def check(layout, local, seed, dtype, rank, tp, dst, src, total_heads=HEADS):
    """Every byte of the read blocks, and the blocks not read still zero."""
    for l, t in enumerate(local):
        got = t.numpy() if hasattr(t, "numpy") else t
        want = rank_slice(layout, global_cache(layout, l, seed, dtype, total_heads), rank, tp, total_heads)
        ax = 0 if layout == "MLA" else 1
        for d, s in zip(dst, src):
            g, w = np.take(got, d, axis=ax), np.take(want, s, axis=ax)
            assert g.tobytes() == w.tobytes(), "layer %d, local block %d <- remote block %d differs" % (l, d, s)
        untouched = sorted(set(range(NB)) - set(dst))
        assert not np.take(got, untouched, axis=ax).any(), "a block not read was written"


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_read_tp1(layout, dtype):
    o = Owner(layout=layout, seed=3, dtype=dtype, expect=[(7, 10000)])
    try:
        with kvx.Context("decode") as ctx:
            local = reader_cache(layout, 0, 1, dtype)
            ctx.register_cache(local, layout=layout)
            peer = ctx.add_peer(o.md)
            assert peer.name == "prefill" and peer.rank == 0 and ":" in peer.transport
            q = ctx.queue()
            src, dst = [5, 17, 2, 30, 9], [0, 1, 2, 3, 31]
            t = q.read(peer, dst, src, notify_id=7, tag=11)
            done, t0 = [], time.monotonic()
            while not done and time.monotonic() - t0 < 10:  # reported once, by poll
                done = q.poll()
                time.sleep(0.005)
            assert [(c.ticket, c.tag, c.status) for c in done] == [(t.ticket, 11, 0)]
            t2 = q.read(peer, [4], [4])
            t2.wait(10000)
            assert t2.done()  # after wait, the outcome is kept
            check(layout, local, 3, dtype, 0, 1, dst + [4], src + [4])
            assert o.notes() == [(7, 0, 0, 1)]
            assert ctx.stats()["reads_completed"] == 2
    finally:
        o.stop()


def test_ucx_connections():
    """ucx_connections reaches kvx_ucx_desc: out of 0..8 refused at Context;
    2 reads every byte, over two connections where UCX allows (1.22 and
    later on both sides) and one otherwise, said in the transport."""
    for bad in (9, -1):
        with pytest.raises(kvx.ArgumentError, match=r"ucx_connections %d: 1 to 8, or 0" % bad):
            kvx.Context("decode", backend="ucx", ucx_connections=bad)
    o = Owner(layout="HND", seed=5)
    try:
        with kvx.Context("decode", backend="ucx", ucx_connections=2, log_level="off") as ctx:
            local = reader_cache("HND", 0, 1, np.uint16)
            ctx.register_cache(local, layout="HND")
            peer = ctx.add_peer(o.md)
            assert peer.transport in ("ucx:tcp (sw)", "ucx:tcp (sw) (2 connections)"), peer.transport
            src, dst = [5, 17, 2, 30, 9, 11], [0, 1, 2, 3, 31, 7]
            ctx.queue().read(peer, dst, src).wait(10000)
            check("HND", local, 5, np.uint16, 0, 1, dst, src)
    finally:
        o.stop()


def test_tp_1_to_2_torch():
    if torch is None:
        pytest.skip("torch is not installed")
    o = Owner(layout="NHD", seed=4, use_torch=True)
    try:
        with kvx.Context("decode", tp_rank=1, tp_size=2) as ctx:
            local = reader_cache("NHD", 1, 2, np.uint16, use_torch=True)
            ctx.register_cache(local, layout="NHD")
            peer = ctx.add_peer(o.md)
            assert peer.heads(ctx.caches[0]) == (2, 2)
            src, dst = list(range(8)), list(range(10, 18))
            ctx.queue().read(peer, dst, src).wait(10000)
            check("NHD", local, 4, np.uint16, 1, 2, dst, src)
    finally:
        o.stop()


@pytest.mark.parametrize("layout,tp_owner,tp_reader,rank", [("HND", 2, 1, 0), ("NHD", 2, 4, 3)])
def test_tp_splits(layout, tp_owner, tp_reader, rank):
    owners = [Owner(layout=layout, rank=r, tp=tp_owner, seed=5) for r in range(tp_owner)]
    try:
        with kvx.Context("decode", tp_rank=rank, tp_size=tp_reader) as ctx:
            local = reader_cache(layout, rank, tp_reader, np.uint16)
            cache = ctx.register_cache(local, layout=layout)
            peers = [ctx.add_peer(o.md) for o in owners]
            sources = [p for p in peers if p.heads(cache)[1] > 0]
            assert len(sources) == (tp_owner // tp_reader if tp_owner > tp_reader else 1)
            q = ctx.queue()
            src, dst = [3, 1, 4, 15, 9, 26], [2, 7, 1, 8, 28, 18]
            for t in [q.read(p, dst, src) for p in sources]:
                t.wait(10000)
            check(layout, local, 5, np.uint16, rank, tp_reader, dst, src)
    finally:
        for o in owners:
            o.stop()


@pytest.mark.parametrize("layout,total_heads", [("HND", 1), ("MLA", HEADS)])
def test_replicated_heads_and_mla(layout, total_heads):
    # one KV head over TP 2 readers, and an MLA latent: each reader holds it whole
    o = Owner(layout=layout, seed=6, total_heads=total_heads)
    try:
        with kvx.Context("decode", tp_rank=1, tp_size=2) as ctx:
            local = reader_cache(layout, 1, 2, np.uint16, total_heads=total_heads)
            c = ctx.register_cache(local, layout=layout, total_heads=total_heads if layout != "MLA" else None)
            p = ctx.add_peer(o.md)
            ctx.queue().read(p, [1, 2, 5], [30, 31, 7], cache=c).wait(10000)
            check(layout, local, 6, np.uint16, 1, 2, [1, 2, 5], [30, 31, 7], total_heads=total_heads)
    finally:
        o.stop()


def stopped(pid, secs=5.0):
    """Wait until pid is really stopped: SIGSTOP lands a moment after kill() returns."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < secs:
        with open("/proc/%d/stat" % pid) as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        time.sleep(0.01)
    raise RuntimeError("process %d did not stop" % pid)


def test_notifications_expire_and_deadlines():
    o = Owner(seed=8, expect=[(1, 10000), (2, 800)])
    try:
        with kvx.Context("decode", timeout_ms=3000) as ctx:
            ctx.register_cache(reader_cache("NHD", 0, 1, np.uint16), layout="NHD")
            peer = ctx.add_peer(o.md)
            ctx.queue().read(peer, [0], [0], notify_id=1).wait(10000)
            notes = sorted(o.notes(settle=1.5))
            assert notes == [(1, 0, 0, 1), (2, -7, -1, 0)], notes  # id 2 was never read: it expired
            # a stopped owner serves nothing over TCP: the read fails at its deadline
            os.kill(o.proc.pid, signal.SIGSTOP)
            stopped(o.proc.pid)
            try:
                t0 = time.monotonic()
                with pytest.raises((kvx.TimeoutError, kvx.PeerError)):
                    ctx.queue().read(peer, [1], [1], timeout_ms=700).wait(10000)
                assert time.monotonic() - t0 < 8
            finally:
                os.kill(o.proc.pid, signal.SIGCONT)
    finally:
        o.stop()


def test_lease_of_several_readers_and_notify_only():
    """A lease of two readers, ranks 0 and 1 of a TP-2 engine reading a TP-1
    owner: rank 1 reads, rank 0 found its blocks locally and only notifies.
    Each arrival comes with the reader's rank and TP size; a lease of three
    that two readers answer expires once, for the third."""
    o = Owner(seed=10, expect=[(5, 10000, 2), (6, 800, 3)])
    try:
        ctxs = [kvx.Context("decode", tp_rank=r, tp_size=2, timeout_ms=3000) for r in range(2)]
        try:
            for r, ctx in enumerate(ctxs):
                local = reader_cache("NHD", r, 2, np.uint16)
                ctx.register_cache(local, layout="NHD")
                peer = ctx.add_peer(o.md)
                q = ctx.queue()
                if r:
                    q.read(peer, [3, 4], [1, 2], notify_id=5).wait(10000)
                    check("NHD", local, 10, np.uint16, r, 2, [3, 4], [1, 2])
                else:
                    q.notify(peer, 5).wait(10000)
                    assert all(not t.any() for t in local)  # nothing was read
                q.notify(peer, 6).wait(10000)
            notes = sorted(o.notes(settle=1.5))
            assert notes == [(5, 0, 0, 2), (5, 0, 1, 2), (6, -7, -1, 0), (6, 0, 0, 2), (6, 0, 1, 2)], notes
            with pytest.raises(kvx.ArgumentError, match="must notify"):
                ctxs[0].queue().read(ctxs[0].peers[0], [], [])
        finally:
            for ctx in ctxs:
                ctx.close()
    finally:
        o.stop()


def test_killed_owner():
    o = Owner(seed=9)
    try:
        with kvx.Context("decode", timeout_ms=3000) as ctx:
            local = reader_cache("NHD", 0, 1, np.uint16)
            ctx.register_cache(local, layout="NHD")
            peer = ctx.add_peer(o.md)
            ctx.queue().read(peer, [0], [0]).wait(10000)
            o.proc.kill()
            o.proc.join(5)
            time.sleep(0.3)
            t0 = time.monotonic()
            with pytest.raises((kvx.PeerError, kvx.TimeoutError)) as e:
                ctx.queue().read(peer, list(range(8)), list(range(8))).wait(10000)
            assert time.monotonic() - t0 < 8
            assert "prefill" in str(e.value) or "peer" in str(e.value).lower()
    finally:
        o.stop()


def test_bad_inputs_refused_before_posting():
    with kvx.Context("decode", backend="local") as ctx:
        good = [np.zeros((2, NB, BS, HEADS, DIM), np.uint16) for _ in range(LAYERS)]
        with pytest.raises(kvx.ArgumentError, match=r"strides \[.*\].*the last dim .* must be packed"):
            ctx.register_cache([g[..., ::2] for g in good], layout="NHD")  # names the shape and the strides
        with pytest.raises(kvx.ArgumentError, match="3-d MLA"):
            ctx.register_cache([np.zeros((NB, BS * HEADS * DIM), np.uint16)], layout="NHD")
        with pytest.raises(kvx.ArgumentError, match="neither dim 0 nor dim 1 is 2"):
            ctx.register_cache([np.zeros((3, NB, BS, HEADS, DIM), np.uint16)], layout="NHD")
        with pytest.raises(kvx.ArgumentError, match="cannot tell the layout"):
            ctx.register_cache([np.zeros((NB, HEADS, BS, DIM), np.uint16)], layout=None)
        with kvx.Context("views", backend="local") as other:  # a view of two of the heads: its strides say so
            assert other.register_cache([g[:, :, :, :2] for g in good], layout="NHD").layout == "NHD"
        with pytest.raises(kvx.ArgumentError, match="every layer must match"):
            ctx.register_cache([good[0], np.zeros((2, NB, BS, HEADS, DIM), np.float32)], layout="NHD")
        with pytest.raises(kvx.ArgumentError, match="every layer must match"):
            ctx.register_cache([good[0], np.zeros((2, NB + 1, BS, HEADS, DIM), np.uint16)], layout="NHD")
        with pytest.raises(kvx.ArgumentError, match="layout"):
            ctx.register_cache(good, layout="BHND")
        ro = np.zeros((2, NB, BS, HEADS, DIM), np.uint16)
        ro.setflags(write=False)
        with pytest.raises(kvx.ArgumentError, match="read-only"):
            ctx.register_cache([ro], layout="NHD")
        with pytest.raises(kvx.ArgumentError, match="neither"):
            ctx.register_cache([[1, 2, 3]], layout="NHD")
        # the cache holds its tensors: they live while registered
        t = np.zeros((2, NB, BS, HEADS, DIM), np.uint16)
        ref = weakref.ref(t)
        cache = ctx.register_cache([t], layout="NHD")
        del t
        assert ref() is not None and cache.tensors[0] is ref()
        with kvx.Context("prefill", backend="local") as own:
            own.register_cache([np.ones((2, NB, BS, HEADS, DIM), np.uint16)], layout="NHD")
            peer = ctx.add_peer(own.metadata())
            q = ctx.queue()
            with pytest.raises(kvx.ArgumentError, match="past the cache"):
                q.read(peer, [NB], [0])
            with pytest.raises(kvx.ArgumentError, match="past"):
                q.read(peer, [0], [NB + 5])
            with pytest.raises(kvx.ArgumentError, match="2 local blocks but 1 remote"):
                q.read(peer, [0, 1], [0])
            with pytest.raises(kvx.ArgumentError, match="integer"):
                q.read(peer, [-1], [0])
            with pytest.raises(kvx.ArgumentError, match="integer"):
                q.read(peer, [1.5], [0])
            with pytest.raises(kvx.ArgumentError, match=r"within \[0, 2\^32\)"):
                q.read(peer, np.array([1, -2]), np.array([0, 1]))
            with pytest.raises(kvx.ArgumentError, match="1-d"):
                q.read(peer, np.zeros((1, 1), np.uint32), [0])
            with pytest.raises(kvx.ArgumentError, match="integers, not float"):
                q.read(peer, np.zeros(1), [0])
            assert ctx.stats()["reads_posted"] == 0  # nothing was posted
            q.read(peer, [3], [4]).wait(5000)
            assert (cache.tensors[0][:, 3] == 1).all() and not cache.tensors[0][:, 4].any()
            # ids as numpy (any integer type, any strides) and torch tensors land where they say
            ids = np.array([9, 7, 5, 11], dtype=np.int64)[::2]
            q.read(peer, ids, ids.astype(np.uint32)).wait(5000)
            if torch is not None:
                q.read(peer, torch.tensor([13]), torch.tensor([14], dtype=torch.int32)).wait(5000)
                assert (cache.tensors[0][:, 13] == 1).all()
            assert (cache.tensors[0][:, 9] == 1).all() and (cache.tensors[0][:, 5] == 1).all() and not cache.tensors[0][:, 7].any()
            # a writable uint32 array is read by pointer, a read-only one copied; array.array and buffers
            ro = np.array([1, 2], dtype=np.uint32)
            ro.flags.writeable = False
            q.read(peer, np.array([16, 18], dtype=np.uint32), ro).wait(5000)
            q.read(peer, array.array("I", [19]), memoryview(array.array("I", [20]))).wait(5000)
            with pytest.raises(kvx.ArgumentError, match="past the cache"):
                q.read(peer, np.array([NB], dtype=np.uint32), np.array([0], dtype=np.uint32))
            assert all((cache.tensors[0][:, b] == 1).all() for b in (16, 18, 19))
            assert not any(cache.tensors[0][:, b].any() for b in (15, 17, 20))
        with pytest.raises(kvx.ArgumentError, match="magic"):
            ctx.add_peer(b"kvx" + bytes(60))  # untrusted metadata
    ctx.close()
    assert cache.tensors == []  # released with the context
    with pytest.raises(kvx.ArgumentError):
        kvx.Context("x", tp_rank=2, tp_size=2)


def test_cuda_library_without_a_gpu():
    """libkvx_cuda.so where no GPU driver is: with a stand-in libcuda.so.1
    (every call fails) it loads and works for host caches, and a CUDA
    context is refused with the driver's reason; without libcuda.so.1 the
    package loads libkvx.so and says why it has no CUDA."""
    import subprocess
    import sys
    import ctypes
    lib = os.path.join(os.path.dirname(kvx.__file__), "libkvx_cuda.so")
    if not os.path.exists(lib):
        pytest.skip("the package was built without CUDA's headers")
    try:
        ctypes.CDLL("libcuda.so.1")
        pytest.skip("a GPU driver is installed here: the stand-in would not be the libcuda.so.1 loaded")
    except OSError:
        pass
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    stub = subprocess.run(["bash", os.path.join(root, "tools", "cuda_stub.sh")], capture_output=True, text=True, cwd=root)
    assert stub.returncode == 0, stub.stderr
    probe = (
        "import kvx, numpy as np\n"
        "print(kvx.library_path().rsplit('/', 1)[1], kvx.cuda_available())\n"
        "with kvx.Context('o', backend='local') as o, kvx.Context('r', backend='local') as r:\n"
        "    o.register_cache([np.full((2, 8, 2, 1, 4), 3, np.uint16)])\n"
        "    c = r.register_cache([np.zeros((2, 8, 2, 1, 4), np.uint16)])\n"
        "    r.queue().read(r.add_peer(o.metadata()), [1], [2]).wait(5000)\n"
        "    print('read', int(c.tensors[0][:, 1].min()))\n"
        "try:\n"
        "    kvx.Context('g', backend='cuda')\n"
        "except kvx.UnsupportedError as e:\n"
        "    print('refused:', e)\n")
    env = dict(os.environ, LD_LIBRARY_PATH=os.path.join(root, stub.stdout.strip()))
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "libkvx_cuda.so True" in out.stdout and "read 3" in out.stdout, out.stdout
    assert "refused: Context: KVX_ERR_UNSUPPORTED: cuda: cuInit failed" in out.stdout, out.stdout
    env = dict(os.environ, LD_LIBRARY_PATH="", KVX_PY_CUDA="0")
    out = subprocess.run([sys.executable, "-c", "import kvx; print(kvx.library_path().rsplit('/', 1)[1], kvx.cuda_available())"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "libkvx.so False", out.stdout + out.stderr


def test_verify_mode_sealed_blocks():
    """seal() records the owner's checksums; a read with verify=1 checks every
    block against them: sealed bytes pass, a block changed after sealing is
    kvx.CorruptError."""
    with kvx.Context("prefill", backend="local") as own, kvx.Context("decode", backend="local") as ctx:
        src = np.random.default_rng(3).integers(0, 65535, size=(2, NB, BS, HEADS, DIM), dtype=np.uint16)
        oc = own.register_cache([src], layout="NHD", checksums=True)
        oc.seal(list(range(NB)))
        dst = ctx.register_cache([np.zeros_like(src)], layout="NHD", checksums=True)
        q = ctx.queue()
        peer = ctx.add_peer(own.metadata())
        q.read(peer, [1, 2], [5, 9], verify=1).wait(5000)
        assert (dst.tensors[0][:, [1, 2]] == src[:, [5, 9]]).all()
        src[1, 7, 0, 0, 0] ^= 1  # changed after sealing
        with pytest.raises(kvx.CorruptError):
            q.read(peer, [3], [7], verify=1).wait(5000)


def gen_owner(conn, backend):
    """A producer with block generations (generation_owner.serve)."""
    src = global_cache("NHD", 0, 4, np.uint16)
    with kvx.Context("prefill", backend=backend, timeout_ms=5000) as ctx:
        generation_owner.serve(conn, ctx, ctx.register_cache([src], layout="NHD", generations=True))


@pytest.mark.parametrize("backend", ["ucx", "ofi"])
def test_block_generations(backend, monkeypatch):
    """Reads that carry the owner's block generations, between processes:
    current ones pass, every byte checked; a block retired since is
    kvx.StaleError naming it; a lease that expires retires its blocks, so a
    late reader is stale too."""
    if backend not in kvx.backends():
        pytest.skip("this kvx library has no %s backend" % backend)
    monkeypatch.setenv("FI_PROVIDER", "tcp")
    monkeypatch.setenv("FI_TCP_IFACE", "lo")
    with generation_owner.GenerationOwner(gen_owner, (backend,)) as owner:
        md, ask = owner.md, owner.ask
        want = global_cache("NHD", 0, 4, np.uint16)
        with kvx.Context("decode", backend=backend, timeout_ms=5000) as ctx:
            dst = ctx.register_cache([np.zeros_like(want)], layout="NHD", generations=True)
            q = ctx.queue()
            peer = ctx.add_peer(md)
            local, remote = [1, 2, 3, 9], [7, 8, 20, 5]
            ask("retire", [8])
            gens = ask("gens", remote)
            assert gens == [0, 1, 0, 0]
            q.read(peer, local, remote, remote_generations=gens).wait(5000)
            assert (dst.tensors[0][:, local] == want[:, remote]).all()
            ask("retire", [20])
            with pytest.raises(kvx.StaleError, match="remote block 20 .*generation 0 expected, 1 found"):
                q.read(peer, local, remote, remote_generations=gens).wait(5000)
            gens = ask("gens", remote)
            q.read(peer, local, remote, remote_generations=gens).wait(5000)
            ask("lease", 5, 200, remote)
            t0 = time.monotonic()  # the reader comes late: the lease expires and retires them
            while ask("gens", remote) == gens and time.monotonic() - t0 < 10:
                time.sleep(0.05)
            assert ask("gens", remote) == [g + 1 for g in gens], "the expired lease did not retire its blocks"
            with pytest.raises(kvx.StaleError):
                q.read(peer, local, remote, remote_generations=gens).wait(5000)
            with pytest.raises(kvx.ArgumentError):
                q.read(peer, local, remote, remote_generations=gens[:2])
            plain = ctx.register_cache([np.zeros_like(want)], layout="NHD")  # the reader needs no table
            gens = ask("gens", remote)
            q.read(peer, local, remote, cache=plain, remote_generations=gens).wait(5000)
            assert (plain.tensors[0][:, local] == want[:, remote]).all()


def test_transport_policy():
    """A context's transport policy refuses a peer at add_peer with
    UnsupportedError naming what was chosen, the policy and why; one the
    transport passes adds the peer."""
    src = np.zeros((2, NB, BS, HEADS, DIM), dtype=np.uint16)
    with kvx.Context("prefill", backend="local") as own:
        own.register_cache([src], layout="NHD")
        md = own.metadata()
        with kvx.Context("decode", backend="local", transport_policy="!local:*") as ctx:
            with pytest.raises(kvx.UnsupportedError, match=r'local:memcpy.*"!local:\*" refuses.*why that transport'):
                ctx.add_peer(md)
            assert not ctx.peers
        with kvx.Context("decode", backend="local", transport_policy="!sw,local:*") as ctx:
            assert ctx.add_peer(md).transport == "local:memcpy"


def test_two_live_owners_claiming_one_rank():
    """Two live processes of this host that claim the same prefill rank (a
    tp_rank set wrong) are refused at add_peer, whichever comes first, with
    MismatchError naming both pids; once one of them is gone, the other's
    metadata is taken as a restart."""
    a, b = Owner("NHD", rank=0, tp=2, seed=1), Owner("NHD", rank=0, tp=2, seed=2)
    try:
        for first, second in ((a, b), (b, a)):
            with kvx.Context("decode", tp_rank=0, tp_size=1) as ctx:
                ctx.register_cache(reader_cache("NHD", 0, 1, np.uint16))
                ctx.add_peer(first.md)
                with pytest.raises(kvx.MismatchError, match=r"two live processes claim rank 0 of prefill .*pid %d .*pid %d"
                                   % (first.proc.pid, second.proc.pid)):
                    ctx.add_peer(second.md)
        with kvx.Context("decode", tp_rank=0, tp_size=1) as ctx:
            ctx.register_cache(reader_cache("NHD", 0, 1, np.uint16))
            ctx.add_peer(a.md)
            a.stop()
            ctx.add_peer(b.md)  # a is gone: b's newer metadata is a restart of rank 0
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("backend", ["local", "ucx"])
def test_deployment_key_and_rotation(backend):
    """Metadata signed with a deployment key reads where the reader holds the
    same key, and is refused where it holds another or none; after rotate()
    the metadata taken before reads nothing, the metadata after reads."""
    if backend not in kvx.backends():
        pytest.skip("no %s in this library" % backend)
    key, other = b"a-deployment-key-of-32-bytes-ok!", b"another-deployment-key-of-32-byt"
    src = np.arange(2 * NB * BS * HEADS * DIM, dtype=np.uint16).reshape(2, NB, BS, HEADS, DIM)
    with kvx.Context("prefill", backend=backend, metadata_key=key, timeout_ms=5000) as own:
        own.register_cache([src], layout="NHD")
        md = own.metadata()
        with kvx.Context("decode", backend=backend, metadata_key=other) as ctx:
            with pytest.raises(kvx.CorruptError, match="signature does not match"):
                ctx.add_peer(md)
        with kvx.Context("decode", backend=backend) as ctx:
            with pytest.raises(kvx.MismatchError, match="has none to check it"):
                ctx.add_peer(md)
        with kvx.Context("decode", backend=backend, metadata_key=key, progress_thread=False) as ctx:
            cache = ctx.register_cache([np.zeros_like(src)], layout="NHD")
            peer = ctx.add_peer(md)
            q = ctx.queue()
            q.read(peer, [1, 2], [3, 4]).wait(5000)
            assert (cache.tensors[0][:, [1, 2]] == src[:, [3, 4]]).all()
            own.rotate()
            if backend == "ucx":  # the local backend copies within one process: there is no port to close
                with pytest.raises((kvx.TimeoutError, kvx.PeerError)):
                    q.read(peer, [5], [6], timeout_ms=800).wait(5000)
                assert own.stats()["messages_dropped"] > 0
            peer2 = ctx.add_peer(own.metadata())
            q.read(peer2, [7], [8]).wait(5000)
            assert (cache.tensors[0][:, 7] == src[:, 8]).all()


def test_errors_raised_are_not_printed_again(capfd, monkeypatch):
    """An error kvx hands the caller (an exception) is not also printed as
    'kvx[...] error: ...'; log_level='info' shows it as it happens; KVX_LOG
    takes none."""
    monkeypatch.delenv("KVX_LOG", raising=False)
    with kvx.Context("quiet", backend="local") as ctx:
        with pytest.raises(kvx.ArgumentError, match="magic"):
            ctx.add_peer(b"kvx" + bytes(60))
    assert "kvx[" not in capfd.readouterr().err
    with kvx.Context("loud", backend="local", log_level="info") as ctx:
        with pytest.raises(kvx.ArgumentError):
            ctx.add_peer(b"kvx" + bytes(60))
    assert "KVX_ERR_ARG" in capfd.readouterr().err
    monkeypatch.setenv("KVX_LOG", "none")
    with kvx.Context("none", backend="local") as ctx:
        ctx.register_cache([np.zeros((2, NB, BS, HEADS, DIM), np.uint16)], layout="NHD")
        with pytest.raises(kvx.ArgumentError):
            ctx.add_peer(b"kvx" + bytes(60))
    assert "kvx[" not in capfd.readouterr().err
    with pytest.raises(kvx.ArgumentError, match="log_level"):
        kvx.Context("x", backend="local", log_level="chatty")
    assert "StaleError" in kvx.__all__ and kvx.Peer.__doc__ and kvx.backends()[-1] == "local"


def test_an_owner_that_closes_cleanly_is_not_an_error(capfd, monkeypatch):
    """An owner that ends after its reader is done makes no error on the
    reader's side: a quiet close; the next read of it fails saying the peer
    closed (and, on this host, that its process has ended), not 'timeout'."""
    monkeypatch.delenv("KVX_LOG", raising=False)
    own = Owner("NHD", seed=5)
    try:
        with kvx.Context("decode", progress_thread=False, timeout_ms=5000) as ctx:
            ctx.register_cache(reader_cache("NHD", 0, 1, np.uint16))
            peer = ctx.add_peer(own.md)
            q = ctx.queue()
            q.read(peer, [1], [2]).wait(5000)
            own.stop()
            deadline = time.time() + 10
            while time.time() < deadline:
                ctx.progress()
                try:
                    q.read(peer, [3], [4]).wait(3000)
                except kvx.PeerError as e:
                    assert "closed its connection" in str(e) or "failed or closed" in str(e), str(e)
                    break
                except kvx.TimeoutError:
                    continue
                time.sleep(0.1)
            else:
                pytest.fail("the owner's close was never seen")
        err = capfd.readouterr().err
        assert " error: " not in err, err
    finally:
        own.stop()


def test_read_batch_and_poll():
    """read_batch posts several requests' reads in one call, each its slice
    of the ids (numpy or lists), tags and notify ids kept; every byte lands;
    a refused read leaves those before it posted, names itself and how many
    went; poll reports each once with tag, bytes and a failed read's sentence."""
    nb = 64
    rng = np.random.default_rng(3)
    src = [rng.integers(0, 60000, (2, nb, 4, 2, 8)).astype(np.uint16) for _ in range(2)]
    dst = [np.zeros_like(s) for s in src]
    with kvx.Context("prefill", backend="local") as own, kvx.Context("decode", backend="local") as ctx:
        own.register_cache(src, layout="NHD")
        ctx.register_cache(dst, layout="NHD")
        peer = ctx.add_peer(own.metadata())
        q = ctx.queue(depth=16)
        la, ra = np.arange(0, 20, dtype=np.uint32), rng.permutation(nb)[:20].astype(np.int64)
        ts = q.read_batch(peer, la, ra, [5, 0, 15], notify_ids=[None, 7, None], tags=[10, 11, 12])
        assert [t.ticket for t in ts] == [1, 2, 3]
        done = []
        for _ in range(250):  # bounded: 5 s
            done += q.poll()
            if len(done) >= 3:
                break
            time.sleep(0.02)
        for d, s in zip(dst, src):
            assert (d[:, la] == s[:, ra]).all() and not d[:, 20:].any()
        got = sorted((c.ticket, c.tag, c.status, c.bytes) for c in done)
        assert got == [(1, 10, 0, 5 * 4 * 2 * 8 * 2 * 4), (2, 11, 0, 0), (3, 12, 0, 15 * 4 * 2 * 8 * 2 * 4)], got
        assert [(n.id, n.status) for n in own.notifications()] == [(7, 0)]
        with pytest.raises(kvx.ArgumentError, match="read_batch: read 1: .*remote block id 64 at index 1 is past") as e:
            q.read_batch([peer, peer], [30, 31, 32], [1, 2, 64], [1, 2])
        assert [t.ticket for t in e.value.posted] == [4]
        e.value.posted[0].wait(5000)
        with pytest.raises(kvx.ArgumentError, match="3 local and 2 remote block ids"):
            q.read_batch(peer, [1, 2, 3], [1, 2], [3])
    # an owner that never progresses: the read times out, and poll carries its sentence
    with kvx.Context("stalled", backend="local", progress_thread=False) as own, kvx.Context("decode", backend="local") as ctx:
        own.register_cache(src, layout="NHD")
        ctx.register_cache(dst, layout="NHD")
        q = ctx.queue()
        t = q.read_batch(ctx.add_peer(own.metadata()), [40], [1], [1], timeout_ms=50, tags=[9])[0]
        got = []
        for _ in range(100):  # bounded: 2 s
            got += q.poll()
            if got:
                break
            time.sleep(0.02)
        assert [(c.ticket, c.tag, c.status != 0) for c in got] == [(t.ticket, 9, True)], got
        assert "timed out after 50 ms" in got[0].message and isinstance(got[0].error, kvx.TimeoutError), got[0].message
