# The package is pure Python over a shared library that setup builds from
# kvx's headers (kvx/_build.py) with the backends this machine has. The
# headers travel in the package (kvx/include), so a wheel or an sdist builds
# away from the repository; setuptools' build/ and egg-info go to a temporary
# directory, not into the checkout.
import glob
import importlib.util
import os
import shutil
import sys
import tempfile

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _builder():
    spec = importlib.util.spec_from_file_location("kvx_build", os.path.join(HERE, "kvx", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _headers():
    """kvx's headers: the repository's (python/ beside them), else those an sdist carries."""
    for d in (os.path.dirname(HERE), os.path.join(HERE, "kvx", "include")):
        found = sorted(glob.glob(os.path.join(d, "kvx*.h")))
        if any(os.path.basename(f) == "kvx.h" for f in found):
            return found
    raise RuntimeError("kvx: no kvx.h beside python/ nor in kvx/include")


class BuildWithLibrary(build_py):
    def run(self):
        super().run()
        out = os.path.join(self.build_lib, "kvx")
        inc = os.path.join(out, "include")
        os.makedirs(inc, exist_ok=True)
        for h in _headers():
            if os.path.abspath(os.path.dirname(h)) != os.path.abspath(inc):
                shutil.copy(h, inc)
        info = _builder().build(out, headers=inc)
        sys.stderr.write("kvx: %s\n" % info)


class WithLibrary(Distribution):
    """A wheel that carries a compiled library is this platform's, not pure."""

    def has_ext_modules(self):
        return True


_TMP = tempfile.mkdtemp(prefix="kvx-setup-")
setup(cmdclass={"build_py": BuildWithLibrary}, distclass=WithLibrary,
      options={"build": {"build_base": os.path.join(_TMP, "build")}, "egg_info": {"egg_base": _TMP}})
