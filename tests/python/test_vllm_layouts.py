"""vLLM's KV cache forms registered as they lie (no copies) and read between
processes: every owner form into a reader of another form, with TP splits
and a replicated head, every byte compared (vllm_forms.py makes the forms
the way vLLM does: one buffer, a view per layer, K and V side by side in
the last dim). Also: a dtype other than the owner's is refused at add_peer,
and layouts are inferred from shapes and strides. Run by make test."""
import multiprocessing as mp
import os

import numpy as np
import pytest

import kvx
import vllm_forms as F

NB, N, C, LAYERS = 24, 32, 16, 3
SPAWN = mp.get_context("spawn")


def owner(conn, form, rank, tp, total_heads, seed, blocks):
    """A producer process holding its rank's heads in `form`."""
    os.environ.setdefault("UCX_TLS", "tcp")
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    first, n = F.head_first(rank, tp, total_heads)
    buf, views = F.make(form, LAYERS, NB, n, N, C)
    F.fill(form, views, seed, rank, tp, total_heads, blocks)
    with kvx.Context("prefill", tp_rank=rank, tp_size=tp, timeout_ms=10000) as ctx:
        ctx.register_cache(views, layout=form, total_heads=total_heads if total_heads < tp else None)
        conn.send(ctx.metadata())
        conn.recv()  # until told to go


class Owners:
    def __init__(self, form, tp, total_heads, seed, blocks):
        self.procs = []
        self.mds = []
        for r in range(tp):
            a, b = SPAWN.Pipe()
            p = SPAWN.Process(target=owner, args=(b, form, r, tp, total_heads, seed, blocks))
            p.start()
            self.procs.append((p, a))
        for p, a in self.procs:
            if not a.poll(60):
                self.stop()
                raise RuntimeError("an owner did not start")
            self.mds.append(a.recv())

    def stop(self):
        for p, a in self.procs:
            try:
                a.send("bye")
            except OSError:
                pass
            p.join(10)
            if p.is_alive():
                p.kill()


@pytest.fixture(autouse=True)
def loopback(monkeypatch):
    monkeypatch.setenv("UCX_NET_DEVICES", os.environ.get("UCX_NET_DEVICES", "lo"))
    monkeypatch.setenv("UCX_TLS", os.environ.get("UCX_TLS", "tcp"))


CASES = [  # owner form, reader form, owner TP, reader TP, the model's KV heads
    ("LBHNC", "LBHNC", 1, 1, 4), ("BLHNC", "LBHNC", 1, 1, 4), ("BHLNC", "LBHNC", 1, 1, 4), ("LHBNC", "LBHNC", 1, 1, 4),
    ("LBNHC", "LBNHC", 1, 1, 4), ("BLNHC", "LBNHC", 1, 1, 4), ("LBHNC", "BLHNC", 1, 1, 4), ("LBNHC", "BLNHC", 1, 1, 4),
    ("BLHNC", "LHBNC", 1, 2, 4), ("LHBNC", "BHLNC", 2, 1, 4), ("BHLNC", "BLHNC", 2, 4, 4), ("BLNHC", "LBNHC", 2, 1, 4),
    ("LBHNC", "BLHNC", 1, 2, 1),  # one KV head, replicated on both decode ranks
]


@pytest.mark.parametrize("oform,rform,otp,rtp,heads", CASES)
def test_forms_between_processes(oform, rform, otp, rtp, heads):
    seed = 7 + CASES.index((oform, rform, otp, rtp, heads))
    src = [3, 4, 5, 11, 20, 0]
    dst = [9, 1, 2, 17, 23, 12]
    owners = Owners(oform, otp, heads, seed, src)
    try:
        for r in range(rtp):
            first, n = F.head_first(r, rtp, heads)
            buf, views = F.make(rform, LAYERS, NB, n, N, C)
            with kvx.Context("decode", tp_rank=r, tp_size=rtp) as ctx:
                cache = ctx.register_cache(views, layout=rform, total_heads=heads if heads < rtp else None)
                q = ctx.queue()
                for md in owners.mds:
                    peer = ctx.add_peer(md)
                    if peer.heads(cache)[1]:
                        q.read(peer, dst, src, cache=cache).wait(10000)
                F.check(rform, views, seed, r, rtp, heads, dst, src)
    finally:
        owners.stop()


def test_dtype_is_part_of_the_layout():
    """A bfloat16 reader of a float16 owner is refused, both named (their
    sizes agree); the same dtype reads."""
    torch = pytest.importorskip("torch")
    with kvx.Context("prefill", backend="local") as own:
        own.register_cache([torch.zeros((NB, 2, N, C), dtype=torch.float16)], layout="LBHNC")
        md = own.metadata()
        with kvx.Context("decode", backend="local") as ctx:
            ctx.register_cache([torch.zeros((NB, 2, N, C), dtype=torch.bfloat16)], layout="LBHNC")
            with pytest.raises(kvx.MismatchError, match="dtype f16, ours .* bf16"):
                ctx.add_peer(md)
        with kvx.Context("decode", backend="local") as ctx:
            ctx.register_cache([torch.zeros((NB, 2, N, C), dtype=torch.float16)], layout="LBHNC")
            ctx.add_peer(md)


def test_layout_inferred_and_refusals_named():
    """None infers the layout where shapes and strides tell (block_size tells
    tokens from heads); a view kvx cannot read names its shape and strides."""
    buf, views = F.make("BLHNC", LAYERS, NB, 2, N, C)
    with kvx.Context("x", backend="local") as ctx:
        assert ctx.register_cache(views, layout=None, block_size=N).layout == "LBHNC"
    buf, views = F.make("LBNHC", LAYERS, NB, 2, N, C)
    with kvx.Context("x", backend="local") as ctx:
        assert ctx.register_cache(views, layout=None, block_size=N).layout == "LBNHC"
        with pytest.raises(kvx.ArgumentError, match=r"cannot read shape \[%d, %d, 2, %d\] strides \[.*\].*packed" % (NB, N, C // 2)):
            ctx.register_cache({k: v[..., ::2] for k, v in views.items()}, layout="LBNHC")


def test_vllm_033_views_and_one_head_across_orders():
    """vLLM 0.33 hands every layout as a [B, H, N, C] view, the order in its
    strides: a token-major one registers as handed (named or inferred) and
    reads like its [B, N, H, C] twin. A rank of one head is the same bytes
    in either order: it reads from, and is read by, the other order."""
    seed, dst, src = 5, [1, 2, 7], [4, 5, 0]
    buf, views = F.make("LBNHC", LAYERS, NB, 2, N, C)
    F.fill("LBNHC", views, seed, 0, 1, 2, src)
    as_handed = {k: v.transpose(0, 2, 1, 3) for k, v in views.items()}  # [B, H, N, C], NHD strides
    with kvx.Context("prefill", backend="local") as own:
        own.register_cache(as_handed, layout="LBNHC")
        for how in (dict(layout="LBNHC"), dict(layout=None, block_size=N)):
            rbuf, rviews = F.make("LBNHC", LAYERS, NB, 2, N, C)
            with kvx.Context("decode", backend="local") as ctx:
                c = ctx.register_cache({k: v.transpose(0, 2, 1, 3) for k, v in rviews.items()}, **how)
                assert (c.num_heads, c.num_blocks) == (2, NB), how
                ctx.queue().read(ctx.add_peer(own.metadata()), dst, src).wait(5000)
            F.check("LBNHC", rviews, seed, 0, 1, 2, dst, src)
    # one head a rank (TP 2 of 2 heads): an HND reader of an NHD owner, and back
    for oform, rform in (("LBNHC", "LBHNC"), ("LBHNC", "BLNHC")):
        with kvx.Context("prefill", backend="local", tp_rank=1, tp_size=2) as own:
            buf, views = F.make(oform, LAYERS, NB, 1, N, C)
            F.fill(oform, views, seed, 1, 2, 2, src)
            own.register_cache(views, layout=oform)
            rbuf, rviews = F.make(rform, LAYERS, NB, 1, N, C)
            with kvx.Context("decode", backend="local", tp_rank=1, tp_size=2) as ctx:
                ctx.register_cache(rviews, layout=rform)
                ctx.queue().read(ctx.add_peer(own.metadata()), dst, src).wait(5000)
            F.check(rform, rviews, seed, 1, 2, 2, dst, src)
