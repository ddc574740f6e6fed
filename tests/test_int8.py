"""int8 weights (quantization.py; `--dtype int8`): what they stand for, and that everything built on
them computes with exactly that.

The reference for an int8 model is an fp32 model of the dequantized weights (q * scale per row; the
embedding rounded to bf16, as int8 stores it): the prompt path and the PyTorch step must equal it
to float rounding, the fused C++ step is held to the PyTorch step in test_step.py (every
instruction set, every SIMD tail), and the matvec to float64 in test_step.py. Quality against the
unquantized model is measured on the demo model (held-out loss) and on the 169M shape (top-1).
Loading converts tensor by tensor: the peak stays near the int8 model's size.
"""

import math
import os
from pathlib import Path

import pytest
import torch

from conftest import MID, TINY, write_checkpoint
from rwkv_playground import LoadError, load_runtime
from rwkv_playground.models.rwkv4 import RWKVConfig, init_random_weights
from rwkv_playground.quantization import dequantize_rows, quantize_rows

HELD_OUT = Path(__file__).parent / "data" / "heldout_shakespeare.txt"  # Macbeth, never trained on


def test_quantize_rows_round_trip_and_blocks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(37, 300, generator=g) * torch.logspace(-4, 3, 37)[:, None]  # rows of very different size
    W[5] = 0.0  # an all-zero row
    W[6, 7] = -1e4  # one outlier decides its row's scale
    q, scale = quantize_rows(W)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.shape == W.shape and scale.shape == (37,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert scale[5] == 1.0 and not q[5].any()
    error = (dequantize_rows(q, scale) - W).abs()
    assert bool((error <= scale[:, None] / 2 * (1 + 1e-5)).all())  # rounding: at most half a step
    # the blocking (and the pages released after each block) never change the result
    monkeypatch.setattr("rwkv_playground.quantization.BLOCK_FLOATS", 1000)
    seen = []
    q_small, scale_small = quantize_rows(W.to(torch.bfloat16).float(), release=seen.append)
    q_bf16, scale_bf16 = quantize_rows(W.to(torch.bfloat16))
    assert torch.equal(q_small, q_bf16) and torch.equal(scale_small, scale_bf16)
    assert sum(len(block) for block in seen) == 37 and len(seen) == math.ceil(37 / (1000 // 300))


def dequantized_checkpoint(runtime, path: Path) -> Path:
    """The fp32 checkpoint an int8 runtime stands for: matrices q * scale, the embedding as stored."""
    tensors = {}
    state = runtime.model.state_dict()
    for name, tensor in state.items():
        if name.endswith("_scale"):
            continue
        if tensor.dtype == torch.int8:
            tensors[name] = dequantize_rows(tensor, state[name + "_scale"])
        else:
            tensors[name] = tensor.float()
    torch.save(tensors, path)
    return path


@pytest.mark.parametrize("step", ["reference", "cpu"])
def test_int8_model_computes_exactly_with_its_dequantized_weights(tmp_path, step):
    source = write_checkpoint(tmp_path / "tiny.pth", TINY, seed=4)
    quantized = load_runtime(source, dtype="int8", gemm="upcast", step=step)
    assert quantized.model.head.weight.dtype == torch.int8 and quantized.model.emb.weight.dtype == torch.bfloat16
    assert quantized.describe()["dtype"] == "int8" and quantized.describe()["gemm"] == "upcast"
    reference = load_runtime(dequantized_checkpoint(quantized, tmp_path / "deq.pth"), step="reference")
    tokens = torch.randint(0, TINY.vocab_size, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    # a prompt of 70 rows: the GEMM path (dequantized per block), then one-token steps
    logits, state = quantized.forward(tokens, full_output=True)
    expected, expected_state = reference.forward(tokens, full_output=True)
    assert ((logits - expected).abs().max() / expected.abs().max()).item() < 1e-5
    for token in tokens[:6]:
        got = quantized.step([token], [state])[0]
        want = reference.step([token], [expected_state])[0]
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
    assert quantized.describe()["step"].startswith(step)


def test_native_gemm_on_int8_and_bf16_stays_close_to_the_upcast(tmp_path):
    """native: bf16 activations times bf16 (or int8 dequantized to bf16) blocks. Not exact, so it is
    held to the exact upcast within bf16 rounding, and must pick the same top token almost always."""
    source = write_checkpoint(tmp_path / "tiny.pth", TINY, seed=5)
    tokens = torch.randint(0, TINY.vocab_size, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    for dtype in ("bf16", "int8"):
        exact = load_runtime(source, dtype=dtype, gemm="upcast").forward(tokens, full_output=True)[0]
        native = load_runtime(source, dtype=dtype, gemm="native")
        assert native.describe()["gemm"] == "native"
        fast = native.forward(tokens, full_output=True)[0]
        assert ((fast - exact).abs().max() / exact.abs().max()).item() < 0.03, dtype
        assert (fast.argmax(-1) == exact.argmax(-1)).float().mean().item() >= 0.9, dtype
        assert not torch.equal(fast, exact)  # it really ran another product


def test_the_gemm_choice_follows_the_cpu_then_a_measurement():
    from rwkv_playground.backends import NATIVE_GEMM_MIN_SPEEDUP, choose_gemm

    def never():
        raise AssertionError("no bf16 units: nothing to measure")

    assert choose_gemm(["avx2", "fma"], never) == ("upcast", "no AMX / AVX512-BF16 on this CPU")
    choice, why = choose_gemm(["avx2", "avx512f", "amx_bf16", "avx512_bf16"], lambda: 4.8)
    assert choice == "native" and "AMX" in why and "4.8x" in why
    choice, why = choose_gemm(["avx512f", "avx512_bf16"], lambda: NATIVE_GEMM_MIN_SPEEDUP - 0.1)
    assert choice == "upcast" and "AVX512-BF16" in why and "only" in why
    # fp32 and GPU storage have no choice to make; an explicit choice is kept and said so
    from rwkv_playground.backends import resolve

    assert resolve(torch.device("cpu"), "fp32").gemm == "fp32"
    chosen = resolve(torch.device("cpu"), "int8", gemm="upcast")
    assert (chosen.gemm, chosen.gemm_reason) == ("upcast", "chosen")
    auto = resolve(torch.device("cpu"), "bf16")
    features = auto.cpu_kernels.cpu_features()
    assert auto.gemm in ("native", "upcast") and auto.gemm_reason
    if not any(f in features for f in ("amx_bf16", "avx512_bf16")):
        assert auto.gemm == "upcast"


def test_cpu_features_and_stream_read_agree_with_the_machine(cpu_kernel_module):
    flags = open("/proc/cpuinfo").read().split("\nflags", 2)[1].split("\n", 1)[0].split()
    features = cpu_kernel_module.cpu_features()
    for ours, linux in (("avx2", "avx2"), ("avx512f", "avx512f"), ("avx512_bf16", "avx512_bf16"),
                        ("amx_bf16", "amx_bf16"), ("fma", "fma")):
        assert (ours in features) == (linux in flags), ours
    # stream_read (the benchmark's bandwidth bound) reads every byte: its checksum is the sum of
    # the buffer's 64-bit words (mod 2^64) on every instruction set
    buffer = torch.randint(0, 256, ((3 << 20) + 768,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = int(buffer.view(torch.int64).sum())  # int64 sums wrap like the kernel's uint64
    for isa in cpu_kernel_module.available_isas():
        assert cpu_kernel_module.stream_read(buffer, isa) == expected, isa


def test_a_corrupt_matrix_is_refused_when_quantizing(tmp_path):
    weights = init_random_weights(TINY, seed=1)
    weights["blocks.1.ffn.key.weight"][3, 4] = float("nan")
    torch.save(weights, tmp_path / "nan.pth")
    with pytest.raises(LoadError, match="blocks.1.ffn.key.weight.*NaN"):
        load_runtime(tmp_path / "nan.pth", dtype="int8")


def test_loading_int8_peaks_near_the_int8_model(ckpt_dir):
    """A bf16 file loaded as int8, in a fresh process: the resident high-water mark grows by at most
    1.15x the int8 model (each matrix is quantized block by block and its file pages let go)."""
    from conftest import load_peak_in_fresh_process

    path = write_checkpoint(ckpt_dir / "mid-bf16-for-int8.pth", MID, seed=3, dtype=torch.bfloat16)
    os.sync()  # as a downloaded checkpoint is: on disk (the kernel cannot page out unwritten pages)
    peak = load_peak_in_fresh_process(path, dtype="int8", wkv="reference", step="cpu", gemm="upcast")
    assert peak["dtype"] == "torch.int8"
    assert peak["grown"] <= 1.15 * peak["size"], f"peak grew by {peak['grown'] / peak['size']:.2f}x the int8 model"


def held_out_loss(runtime, tokenizer, n_tokens=4096) -> float:
    tokens = tokenizer.encode(HELD_OUT.read_text())[: n_tokens + 1]
    logits, _ = runtime.forward(tokens[:-1], full_output=True)
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(tokens[1:])).item()


def test_int8_demo_model_held_out_loss_within_one_percent_of_bf16(app_model_path):
    from rwkv_playground.serving.engine import find_tokenizer
    from rwkv_playground.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(find_tokenizer(app_model_path, 4096, [app_model_path.parent]))
    losses = {}
    for dtype, gemm in (("bf16", "upcast"), ("int8", "upcast"), ("int8", "native")):
        losses[dtype, gemm] = held_out_loss(load_runtime(app_model_path, dtype=dtype, gemm=gemm), tokenizer)
    base = losses["bf16", "upcast"]
    assert 2.0 < base < 6.0  # a trained model on real text (the card says 3.80 on its own split)
    for key, loss in losses.items():
        assert abs(loss - base) <= 0.01 * base, (key, loss, base)


def test_int8_top1_agrees_with_fp32_on_the_169m_shape(tmp_path):
    """Random weights of the 169M shape (12 x 768, vocab 50277): the most likely next token of the
    int8 model equals the fp32 model's at >= 95 % of the positions of two 512-token texts (measured
    here: upcast 96.1 / 96.7 %, native bf16 GEMM 95.3 / 95.9 %)."""
    config = RWKVConfig(n_layer=12, n_embd=768, vocab_size=50277, ffn_dim=3072)
    path = tmp_path / "random-169m.pth"
    torch.save(init_random_weights(config, seed=0), path)
    texts = [torch.randint(0, config.vocab_size, (512,), generator=torch.Generator().manual_seed(seed)).tolist()
             for seed in (0, 1)]
    fp32 = load_runtime(path)
    exact = [fp32.forward(tokens, full_output=True)[0].argmax(-1) for tokens in texts]
    del fp32
    for gemm in ("upcast", "native"):
        quantized = load_runtime(path, dtype="int8", gemm=gemm)
        agree = [(quantized.forward(tokens, full_output=True)[0].argmax(-1) == top).float().mean().item()
                 for tokens, top in zip(texts, exact)]
        assert sum(agree) / len(agree) >= 0.95 and min(agree) >= 0.94, (gemm, agree)


def test_int8_serves_every_tab_and_batches_bit_for_bit(app_model_path):
    """The Chat, Blog and Inspector work on an int8 model through the engine, and generations that
    share the batched int8 step equal their solo runs."""
    from rwkv_playground.blog import BlogSession
    from rwkv_playground.chat import ChatSession
    from rwkv_playground.serving.engine import Engine
    from rwkv_playground.generation import Generation
    from rwkv_playground.inspector import record_task
    from rwkv_playground.sampling import SamplingSettings

    engine = Engine(dtype="int8")
    try:
        loaded = engine.load(app_model_path)
        assert loaded.runtime.describe()["dtype"] == "int8"
        assert loaded.runtime.model.blocks[0].att.key.weight.dtype == torch.int8
        from rwkv_playground.ui.model_panel import model_markdown

        info, panel = loaded.runtime.describe(), model_markdown(engine)  # the panel says which paths run
        assert "int8 on cpu" in panel and f"SIMD {info['simd']}" in panel and info["gemm_reason"] in panel
        chat = ChatSession()
        reply = ""
        for reply in chat.send(engine, "Good morrow, my lord.", SamplingSettings(seed=1), 20):
            pass
        assert reply and chat.turns[0].stats["generated_tokens"] > 0
        blog = BlogSession()
        text = ""
        for text in blog.write(engine, "Title: On sleep\n\n", SamplingSettings(seed=2), 30):
            pass
        assert len(text) > len("Title: On sleep")
        tokens = loaded.tokenizer.encode("ROMEO: But soft, what light through yonder window breaks?")
        recording = engine.scheduler.submit_task(lambda runtime: record_task(runtime, loaded.tokenizer, tokens))
        assert recording.wait(timeout=60).aa.shape[0] == len(tokens)

        def generation(seed):
            return Generation(loaded.tokenizer, "JULIET: ", settings=SamplingSettings(top_p=0.9, seed=seed),
                              max_tokens=40, sampler_kernel=loaded.runtime.sampler_kernel)

        alone = []
        for seed in range(4):
            gen = generation(seed)
            engine.scheduler.submit_generation(gen).wait(timeout=60)
            alone.append(list(gen.tokens))
        together = [generation(seed) for seed in range(4)]
        tickets = [engine.scheduler.submit_generation(gen) for gen in together]
        for ticket in tickets:
            ticket.wait(timeout=60)
        assert [list(gen.tokens) for gen in together] == alone
        assert max(engine.scheduler.batch_sizes) >= 2
    finally:
        engine.scheduler.close()


def test_the_big_shape_benchmark_writes_a_checkpoint_tensor_by_tensor(tmp_path):
    """benchmarks/bench_big_shapes.py streams a 14B-shape checkpoint to disk; here on a small shape:
    the file it writes loads as the same weights init_random_weights gives."""
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_big_shapes import file_bytes, write_safetensors

    from rwkv_playground.models.checkpoint import read_checkpoint

    path = tmp_path / "small.safetensors"
    write_safetensors(path, TINY)
    assert not path.with_suffix(".partial").exists()
    tensors = read_checkpoint(path).tensors
    expected = init_random_weights(TINY, seed=0, dtype=torch.bfloat16)
    assert list(tensors) == list(expected)
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    assert path.stat().st_size > file_bytes(TINY)
    assert load_runtime(path, dtype="int8").forward([1, 2, 3])[0].isfinite().all()
