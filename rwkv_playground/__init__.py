"""RWKV Playground: an RWKV-4 inference engine (and the Gradio app in `rwkv_playground.ui`).

    from rwkv_playground import load_model, load_tokenizer, generate, SamplingSettings
"""

__version__ = "0.1.0"

from .errors import GenerationError, LoadError, PlaygroundError, StateError  # noqa: E402
from .state import State  # noqa: E402
from .model import RWKV4, RWKVConfig, load_model  # noqa: E402

__all__ = [
    "__version__", "load_model", "RWKV4", "RWKVConfig", "State",
    "PlaygroundError", "LoadError", "StateError", "GenerationError",
]
