"""The shipped demo models (RWKV-4, and RWKV-7 on the same corpus and tokenizer): each loads like a
released checkpoint of its architecture, the tokenizer round-trips, it generates, its card is
consistent with the files, and it learned something (decays differ by layer)."""

import json
import math
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMOS = {  # arch: (checkpoint, card, a key only that architecture has)
    "v4": ("rwkv4-demo-shakespeare.pth", "model_card.json", "blocks.0.att.time_first"),
    "v7": ("rwkv7-demo-shakespeare.pth", "rwkv7-demo-card.json", "blocks.0.att.r_k"),
}


@pytest.fixture(scope="module", params=list(DEMOS))
def demo(request):
    from rwkv_playground.serving.engine import DEMO_CHECKPOINTS, Engine

    path = ASSETS / DEMOS[request.param][0]
    assert path.exists() and path in DEMO_CHECKPOINTS, f"assets/ must ship {path.name}"
    engine = Engine()
    assert path.name in engine.list_models()  # the model panel offers it
    assert engine.resolve_choice(path.name) == path
    return request.param, engine.load(path)


def test_files_are_small_bf16_blinkdl_format(demo):
    arch, _ = demo
    name, card, own_key = DEMOS[arch]
    raw = torch.load(ASSETS / name, weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in raw.values())
    assert own_key in raw and "head.weight" in raw and "blocks.0.ln0.weight" in raw
    assert (ASSETS / name).stat().st_size + (ASSETS / card).stat().st_size <= 20 * 1024 * 1024


def test_tokenizer_round_trip(demo):
    tok = demo[1].tokenizer
    assert tok.name == "rwkv4-demo-tokenizer.json" and tok.eos_id == 0  # both models share it
    for text in ("Romeo: But soft, what light through yonder window breaks?\n\nJuliet: Ay me!",
                 "Unicode too: café, 中文, 🤖", ""):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert b"".join(tok.decode_bytes([i]) for i in ids) == text.encode()


def test_generation_is_fluent_enough(demo):
    from rwkv_playground.generation import generate
    from rwkv_playground.sampling import SamplingSettings

    loaded = demo[1]
    stream = generate(loaded.runtime, loaded.tokenizer, "Romeo: ", max_tokens=60,
                      settings=SamplingSettings(temperature=0.8, top_p=0.7, seed=1))
    text = "".join(stream)
    words = text.split()
    assert len(words) >= 20
    # a trained model writes mostly real words of the corpus, not byte soup
    assert sum(w.strip(".,;:!?'-").isalpha() for w in words) / len(words) > 0.7


def test_card_matches_the_files_and_beats_the_bigram(demo):
    arch, loaded = demo
    card = json.loads((ASSETS / DEMOS[arch][1]).read_text())
    info = loaded.runtime.describe()
    assert card["shape"]["n_layer"] == info["n_layer"] and card["shape"]["n_embd"] == info["n_embd"]
    assert card["parameters"] == info["parameters"]
    v = card["validation"]
    assert v["loss"] < v["bigram_baseline_loss"] - 0.3
    assert v["perplexity"] == pytest.approx(math.exp(v["loss"]), rel=1e-3)
    lives = card["median_half_life_tokens_per_layer"]
    assert len(lives) == info["n_layer"] and max(lives) / min(lives) > 1.5  # decays differ across layers
    assert card["files_bytes"][DEMOS[arch][0]] == (ASSETS / DEMOS[arch][0]).stat().st_size


def test_rwkv7_card_compares_with_the_rwkv4_demo_on_the_same_tokens():
    v4 = json.loads((ASSETS / DEMOS["v4"][1]).read_text())
    v7 = json.loads((ASSETS / DEMOS["v7"][1]).read_text())
    assert v7["corpus"] == v4["corpus"] and v7["tokenizer"] == v4["tokenizer"]
    assert v7["validation"]["bigram_baseline_loss"] == v4["validation"]["bigram_baseline_loss"]
    compared = v7["compared_with_rwkv4_demo"]
    assert compared["tokens_seen"] == compared["rwkv4_tokens_seen"] == v7["training"]["tokens_seen"]
    assert compared["rwkv4_validation_loss"] == v4["validation"]["loss"]
    assert compared["lower"] == (v7["validation"]["loss"] < v4["validation"]["loss"])
    shape = v7["shape"]
    assert (shape["n_head"], shape["head_size"]) == (4, 64)
    assert shape["lora"] == {"decay": 32, "iclr": 32, "value": 32, "gate": 64}


def test_eval_reproduces_the_reported_loss_on_a_slice(demo):
    """--eval re-measures the card's number; here a cheap check on the first 2048 validation
    tokens that the engine's loss on held-out text is in the card's range."""
    from tools.demo_model.train import evaluate_shipped

    arch, _ = demo
    loss = evaluate_shipped(ASSETS, max_tokens=2048, arch=arch)
    card = json.loads((ASSETS / DEMOS[arch][1]).read_text())
    assert abs(loss - card["validation"]["loss"]) < 0.5
