"""python -m kvx: which library this package loads, with which backends,
built against which UCX and libfabric."""
import json
import os

import kvx


def main() -> None:
    path = kvx.library_path()
    print("kvx %s" % path)
    info_path = os.path.join(os.path.dirname(path), "build_info.json")
    info = {}
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
    versions = info.get("versions", {})
    for b in kvx.backends():
        print("  backend %-6s %s" % (b, versions.get(b, "")))
    if not kvx.cuda_available():
        print("  no CUDA: %s" % (kvx._CUDA_WHY or "built without it"))


if __name__ == "__main__":
    main()
