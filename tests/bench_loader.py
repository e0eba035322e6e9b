"""Load a benchmark script (``benchmarks/<area>/<name>.py``, not a package) as a module for its tests."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(relpath: str, name: str):
    """The module at ``ROOT / relpath``, registered as ``name`` (dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
