"""KvxConnector's parts that face the network and the router, without an
engine: the side channel (who gets the metadata, what a hostile client can
make it hold) and the checks on kv_transfer_params (every field comes from
another engine through a router). The engines themselves: two_hosts.sh."""
from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest

import kvx
import kvx.vllm as kv

MD = {0: b"rank zero's metadata" * 10, 1: b"rank one" * 3}


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(kv, "_SIDE_TIMEOUT_S", 0.5)


def serve(key=None):
    return kv.SideChannel("127.0.0.1", 0, MD, key)


def test_metadata_served_and_fetched():
    s = serve()
    try:
        assert kv.fetch_metadata("127.0.0.1", s.port, None) == MD
        assert kv.fetch_metadata("127.0.0.1", s.port, b"a key the server does not need") == MD
    finally:
        s.close()


def test_a_keyed_side_channel_serves_only_holders_of_the_key():
    key = os.urandom(32)
    s = serve(key)
    try:
        assert kv.fetch_metadata("127.0.0.1", s.port, key) == MD
        with pytest.raises(kvx.PeerError, match="needs the deployment key"):
            kv.fetch_metadata("127.0.0.1", s.port, None)
        with pytest.raises(kvx.PeerError, match="key differs"):
            kv.fetch_metadata("127.0.0.1", s.port, os.urandom(32))
        # a raw client that answers the nonce with anything else gets nothing
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            hello = kv._recv_exact(c, 38)
            assert hello[:4] == b"KVXS" and hello[5] == 1
            c.sendall(bytes(32))
            assert c.recv(100) == b""
        # and a replayed answer to an old nonce does not work: each nonce is fresh
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            n1 = kv._recv_exact(c, 38)[6:]
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            n2 = kv._recv_exact(c, 38)[6:]
            assert n1 != n2
            c.sendall(kv._proof(key, n1))
            assert c.recv(100) == b""
        assert kv.fetch_metadata("127.0.0.1", s.port, key) == MD
    finally:
        s.close()


def test_hostile_clients_hold_little_and_not_for_long(quick):
    """Clients that connect and say nothing: at most 16 are held, each for
    the side channel's deadline; more are closed at once; then it serves."""
    s = serve()
    idle = []
    try:
        for _ in range(24):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            idle.append(c)
        time.sleep(0.2)
        hellos = closed = 0
        for c in idle:
            c.settimeout(1)
            try:
                data = c.recv(64)
            except ConnectionResetError:
                data = b""
            hellos += data[:4] == b"KVXS"
            closed += data == b""
        assert (hellos, closed) == (16, 8)  # 16 held (each until its deadline), the rest closed at once
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5:
            try:
                assert kv.fetch_metadata("127.0.0.1", s.port, None, timeout_s=1) == MD
                break
            except kvx.PeerError:
                time.sleep(0.1)
        else:
            pytest.fail("the side channel did not serve again after its idle clients' deadline")
        assert time.monotonic() - t0 < 3
    finally:
        for c in idle:
            c.close()
        s.close()


def test_garbage_clients_do_not_stop_it(quick):
    s = serve()
    try:
        for junk in (b"", b"GET / HTTP/1.1\r\n\r\n", os.urandom(31), os.urandom(4096)):
            with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
                try:
                    c.sendall(junk)
                except OSError:
                    pass
        assert kv.fetch_metadata("127.0.0.1", s.port, None) == MD
    finally:
        s.close()


def fake_server(hello: bytes, body: bytes = b""):
    """A server that sends hello to whoever connects, reads its 32 bytes,
    sends body, then closes."""
    ls = socket.create_server(("127.0.0.1", 0))

    def run():
        c, _ = ls.accept()
        c.sendall(hello)
        c.settimeout(2)
        try:
            kv._recv_exact(c, 32)
            c.sendall(body)
            time.sleep(0.2)
        except OSError:
            pass
        c.close()
        ls.close()
    threading.Thread(target=run, daemon=True).start()
    return ls.getsockname()[1]


def test_a_reader_refuses_what_is_not_metadata():
    with pytest.raises(kvx.PeerError, match="not a kvx side channel"):
        kv.fetch_metadata("127.0.0.1", fake_server(b"HTTP/1.1 200 OK\r\n" + bytes(40)), None)
    hello = b"KVXS" + bytes([1, 0]) + bytes(32)
    with pytest.raises(kvx.PeerError, match="70000 ranks"):
        kv.fetch_metadata("127.0.0.1", fake_server(hello, b"KVXM" + struct.pack("<I", 70000)), None)
    with pytest.raises(kvx.PeerError, match="bytes of metadata"):
        kv.fetch_metadata("127.0.0.1", fake_server(hello, b"KVXM" + struct.pack("<III", 1, 0, 1 << 30)), None)
    with pytest.raises(kvx.PeerError, match="ended early"):
        kv.fetch_metadata("127.0.0.1", fake_server(hello, b"KVXM" + struct.pack("<III", 1, 0, 100) + b"x" * 10), None)
    with pytest.raises(kvx.PeerError, match="rank 3 with"):
        kv.fetch_metadata("127.0.0.1", fake_server(hello, b"KVXM" + struct.pack("<III", 2, 3, 1) + b"x"), None)
    with pytest.raises(kvx.PeerError, match="speaks version 9"):
        kv.fetch_metadata("127.0.0.1", fake_server(b"KVXS" + bytes([9, 0]) + bytes(32)), None)
    ls = socket.create_server(("127.0.0.1", 0))
    port = ls.getsockname()[1]
    ls.close()
    t0 = time.monotonic()
    with pytest.raises(kvx.PeerError, match="refused"):
        kv.fetch_metadata("127.0.0.1", port, None)
    assert time.monotonic() - t0 < 2


def good_params(block_size=32):
    return {"kvx": kv.PARAMS_VERSION, "do_remote_prefill": True, "remote_engine_id": "p", "remote_request_id": "r-1",
            "remote_host": "10.0.0.1", "remote_port": 5610, "tp_size": 2, "remote_block_ids": [4, 9, 2],
            "remote_generations": [1, 0, 7], "remote_num_tokens": 70, "remote_prompt_hash": kv.prompt_hash([1] * 70)}


def test_params_checked_field_by_field():
    rp, why = kv.parse_remote(good_params(), 32)
    assert rp is not None and why == "" and rp.block_ids == [4, 9, 2] and rp.tp_size == 2
    bad = [
        ({"kvx": None}, "kvx is None"),
        ({"remote_port": "5610"}, "remote_port"),
        ({"remote_port": True}, "remote_port"),
        ({"remote_port": 70000}, "port 70000"),
        ({"tp_size": 0}, "tp_size 0"),
        ({"remote_block_ids": [4, -1, 2]}, "other than block ids"),
        ({"remote_block_ids": [4, 1 << 32, 2]}, "other than block ids"),
        ({"remote_block_ids": [4, "9", 2]}, "other than block ids"),
        ({"remote_generations": [1, 0]}, "one generation per block"),
        ({"remote_generations": [1, 0, -7]}, "one generation per block"),
        ({"remote_num_tokens": 200}, "3 blocks for 200 tokens"),
        ({"remote_num_tokens": 0}, "for 0 tokens"),
        ({"remote_engine_id": None}, "remote_engine_id"),
        ({"remote_block_ids": "4,9,2"}, "remote_block_ids"),
    ]
    for change, words in bad:
        p = dict(good_params(), **change)
        rp, why = kv.parse_remote(p, 32)
        assert rp is None and words in why, (change, why)


def test_notify_ids_and_prompt_hashes_are_stable():
    assert kv.notify_id("req-1") == kv.notify_id("req-1") != kv.notify_id("req-2")
    assert 0 <= kv.notify_id("x") < 1 << 64
    assert kv.prompt_hash([1, 2, 3]) != kv.prompt_hash([1, 2, 4])
    assert kv.prompt_hash([1, 2, 3]) != kv.prompt_hash([1, 2])
