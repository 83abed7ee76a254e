# The package is pure Python over a shared library that setup builds from
# kvx's headers (kvx/_build.py) with the backends this machine has.
import importlib.util
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _builder():
    spec = importlib.util.spec_from_file_location("kvx_build", os.path.join(HERE, "kvx", "_build.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BuildWithLibrary(build_py):
    def run(self):
        super().run()
        out = os.path.join(self.build_lib, "kvx")
        os.makedirs(out, exist_ok=True)
        _builder().build(out)


setup(cmdclass={"build_py": BuildWithLibrary})
