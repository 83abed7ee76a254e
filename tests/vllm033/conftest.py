"""tests/vllm033 runs in build/vllm033 (tests/vllm033/install.sh): vLLM 0.33
beside the CPU torch, and kvx's package. It shares tests/python's helpers
(vllm_forms: what a block holds, which heads a TP rank has)."""
import faulthandler
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
# No GPU here: without this vLLM finds no platform and its configs refuse to build.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("UCX_TLS", "tcp")
os.environ.setdefault("UCX_NET_DEVICES", "lo")


@pytest.fixture(autouse=True)
def deadline():
    """A test still running after 120 s prints every thread's stack and ends
    the run: a hung read says where it hung, before the matrix's limit."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# The test runner counts cases from a line "N passed, M failed": print one.
def pytest_terminal_summary(terminalreporter):
    st = terminalreporter.stats
    n = lambda k: len([r for r in st.get(k, []) if getattr(r, "when", "call") == "call" or k != "passed"])
    terminalreporter.write_line("%d passed, %d failed, %d skipped" % (n("passed"), n("failed") + len(st.get("error", [])), len(st.get("skipped", []))))
