"""The layout's promises, checked on the source: every architecture's differences live in
rwkv_playground/models/ (the rest asks the Architecture protocol), and each matrix recurrence's
one-token transition is written once (wkv.WKV5 / wkv.WKV7) and called by every consumer."""

import re
from pathlib import Path

from import_graph import cycles, import_graph

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
    consumers = {"inspector/matrix.py": ("transition", "effective_attention"),
                 "inspector/patching.py": ("decay_state", "write")}
    for name, calls in consumers.items():
        text = (PACKAGE / name).read_text(encoding="utf-8")
        for call in calls:
            assert call in text, (name, call)
    assert "0.606531" not in (PACKAGE / "inspector" / "matrix.py").read_text(encoding="utf-8")


# The layers, bottom up: a module imports only from its own layer or those below it.
LAYERS = [
    ("core", r"rwkv_playground(\.(errors|version|state|models(\..*)?|wkv|kernels|backends|quantization|runtime"
             r"|tokenizer|sampling|generation|chat_format|selftest))?"),
    ("serving", r"rwkv_playground\.serving(\..*)?"),
    ("documents and inspector", r"rwkv_playground\.(chat|blog|notebook|inspector(\..*)?)"),
    ("ui", r"rwkv_playground\.ui(\..*)?"),
    ("server", r"rwkv_playground\.server"),
]


def layer_of(module: str) -> int:
    for rank, (_, pattern) in enumerate(LAYERS):
        if re.fullmatch(pattern, module):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def test_no_import_circle_and_no_import_from_a_layer_above():
    graph = import_graph(ROOT)
    assert not cycles(graph), cycles(graph)
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
              for m, deps in sorted(graph.items()) for d in sorted(deps) if layer_of(d) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_the_graph_sees_what_it_checks(tmp_path):
    pkg = tmp_path / "rwkv_playground"
    (pkg / "ui").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "ui" / "__init__.py").write_text("")
    (pkg / "state.py").write_text("def f():\n    from .ui import x\n")  # an upward import, inside a function
    (pkg / "ui" / "x.py").write_text("from ..state import f\n")
    graph = import_graph(tmp_path)
    assert graph["rwkv_playground.state"] == {"rwkv_playground.ui.x"}
    assert cycles(graph) == [["rwkv_playground.state", "rwkv_playground.ui.x"]]
    assert layer_of("rwkv_playground.ui.x") > layer_of("rwkv_playground.state")


def test_the_old_module_names_are_the_new_modules():
    """Scripts written against the flat layout keep working (docs and README use these names)."""
    import importlib

    import rwkv_playground

    for old, new in rwkv_playground.MOVED_MODULES.items():
        assert importlib.import_module(f"rwkv_playground.{old}") is importlib.import_module(f"rwkv_playground.{new}")
    from rwkv_playground.inspection import InspectorSession, read_observed, record  # noqa: F401
    from rwkv_playground.matrix_inspection import record_matrix  # noqa: F401
    from rwkv_playground.patching import StatePart  # noqa: F401


def test_no_ui_handler_takes_more_than_eight_parameters():
    """The sampling controls are one component (ui.common.SamplingControls -> Sampling), and other
    groups of controls come as one object too (ControlGroup): no handler lists them one by one."""
    import importlib
    import inspect as inspect_module

    too_many = []
    for path in sorted((PACKAGE / "ui").glob("*.py")):
        module = importlib.import_module(f"rwkv_playground.ui.{path.stem}" if path.stem != "__init__" else
                                         "rwkv_playground.ui")
        functions = [f for _, f in inspect_module.getmembers(module, inspect_module.isfunction)
                     if f.__module__ == module.__name__]
        for _, cls in inspect_module.getmembers(module, inspect_module.isclass):
            if cls.__module__ == module.__name__:
                functions += [f for name, f in vars(cls).items() if inspect_module.isfunction(f)]
        for f in functions:
            if f.__name__.startswith(("on_", "api_")):
                names = [n for n in inspect_module.signature(f).parameters if n != "self"]
                if len(names) > 8:
                    too_many.append(f"{module.__name__}.{f.__qualname__}: {len(names)}")
    assert not too_many, too_many
    from rwkv_playground.ui.common import SAMPLING_NAMES, Sampling

    settings, max_tokens = Sampling(0.5, 0.9, 5, 0.1, 0.2, 0.99, 10 ** 9, 7).settings()
    assert (settings.temperature, settings.top_k, settings.seed, max_tokens) == (0.5, 5, 7, 8192)
    assert len(SAMPLING_NAMES) == 8 and Sampling(seed=-1).settings()[0].seed is None
