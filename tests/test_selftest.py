"""The self-test GPU owners run first (and CI runs on the CPU): it passes here, and it does fail
when an implementation is wrong."""

import torch


def test_the_cpu_part_passes_and_covers_every_path(capsys):
    from rwkv_playground import selftest

    assert selftest.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and "checks passed" in out
    rows = selftest.run(["cpu"])
    kinds = {(r.check, r.dtype) for r in rows}
    steps = {(f"step {title}", dtype) for title in ("RWKV-4", "RWKV-5", "RWKV-6", "RWKV-7")
             for dtype in ("fp32", "bf16", "fp16")}
    assert {("wkv", "fp32"), ("wkv", "bf16"), ("wkv", "fp16"), ("wkv5", "fp32"), ("wkv7", "fp32"),
            ("sampler", "fp32")} | steps <= kinds
    for title in ("RWKV-4", "RWKV-5", "RWKV-6", "RWKV-7"):  # the fused step, per instruction set
        assert any(r.check == f"step {title}" and r.implementation.startswith("cpu (") for r in rows), title
    assert all(r.tokens_per_second for r in rows if r.check.startswith("step"))


def test_a_wrong_kernel_is_reported_and_fails_the_exit_status(monkeypatch, capsys):
    from rwkv_playground import selftest, wkv

    real = wkv.make_compiled_wkv

    def off_by_a_little(module):
        forward, train = real(module)

        def wrong(*args):
            y, aa, bb, pp = forward(*args)
            return y * 1.001, aa, bb, pp

        return wrong, train

    monkeypatch.setattr(wkv, "make_compiled_wkv", off_by_a_little)
    assert selftest.main(["--device", "cpu"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_json_output_for_bug_reports(capsys):
    import json

    from rwkv_playground import selftest

    assert selftest.main(["--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["machine"]["torch"] == torch.__version__ and all(row["ok"] for row in report["rows"])


def test_the_gpu_part_runs_where_there_is_a_gpu_and_says_so_where_not(capsys):
    from rwkv_playground import selftest

    if torch.cuda.is_available():
        assert selftest.main(["--device", "cuda"]) == 0
    else:
        assert selftest.main(["--device", "cuda"]) == 1
        assert "No NVIDIA GPU" in capsys.readouterr().err


def test_a_wrong_matrix_kernel_is_reported(monkeypatch, capsys):
    """The RWKV-7 recurrence of the CPU kernels made slightly wrong: its row says MISMATCH."""
    from rwkv_playground import selftest
    from rwkv_playground.kernels import load_kernel

    module = load_kernel("cpu")
    real = module.wkv7_forward

    def wrong(*args):
        y, state = real(*args)
        return y * 1.001, state

    monkeypatch.setattr(module, "wkv7_forward", wrong)
    rows = selftest.check_matrix_wkv(["cpu"])
    bad = [r for r in rows if not r.ok]
    assert [r.check for r in bad] == ["wkv7"] and all(r.ok for r in rows if r.check == "wkv5")
