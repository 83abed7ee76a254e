#!/usr/bin/env python3
"""Make vLLM's own NixlConnector loadable in build/vllm without touching it.

    PYTHONPATH=$(build/vllm/bin/python tests/vllm/nixl_shim.py /tmp/nixl-shim) \\
        build/vllm/bin/python tests/vllm/run_pd.py --connector NixlConnector --expect-match

vLLM 0.32 loads NIXL as ``import nixl._api`` / ``nixl._bindings``
(vllm/distributed/nixl_utils.py).  The nixl-cu12 wheel only ships the
top-level package ``nixl_cu12`` (the ``nixl`` name comes from the separate
``nixl`` meta-package), so with nixl-cu12 alone vLLM logs "NIXL is not
available" and the worker dies with RuntimeError("NIXL is not available").

This writes DIR/nixl/{__init__,_api,_bindings}.py re-exporting nixl_cu12,
and symlinks nixl_cu12 (+ its bundled .libs) from SITE (default: the
build/peers venv, which has nixl-cu12 1.5.1) into DIR.  Prints DIR.
"""
import glob
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_site() -> str:
    c = glob.glob(os.path.join(REPO, "build/peers/lib/python3*/site-packages"))
    if not c:
        sys.exit("no build/peers site-packages; pass SITE")
    return c[0]


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = os.path.abspath(sys.argv[1])
    site = sys.argv[2] if len(sys.argv) > 2 else default_site()
    if not os.path.isdir(os.path.join(site, "nixl_cu12")):
        sys.exit(f"{site} has no nixl_cu12")
    os.makedirs(os.path.join(out, "nixl"), exist_ok=True)
    for name in ("nixl_cu12", "nixl_cu12.libs", ".nixl_cu12.mesonpy.libs"):
        src = os.path.join(site, name)
        dst = os.path.join(out, name)
        if os.path.exists(src):
            if os.path.islink(dst):
                os.unlink(dst)
            os.symlink(src, dst)
    files = {
        "__init__.py": "from nixl_cu12 import *  # noqa: F401,F403\n",
        "_api.py": "from nixl_cu12._api import *  # noqa: F401,F403\n"
                   "from nixl_cu12._api import nixl_agent, nixl_agent_config  # noqa: F401\n",
        "_bindings.py": "from nixl_cu12._bindings import *  # noqa: F401,F403\n",
    }
    for fn, text in files.items():
        with open(os.path.join(out, "nixl", fn), "w") as f:
            f.write(text)
    print(out)


if __name__ == "__main__":
    main()
