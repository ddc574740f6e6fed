"""RWKV Playground: an RWKV-4 to RWKV-7 inference engine (and the Gradio app in `rwkv_playground.ui`).

    from rwkv_playground import load_runtime, load_tokenizer, generate, SamplingSettings

    runtime = load_runtime("assets/rwkv4-demo-shakespeare.pth")
    tokenizer = load_tokenizer("assets/rwkv4-demo-tokenizer.json")
    for piece in generate(runtime, tokenizer, "Romeo: ", max_tokens=50):
        print(piece, end="")

docs/architecture.md describes the units and what each owns. The serving side lives in
`rwkv_playground.serving`, the inspector in `rwkv_playground.inspector`; the module names of the
earlier flat layout (`rwkv_playground.scheduler`, `.engine`, `.inspection`, `.patching`, ...) are
aliases of their new homes, so scripts written against them keep working.
"""

from .version import __version__  # noqa: E402

from .errors import GenerationError, LoadError, PlaygroundError, StateError  # noqa: E402
from .state import State  # noqa: E402
from .models.rwkv4 import RWKV4, RWKVConfig  # noqa: E402
from .runtime import Runtime, load_runtime  # noqa: E402
from .tokenizer import load_tokenizer  # noqa: E402
from .sampling import SamplingSettings  # noqa: E402
from .generation import generate  # noqa: E402

__all__ = [
    "__version__", "load_runtime", "load_tokenizer", "generate", "SamplingSettings", "Runtime", "RWKV4",
    "RWKVConfig", "State", "PlaygroundError", "LoadError", "StateError", "GenerationError",
]


# ---- the earlier flat layout's module names, as aliases of their new homes ----------------------
import importlib as _importlib  # noqa: E402
import importlib.abc as _importlib_abc  # noqa: E402
import importlib.util as _importlib_util  # noqa: E402
import sys as _sys  # noqa: E402

MOVED_MODULES = {
    "scheduler": "serving.scheduler", "sessions": "serving.sessions", "store": "serving.store",
    "engine": "serving.engine", "completions": "serving.completions", "metrics": "serving.metrics",
    "api": "serving.api", "inspection": "inspector", "matrix_inspection": "inspector.matrix",
    "experiments": "inspector.knockouts", "patching": "inspector.patching",
}


class _MovedModuleFinder(_importlib_abc.MetaPathFinder, _importlib_abc.Loader):
    """`import rwkv_playground.patching` gives rwkv_playground.inspector.patching itself (the same
    module object, imported on first use)."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix == __name__ and name in MOVED_MODULES:
            return _importlib_util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = _importlib.import_module(f"{__name__}.{MOVED_MODULES[spec.name.partition('.')[2]]}")
        _sys.modules[spec.name] = module
        return module

    def exec_module(self, module):
        pass  # (already executed under its own name)


if not any(isinstance(f, _MovedModuleFinder) for f in _sys.meta_path):
    _sys.meta_path.append(_MovedModuleFinder())
