"""RWKV Playground: an RWKV-4 to RWKV-7 inference engine (and the Gradio app in `rwkv_playground.ui`).

    from rwkv_playground import load_runtime, load_tokenizer, generate, SamplingSettings

    runtime = load_runtime("assets/rwkv4-demo-shakespeare.pth")
    tokenizer = load_tokenizer("assets/rwkv4-demo-tokenizer.json")
    for piece in generate(runtime, tokenizer, "Romeo: ", max_tokens=50):
        print(piece, end="")

docs/architecture.md describes the units and what each owns.
"""

__version__ = "0.2.0"

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
