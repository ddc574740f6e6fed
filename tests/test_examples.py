"""examples/playground.ipynb runs as written in a real Jupyter kernel (nbclient), so it never rots:
every cell executes without error, the figures come out as inline plotly output, the text cells
print what they promise, and the app launched inline answers on loopback."""

import json
import os

import nbformat
from nbclient import NotebookClient

from conftest import ROOT

NOTEBOOK = ROOT / "examples" / "playground.ipynb"


def test_the_jupyter_example_runs_and_shows_its_figures_inline():

    nb = nbformat.read(NOTEBOOK, as_version=4)
    env_before = dict(os.environ)
    os.environ.update({"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"})
    try:  # in examples/, where Jupyter starts a kernel for this file
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    text = {i: "".join(o.get("text", "") + json.dumps(o.get("data", {}).get("text/plain", ""))
                       for o in c.outputs) for i, c in enumerate(code)}
    assert "tokens/s" in text[1]
    assert text[2].count("JULIET: ") == 2 and "history tokens reused" in text[2]
    figures = [i for i, c in enumerate(code) if any("application/vnd.plotly.v1+json" in o.get("data", {})
                                                    for o in c.outputs)]
    assert figures == [3, 4, 5], figures  # half-life, effective attention, knock-outs: inline plotly
    assert "Ran cells 1-4" in text[6] and "Ran cells 3-4" in text[6] and "not read again" in text[6]
    assert "http://127.0.0.1:" in text[7]
