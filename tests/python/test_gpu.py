"""kvx from Python on the GPU (make test-gpu): torch CUDA tensors between two
processes on one GPU over the CUDA backend, from PyTorch's default caching
allocator and from expandable segments (VMM memory); a read that a torch
operation on another stream waits for with stream_wait and checks on that
stream; the same wait captured in a torch.cuda.graph, replayed 24 times,
each replay behind its own read. Every byte of every layer is compared.
Skipped where torch has no CUDA or kvx was built without it."""
import multiprocessing as mp
import os
import time
import traceback

import pytest

import kvx

import generation_owner

try:
    import torch
except ImportError:
    torch = None

pytestmark = pytest.mark.skipif(torch is None or not torch.cuda.is_available() or not kvx.cuda_available(),
                                reason="needs torch with CUDA, a GPU and kvx built with CUDA")

NB, BS, HEADS, DIM, LAYERS = 64, 16, 4, 64, 3  # float16: 8 KiB per block and plane
POISON = 0xA5
SPAWN = mp.get_context("spawn")
# A sleep kernel that holds the reader's copy stream back (about 0.1-0.2 s):
# work that runs without waiting for the read sees the poison, not the data.
HOLD_CYCLES = 200_000_000
ALLOCS = {"default": "", "expandable": "expandable_segments:True"}


def shape(layout):
    return (2, NB, BS, HEADS, DIM) if layout == "NHD" else (2, NB, HEADS, BS, DIM)


def pattern(layout, layer, seed):
    """The owner's layer as bytes, on the GPU: float16 data viewed as uint8."""
    s = shape(layout)
    g = torch.Generator().manual_seed(seed * 1000 + layer)
    return torch.randint(0, 256, s[:-1] + (s[-1] * 2,), generator=g, dtype=torch.uint8).cuda()


def expandable_in_use():
    segs = torch.cuda.memory.memory_snapshot()
    return bool(segs) and all(bool(s.get("is_expandable")) for s in segs)


def gpu_owner(conn, layout, alloc, seed):
    try:
        torch.cuda.set_device(0)
        layers = [pattern(layout, l, seed).view(torch.float16) for l in range(LAYERS)]
        with kvx.Context("prefill", backend="cuda", timeout_ms=10000) as ctx:
            ctx.register_cache(layers, layout=layout)
            conn.send(("md", ctx.metadata(), expandable_in_use()))
            conn.poll(120)  # the progress thread serves the reader meanwhile
    except Exception:
        conn.send(("error", traceback.format_exc(), None))


def first_difference(got, want):
    bad = (got != want).nonzero()
    if bad.numel() == 0:
        return None
    i = tuple(int(x) for x in bad[0])
    return "first wrong byte at %s: want 0x%02x, got 0x%02x (%d bytes differ)" % (
        list(i), int(want[i]), int(got[i]), int((got != want).sum()))


def check_all(local_u8, want, dst, src):
    """Every byte of every layer: the read blocks equal the owner's, the rest are still poison."""
    for l, got in enumerate(local_u8):
        exp = torch.full_like(got, POISON)
        exp[:, dst] = want[l][:, src]
        d = first_difference(got, exp)
        if d:
            return "layer %d: %s" % (l, d)
    return None


def gpu_reader(conn, md, layout, mode, seed):
    """Runs one scenario in its own process; sends back ("ok", facts) or ("fail"|"error", why)."""
    try:
        torch.cuda.set_device(0)
        want = [pattern(layout, l, seed) for l in range(LAYERS)]
        local_u8 = [torch.full_like(w, POISON) for w in want]
        gen = torch.Generator().manual_seed(seed + 7)
        facts = {"expandable": expandable_in_use()}
        with kvx.Context("decode", backend="cuda", timeout_ms=10000) as ctx:
            ctx.register_cache([t.view(torch.float16) for t in local_u8], layout=layout)
            peer = ctx.add_peer(md)
            facts["transport"] = peer.transport
            qs = torch.cuda.Stream()
            q = ctx.queue(depth=1 if mode == "graph" else 8, cuda_stream=qs)

            def blocks(n):
                src = torch.randperm(NB, generator=gen)[:n].tolist()
                dst = torch.randperm(NB, generator=gen)[:n].tolist()
                return dst, src

            if mode == "plain":
                dst, src = blocks(24)
                tickets = [q.read(peer, dst[i:i + 8], src[i:i + 8], tag=i) for i in range(0, 24, 8)]
                for t in tickets:
                    t.wait(10000)
                torch.cuda.synchronize()
                why = check_all(local_u8, want, dst, src)
                if why:
                    conn.send(("fail", why))
                    return
                facts["stats"] = ctx.stats()
            elif mode == "stream":
                dst, src = blocks(16)
                # index tensors on the GPU first: indexing with host lists
                # would synchronize the host with the streams below
                dst_t, src_t = torch.tensor(dst, device="cuda"), torch.tensor(src, device="cuda")
                ws, free = torch.cuda.Stream(), torch.cuda.Stream()

                def mismatches():
                    return torch.stack([(local_u8[l].index_select(1, dst_t) != want[l].index_select(1, src_t)).sum()
                                        for l in range(LAYERS)]).sum()
                # once on each stream first: the allocator then has memory
                # cached for both, and allocating it fresh (cudaMalloc, or
                # mapping more of an expandable segment) may wait for the
                # device, which would hold the host until the read is done
                for st_ in (ws, free):
                    with torch.cuda.stream(st_):
                        mismatches()
                torch.cuda.synchronize()
                with torch.cuda.stream(qs):
                    torch.cuda._sleep(HOLD_CYCLES)  # the read is launched behind this
                t0 = time.monotonic()
                t = q.read(peer, dst, src)
                q.stream_wait(t, ws)
                word_view = q.stream_status_tensor(t)
                with torch.cuda.stream(ws):  # waits for the read, then checks on the GPU
                    bad = mismatches()
                    word = word_view.clone()
                with torch.cuda.stream(free):  # the control: the same check without the wait
                    bad_free = mismatches()
                    word_free = word_view.clone()
                host_ms = (time.monotonic() - t0) * 1e3
                torch.cuda.synchronize()
                t.wait(10000)
                facts.update(bad=int(bad), word=int(word), expect_word=(t.ticket << 2) | 1, bad_free=int(bad_free),
                             word_free=int(word_free), host_ms=host_ms)
                why = check_all(local_u8, want, dst, src)
                if why:
                    conn.send(("fail", why))
                    return
            else:  # graph: one capture of stream_wait + check, replayed behind 24 reads
                dst, src = blocks(16)
                dst_t = torch.tensor(dst, device="cuda")
                t0 = q.read(peer, dst, src)
                t0.wait(10000)
                gs = torch.cuda.Stream()
                exp = [torch.empty_like(local_u8[l][:, dst]) for l in range(LAYERS)]
                word_view = q.stream_status_tensor(t0)  # the slot's word: made outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=gs, capture_error_mode="thread_local"):
                    q.stream_wait(t0, torch.cuda.current_stream())
                    bad = torch.stack([(local_u8[l].index_select(1, dst_t) != exp[l]).sum() for l in range(LAYERS)]).sum()
                    word = word_view.clone()
                replays, wrong = 0, []
                for k in range(24):
                    _, src = blocks(16)
                    src_t = torch.tensor(src, device="cuda")
                    with torch.cuda.stream(qs):
                        for l in range(LAYERS):
                            local_u8[l].index_fill_(1, dst_t, POISON)
                        torch.cuda._sleep(HOLD_CYCLES // 4)
                    with torch.cuda.stream(gs):
                        for l in range(LAYERS):
                            exp[l].copy_(want[l].index_select(1, src_t))
                    t = q.read(peer, dst, src)
                    with torch.cuda.stream(gs):
                        graph.replay()
                    gs.synchronize()
                    t.wait(10000)
                    if int(bad) != 0 or int(word) != (t.ticket << 2) | 1:
                        wrong.append("replay %d (ticket %d): %d bytes differ, device saw word 0x%x" % (k, t.ticket, int(bad), int(word)))
                    else:
                        replays += 1
                torch.cuda.synchronize()
                why = check_all(local_u8, want, dst, src)
                if why or wrong:
                    conn.send(("fail", "; ".join(wrong[:3]) or why))
                    return
                facts["replays"] = replays
        conn.send(("ok", facts))
    except Exception:
        conn.send(("error", traceback.format_exc()))


def run_pair(monkeypatch, layout, alloc, mode, seed=3):
    """An owner and a reader process on GPU 0 with the allocator setting
    given (inherited at spawn, before either touches CUDA)."""
    if ALLOCS[alloc]:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", ALLOCS[alloc])
    else:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    oc, ochild = SPAWN.Pipe()
    rc, rchild = SPAWN.Pipe()
    own = SPAWN.Process(target=gpu_owner, args=(ochild, layout, alloc, seed))
    own.start()
    rd = None
    try:
        assert oc.poll(120), "the owner sent no metadata"
        kind, md, owner_expandable = oc.recv()
        assert kind == "md", md
        rd = SPAWN.Process(target=gpu_reader, args=(rchild, md, layout, mode, seed))
        rd.start()
        assert rc.poll(180), "the reader did not finish"
        res = rc.recv()
        assert res[0] == "ok", res[1]
        facts = res[1]
        # the allocator the case names is the one both sides used
        assert owner_expandable == (alloc == "expandable") and facts["expandable"] == (alloc == "expandable"), \
            "expandable segments: owner %s, reader %s, wanted %s" % (owner_expandable, facts["expandable"], alloc)
        assert facts["transport"].startswith("cuda:ipc"), facts["transport"]
        print("%s %s %s: %s" % (layout, alloc, mode, facts))
        return facts
    finally:
        oc.send("bye")
        for p in (rd, own):
            if p is not None:
                p.join(20)
                if p.is_alive():
                    p.kill()
                    p.join(5)


@pytest.mark.parametrize("alloc", ["default", "expandable"])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_cuda_read(monkeypatch, layout, alloc):
    facts = run_pair(monkeypatch, layout, alloc, "plain")
    assert facts["stats"]["reads_completed"] == 3 and facts["stats"]["reads_failed"] == 0


@pytest.mark.parametrize("alloc", ["default", "expandable"])
def test_stream_wait_then_torch_check(monkeypatch, alloc):
    f = run_pair(monkeypatch, "NHD", alloc, "stream")
    assert f["bad"] == 0, "%d bytes differ behind the wait" % f["bad"]
    assert f["word"] == f["expect_word"], "completion word 0x%x, want 0x%x" % (f["word"], f["expect_word"])
    # without the wait the same check ran during the hold and saw poison:
    # the wait, not luck, ordered the check after the read
    assert f["bad_free"] > 0 and f["word_free"] == f["expect_word"] - 1, \
        "the control, not waiting, saw %d wrong bytes and word 0x%x: the hold did not hold (the host spent %.1f ms posting)" % (
            f["bad_free"], f["word_free"], f["host_ms"])


@pytest.mark.parametrize("alloc", ["default", "expandable"])
def test_stream_wait_in_cuda_graph(monkeypatch, alloc):
    f = run_pair(monkeypatch, "HND", alloc, "graph")
    assert f["replays"] == 24


def gen_gpu_owner(conn, backend):
    """A GPU producer with block generations (generation_owner.serve)."""
    torch.cuda.set_device(0)
    layers = [pattern("HND", l, 5).view(torch.float16) for l in range(LAYERS)]
    with kvx.Context("prefill", backend=backend, timeout_ms=10000) as ctx:
        generation_owner.serve(conn, ctx, ctx.register_cache(layers, layout="HND", generations=True))


@pytest.mark.parametrize("backend", ["cuda"])
def test_block_generations_on_gpu(backend):
    """GPU caches with block generations between two processes: current
    generations pass, every byte checked; a block retired since is
    StaleError, and a stream waiting on that read is released with the
    failure in its completion word (state 2), not left waiting."""
    with generation_owner.GenerationOwner(gen_gpu_owner, (backend,), start_s=120, ask_s=30, join_s=20) as owner:
        md, ask = owner.md, owner.ask
        torch.cuda.set_device(0)
        want = [pattern("HND", l, 5) for l in range(LAYERS)]
        local = [torch.full_like(w, POISON).view(torch.float16) for w in want]
        with kvx.Context("decode", backend=backend, timeout_ms=10000) as ctx:
            cache = ctx.register_cache(local, layout="HND", generations=True)
            stream = torch.cuda.Stream()
            q = ctx.queue(cuda_stream=stream)
            peer = ctx.add_peer(md)
            dst, src = [3, 4, 5, 40], [10, 11, 12, 7]
            ask("retire", [11])
            gens = ask("gens", src)
            assert gens == [0, 1, 0, 0]
            q.read(peer, dst, src, remote_generations=gens).wait(10000)
            bad = check_all([t.view(torch.uint8) for t in local], want, dst, src)
            assert bad is None, bad
            ask("retire", [12])
            t = q.read(peer, dst, src, remote_generations=gens)
            waiter = torch.cuda.Stream()
            q.stream_wait(t, waiter)
            with pytest.raises(kvx.StaleError, match="remote block 12 .*generation 0 expected, 1 found"):
                t.wait(10000)
            word = q.stream_status_tensor(t)
            released = torch.cuda.Event()
            released.record(waiter)
            t0 = time.monotonic()
            while not released.query() and time.monotonic() - t0 < 10:  # released, not left waiting
                time.sleep(0.01)
            assert released.query(), "the stream waiting on a stale read was not released within 10 s"
            assert int(word.item()) & 3 == 2, "the waiting stream's word does not say the read failed: %#x" % int(word.item())
            gens = ask("gens", src)
            q.read(peer, dst, src, remote_generations=gens).wait(10000)
            bad = check_all([t.view(torch.uint8) for t in local], want, dst, src)
            assert bad is None, bad


# vLLM's cache forms (vllm_forms.py) as torch CUDA tensors: one buffer on the
# GPU, a view per layer, as vLLM's GPU model runner makes them. The CUDA
# backend reads a block's bytes as one piece with any block stride (the
# layer-outermost and block-outermost forms); forms whose heads have strides
# of their own (BHLNC, LHBNC) it refuses, saying so.
import vllm_forms as F

VF_NB, VF_N, VF_C, VF_LAYERS = 24, 16, 32, 3
VF_READ = ([3, 7, 8, 9, 20], [5, 6, 7, 15, 0])   # local <- remote, runs and singles


def vf_buffer(form, heads, blocks):
    """The form on the host (vllm_forms), to fill or check."""
    return F.make(form, VF_LAYERS, blocks, heads, VF_N, VF_C)


def vf_gpu_views(form, buf):
    """The host buffer copied to the GPU, and vLLM's per-layer views of the copy."""
    g = torch.from_numpy(buf.view("int16")).cuda()
    return g, {k: v.view(torch.float16) for k, v in F.layer_views(form, g, VF_LAYERS).items()}


def vf_owner(conn, form, rank, tp, total_heads, seed):
    try:
        torch.cuda.set_device(0)
        first, n = F.head_first(rank, tp, total_heads)
        buf, views = vf_buffer(form, n, VF_NB)
        F.fill(form, views, seed, rank, tp, total_heads, VF_READ[1])
        g, gviews = vf_gpu_views(form, buf)
        with kvx.Context("prefill", backend="cuda", tp_rank=rank, tp_size=tp, timeout_ms=10000) as ctx:
            ctx.register_cache(gviews, layout=form, total_heads=total_heads if total_heads < tp else None)
            conn.send(("md", ctx.metadata()))
            conn.poll(120)
    except Exception:
        conn.send(("error", traceback.format_exc()))


def vf_reader(form, rank, tp, total_heads, mds, seed):
    first, n = F.head_first(rank, tp, total_heads)
    buf, views = vf_buffer(form, n, VF_NB)
    g, gviews = vf_gpu_views(form, buf)
    with kvx.Context("decode", backend="cuda", tp_rank=rank, tp_size=tp, timeout_ms=10000) as ctx:
        ctx.register_cache(gviews, layout=form, total_heads=total_heads if total_heads < tp else None)
        q = ctx.queue()
        tickets = []
        for md in mds:
            peer = ctx.add_peer(md)
            try:
                tickets.append(q.read(peer, VF_READ[0], VF_READ[1]))
            except kvx.ArgumentError as e:
                if "not the source of any head" not in str(e):
                    raise
        assert tickets, "no owner rank holds this reader's heads"
        for t in tickets:
            t.wait(10000)
        torch.cuda.synchronize()
        buf.view("int16")[...] = g.cpu().numpy()
        F.check(form, views, seed, rank, tp, total_heads, VF_READ[0], VF_READ[1])
        return peer.transport


@pytest.mark.parametrize("form,otp,rtp,heads", [
    ("LBHNC", 1, 1, 4), ("LBNHC", 1, 2, 4), ("BLHNC", 2, 1, 4), ("BLNHC", 2, 4, 4), ("LBNHC", 1, 2, 1)])
def test_vllm_forms_on_cuda(form, otp, rtp, heads):
    """vLLM's per-layer views of one GPU buffer read over the CUDA backend
    with TP splits and a replicated head: every byte of the blocks read,
    and the blocks not read still zero."""
    seed = 11
    procs = []
    try:
        for r in range(otp):
            a, b = SPAWN.Pipe()
            p = SPAWN.Process(target=vf_owner, args=(b, form, r, otp, heads, seed))
            p.start()
            procs.append((p, a))
        mds = []
        for p, a in procs:
            assert a.poll(120), "an owner sent no metadata"
            kind, md = a.recv()
            assert kind == "md", md
            mds.append(md)
        torch.cuda.set_device(0)
        for r in range(rtp):
            assert vf_reader(form, r, rtp, heads, mds, seed).startswith("cuda:ipc")
    finally:
        for p, a in procs:
            try:
                a.send("bye")
            except OSError:
                pass
            p.join(20)
            if p.is_alive():
                p.kill()


@pytest.mark.parametrize("form", ["BHLNC", "LHBNC"])
def test_vllm_head_strided_forms_refused_on_cuda(form):
    """Forms whose heads lie apart within a block: the CUDA backend says it
    does not read them yet, at registration, rather than read them wrong."""
    torch.cuda.set_device(0)
    buf, views = vf_buffer(form, 4, VF_NB)
    g, gviews = vf_gpu_views(form, buf)
    with kvx.Context("decode", backend="cuda", timeout_ms=10000) as ctx:
        with pytest.raises(kvx.UnsupportedError, match="head or token strides of their own"):
            ctx.register_cache(gviews, layout=form)
