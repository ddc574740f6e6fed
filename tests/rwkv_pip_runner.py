"""Runs checkpoints through the `rwkv` pip package (0.8.32, cpu fp32) in a process of its own and
writes what it computed to safetensors files, for tests/test_matrix_models.py.

A separate process because the package chooses at import time between its RWKV-4/5/6 class and its
RWKV-7 class (RWKV_V7_ON=1 rebinds `rwkv.model.RWKV`): one process holds one of them.

    RWKV_V7_ON=0|1 python tests/rwkv_pip_runner.py jobs.json
jobs.json: [{"path": ..., "tokens": [...], "rnn_tokens": n, "out": ...}, ...]
Each out file: "seq_logits" [T, V], "seq_state.{i}" (the package's state list, in order),
"rnn_logits" [n, V] (token by token), "rnn_state.{i}".
"""

import json
import os
import sys

os.environ.setdefault("RWKV_JIT_ON", "1")
os.environ["RWKV_CUDA_ON"] = "0"

import torch  # noqa: E402
from rwkv.model import RWKV  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def main(job_file: str) -> None:
    v7 = os.environ.get("RWKV_V7_ON") == "1"
    for job in json.load(open(job_file)):
        path = job["path"]
        # the v7 class appends ".pth" itself
        model = RWKV(path[:-4] if v7 else path, strategy="cpu fp32", **({} if v7 else {"verbose": False}))
        tokens = job["tokens"]
        seq_logits, seq_state = model.forward(tokens, None, full_output=True)
        rnn_logits, state = [], None
        for t in tokens[: job["rnn_tokens"]]:
            out, state = model.forward([t], state)
            rnn_logits.append(out.clone())
        out = {"seq_logits": seq_logits.float().contiguous(), "rnn_logits": torch.stack(rnn_logits).contiguous()}
        out.update({f"seq_state.{i}": s.float().contiguous() for i, s in enumerate(seq_state)})
        out.update({f"rnn_state.{i}": s.float().contiguous() for i, s in enumerate(state)})
        save_file(out, job["out"])


if __name__ == "__main__":
    main(sys.argv[1])
