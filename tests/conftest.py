"""Shared fixtures: random-weight RWKV-4 checkpoints in BlinkDL's format, built by the tests."""

import contextlib
import os
import sys
import time
from pathlib import Path

import warnings

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# The rwkv pip package reads these at import time: plain PyTorch path, TorchScript on.
os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ["RWKV_CUDA_ON"] = "0"
# gradio 6.31 calls a pandas-3-deprecated argument in a worker thread (harmless)
warnings.filterwarnings("ignore", message="The copy keyword is deprecated")

from rwkv_playground.models.rwkv4 import RWKVConfig, init_random_weights  # noqa: E402

TINY = RWKVConfig(n_layer=3, n_embd=64, vocab_size=500, ffn_dim=256)
MID = RWKVConfig(n_layer=6, n_embd=512, vocab_size=50277, ffn_dim=2048)
WORLD_TINY = RWKVConfig(n_layer=2, n_embd=32, vocab_size=65536, ffn_dim=128)


def write_checkpoint(path: Path, config: RWKVConfig, seed: int = 0, dtype=torch.float32) -> Path:
    torch.save(init_random_weights(config, seed=seed, dtype=dtype), path)
    return path


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_fp32(ckpt_dir):
    return write_checkpoint(ckpt_dir / "tiny-fp32.pth", TINY, seed=1)


@pytest.fixture(scope="session")
def tiny_bf16(ckpt_dir):
    return write_checkpoint(ckpt_dir / "tiny-bf16.pth", TINY, seed=2, dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def mid_fp32(ckpt_dir):
    return write_checkpoint(ckpt_dir / "mid-fp32.pth", MID, seed=3)


@pytest.fixture(scope="session")
def world_tiny(ckpt_dir):
    return write_checkpoint(ckpt_dir / "world-tiny.pth", WORLD_TINY, seed=4)


@pytest.fixture(scope="session")
def world_vocab_path():
    """The RWKV World vocabulary shipped in assets/ (identical to the rwkv package's copy)."""
    return ROOT / "assets" / "rwkv_vocab_v20230424.txt"


@pytest.fixture(scope="session")
def world_tokenizer(world_vocab_path):
    from rwkv_playground.tokenizer import load_tokenizer

    return load_tokenizer(world_vocab_path)


# ---- the app --------------------------------------------------------------------------------

DEMO_CHECKPOINT = ROOT / "assets" / "rwkv4-demo-shakespeare.pth"


@pytest.fixture(scope="session")
def app_model_path(ckpt_dir):
    """The shipped demo model (what a newcomer runs). APP_TEST_MODEL overrides it for development."""
    override = os.environ.get("APP_TEST_MODEL")
    if override:
        return Path(override)
    assert DEMO_CHECKPOINT.exists(), "assets/ must ship the demo model (python -m rwkv_playground.train)"
    return DEMO_CHECKPOINT


@pytest.fixture(scope="session")
def engine(app_model_path, tmp_path_factory):
    from rwkv_playground.serving.engine import Engine
    from rwkv_playground.serving.store import SessionStore

    models_dir = tmp_path_factory.mktemp("models")
    write_checkpoint(models_dir / "other-tiny.pth", WORLD_TINY, seed=21)
    # the app's default: visitors' work kept in a session store (SQLite in a data folder)
    eng = Engine(models_dir=models_dir, store=SessionStore.open(tmp_path_factory.mktemp("data")))
    eng.load(app_model_path)
    yield eng
    eng.store.close()


@pytest.fixture(scope="session")
def loaded(engine):
    return engine.current


def wait_until(condition, timeout=10.0) -> bool:
    """Polls `condition()` every 20 ms until it holds or `timeout` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(engine):
    """The real app as app.py serves it (the UI and the OpenAI-compatible API on one port) on a
    free loopback port; yields the server: `.url`, `.app` (the FastAPI app)."""
    import urllib.request

    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    from rwkv_playground.server import Server, build_server_app
    from rwkv_playground.ui import create_app

    demo = create_app(engine)
    app = build_server_app(demo, engine)
    server = Server(app, port=free_port()).start()
    server.app = app
    for _ in range(100):
        try:
            urllib.request.urlopen(server.url + "gradio_api/info", timeout=2)
            break
        except OSError:
            time.sleep(0.1)
    try:
        yield server
    finally:
        server.close()
        demo.close()


@pytest.fixture(scope="session")
def app_server(engine):
    """The app on the demo model for the whole session (see serving)."""
    with serving(engine) as server:
        yield server


# a text for the RWKV-7 demo's patching tests, and its corruption of the same token count
MATRIX_CLEAN = ("ROMEO: Good night, good night! Parting is such sweet sorrow,\n"
                "That I shall say good night till it be morrow.\n\nJULIET:")


def same_length_corruption(tokenizer, clean: str) -> str:
    """The clean text with the first speaker renamed to a name of the same token count."""
    n = len(tokenizer.encode(clean))
    for name in ("JULIET", "HAMLET", "BRUTUS", "OTHELLO", "PORTIA", "VIOLA", "MACBETH", "OLIVIA", "BANQUO"):
        candidate = clean.replace("ROMEO", name, 1)
        if len(tokenizer.encode(candidate)) == n:
            return candidate
    raise AssertionError("no same-length name found")


@pytest.fixture(scope="session")
def app_url(app_server):
    return app_server.url


@pytest.fixture(scope="session")
def cpu_kernel_module():
    """The compiled CPU extension (WKV, matvec, fused step, sampler)."""
    from rwkv_playground.kernels import load_kernel

    try:
        return load_kernel("cpu")
    except RuntimeError as exc:  # CI has a compiler: a failure here is a real failure
        pytest.fail(f"The C++ kernels did not build: {exc}")


@contextlib.contextmanager
def paced(engine, seconds_per_step: float, when=lambda: True):
    """Slow every generation step down to a laptop's pace on a real model: the demo model writes
    a reply faster than a client or browser can watch it stream. (Each scheduler tick is one
    batched step, so pacing the step paces every generation.) `when()` switches it on and off."""
    runtime = engine.current.runtime
    fast = runtime.step

    def step(tokens, states):
        if when():
            time.sleep(seconds_per_step)
        return fast(tokens, states)

    runtime.step = step
    try:
        yield
    finally:
        del runtime.step  # the instance attribute goes; the class method is visible again


def load_peak_in_fresh_process(path, **load_options) -> dict:
    """Load a checkpoint in a fresh process and measure how much its resident high-water mark
    (VmHWM, reset right before load_runtime) grew; every tensor is touched afterwards, so mapped
    pages count. Returns {"grown": bytes, "size": bytes of the loaded model, "dtype": head dtype}."""
    import json
    import subprocess

    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from rwkv_playground import load_runtime\n"
        "from rwkv_playground.kernels import load_kernel\n"
        "load_kernel('cpu')  # the extension's code is the process's, not the model's\n"
        "def status(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key):\n"
        "            return int(line.split()[1]) * 1024\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # reset the peak to the current RSS\n"
        "before = status('VmRSS')\n"
        f"m = load_runtime({str(path)!r}, **{load_options!r})\n"
        "x = sum(float(p.view(-1)[-1].float()) for p in m.model.state_dict().values())  # touch every tensor\n"
        "size = sum(t.numel() * t.element_size() for t in m.model.state_dict().values())\n"
        "print(json.dumps({'grown': status('VmHWM') - before, 'size': size, 'dtype': str(m.model.head.weight.dtype)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
