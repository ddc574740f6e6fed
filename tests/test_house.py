"""The layout's promises, checked on the source: every architecture's differences live in
rwkv_playground/models/ (the rest asks the Architecture protocol), and each matrix recurrence's
one-token transition is written once (wkv.WKV5 / wkv.WKV7) and called by every consumer."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rwkv_playground"

VERSION_TEST = re.compile(r"""["']rwkv[4-7]["']|recurrence\s*[!=]=|\(\s*["']rwkv5["']\s*,""")


def sources_outside_models():
    for path in sorted(PACKAGE.rglob("*.py")):
        if PACKAGE / "models" not in path.parents:
            yield path
    yield ROOT / "app.py"


def test_no_architecture_name_is_tested_outside_models():
    hits = []
    for path in sources_outside_models():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if VERSION_TEST.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "architecture names tested outside models/ (ask the Architecture protocol):\n" + "\n".join(hits)


def test_the_grep_catches_what_it_is_for():
    for line in ('if arch == "rwkv7":', "x in ('rwkv5', 'rwkv6')", 'if arch.recurrence == "matrix":'):
        assert VERSION_TEST.search(line), line
    assert not VERSION_TEST.search('title = "RWKV-7"')


def test_the_matrix_transition_is_written_once():
    """The decay of a matrix state (w times the key index, RWKV-7's removal) appears in wkv.py's
    recurrence classes only; the inspector and patching call them."""
    pattern = re.compile(r"kk\s*\*\s*a\b|\(kk\[m\]\s*\*|np\.outer\(S @ kk")
    for path in sources_outside_models():
        if path.name == "wkv.py":
            continue
        text = path.read_text(encoding="utf-8")
        assert not pattern.search(text), f"{path.relative_to(ROOT)} writes RWKV-7's transition again"
    consumers = {"matrix_inspection.py": ("transition", "effective_attention"), "patching.py": ("decay_state", "write")}
    for name, calls in consumers.items():
        text = (PACKAGE / name).read_text(encoding="utf-8")
        for call in calls:
            assert call in text, (name, call)
    assert "0.606531" not in (PACKAGE / "matrix_inspection.py").read_text(encoding="utf-8")
