"""A producer process with block generations, for the generation tests
(test_kvx.py over UCX and libfabric, test_gpu.py over CUDA). The test's
target builds the owner's context and cache in the spawned process and
hands them to serve(); the test drives it through GenerationOwner.ask."""
import multiprocessing as mp
import time
import traceback

SPAWN = mp.get_context("spawn")


def serve(conn, ctx, cache, idle_s=60.0):
    """Sends ("md", metadata), then answers ("gens", ids), ("retire", ids)
    and ("lease", notify_id, ms, ids) until ("bye",) or idle_s without a
    message; delivers kvx's notifications meanwhile."""
    conn.send(("md", ctx.metadata()))
    last = time.monotonic()
    while True:
        if not conn.poll(0.05):
            ctx.notifications()
            if time.monotonic() - last > idle_s:
                return
            continue
        last = time.monotonic()
        msg = conn.recv()
        if msg[0] == "gens":
            conn.send(cache.generations(msg[1]))
        elif msg[0] == "retire":
            cache.retire(msg[1])
            conn.send("ok")
        elif msg[0] == "lease":
            ctx.expect(msg[1], msg[2], retire=(cache, msg[3]))
            conn.send("ok")
        else:
            return


def run(target, conn, *args):
    """The spawned process: target(conn, *args) builds and serves; an error
    goes back to the test instead of the metadata."""
    try:
        target(conn, *args)
    except Exception:
        conn.send(("error", traceback.format_exc()))


class GenerationOwner:
    """target(conn, *args), in a spawned process, until the with-block ends."""

    def __init__(self, target, args=(), start_s=60.0, ask_s=10.0, join_s=10.0):
        self.ask_s, self.join_s = ask_s, join_s
        self.conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=run, args=(target, child) + tuple(args))
        self.proc.start()
        try:
            assert self.conn.poll(start_s), "owner did not send its metadata"
            kind, self.md = self.conn.recv()
            assert kind == "md", self.md
        except BaseException:
            self.close()
            raise

    def ask(self, *msg):
        self.conn.send(msg)
        assert self.conn.poll(self.ask_s), "owner did not answer %r" % (msg,)
        return self.conn.recv()

    def close(self):
        try:
            self.conn.send(("bye",))
        except OSError:
            pass
        self.proc.join(self.join_s)
        if self.proc.is_alive():
            self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
