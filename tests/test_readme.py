"""The README's words hold: its Python example runs as written, and the names it and the package
docstring use exist."""

import re
import subprocess
import sys

from conftest import ROOT


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(re.escape(marker) + r"\s*```(?:python|bash)\n(.*?)```", text, re.S)
    assert match, f"README.md has no code block after {marker}"
    return match.group(1)


def test_the_python_example_runs_as_written(tmp_path):
    code = readme_block("<!-- python-example -->")
    (tmp_path / "assets").symlink_to(ROOT / "assets")  # the example's relative paths
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([6, 256])" in out.stdout and "'stop_reason'" in out.stdout
    assert (tmp_path / "juliet.safetensors").exists()


def test_the_experiments_example_runs_as_written(tmp_path):
    code = readme_block("<!-- experiments-example -->")
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'knockout': 'L0 ch 0-255 @4 erase'" in out.stdout
    assert "plotly" in (tmp_path / "knockouts.html").read_text()
    assert (tmp_path / "knockouts.csv").read_text().startswith("knockout,position,token,kl")


def test_the_package_docstring_example_runs():
    import rwkv_playground

    first_line = next(line.strip() for line in rwkv_playground.__doc__.splitlines() if line.strip().startswith("from "))
    exec(first_line, {})  # the import line a reader copies


APP_FLAGS = ["--model", "--tokenizer", "--device", "--dtype", "--wkv", "--step", "--sampler", "--gemm", "--max-active",
             "--max-queue", "--session-memory-mb", "--session-ttl", "--undo-depth", "--lock-models", "--host", "--port",
             "--models-dir", "--share"]


def test_the_files_and_app_options_the_readme_names_exist():
    text = (ROOT / "README.md").read_text()
    for path in re.findall(r"`((?:rwkv_playground|kernels|tools|benchmarks|tests|docs)/[\w./-]+\.(?:py|cpp|cu|h|md))`",
                           text):
        assert (ROOT / path).exists(), path
    help_text = subprocess.run([sys.executable, str(ROOT / "app.py"), "--help"], capture_output=True, text=True,
                               cwd=ROOT).stdout
    for flag in APP_FLAGS:
        assert flag in text and flag in help_text, flag


def test_the_openai_example_and_curl_lines_run_against_the_app(app_url, tmp_path):
    """The README's API examples, as written, against the real app (only the port differs)."""
    import shutil

    code = readme_block("<!-- openai-example -->").replace("http://127.0.0.1:7860/", app_url)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    match = re.search(r"(\d+) of (\d+) prompt tokens came from the kept state", out.stdout)
    assert match and 0 < int(match.group(1)) < int(match.group(2)), out.stdout
    assert "(length)" in out.stdout or "(stop)" in out.stdout
    assert shutil.which("curl"), "curl runs the README's curl lines (.ci/run installs it)"
    lines = readme_block("<!-- curl-example -->").replace("http://127.0.0.1:7860/", app_url)
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", lines], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert '"status":"ok"' in out.stdout and '"chat.completion"' in out.stdout and "data: [DONE]" in out.stdout
    assert "rwkv_generated_tokens_total" in out.stdout


def test_the_patching_example_runs_as_written(tmp_path):
    code = readme_block("<!-- patching-example -->")
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "answer '?'" in out.stdout and "layer 1" in out.stdout
    assert "plotly" in (tmp_path / "sweep.html").read_text()
    assert (tmp_path / "sweep.csv").read_text().startswith("part,position,token,log_prob_answer,recovery")
