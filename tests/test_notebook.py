"""examples/quickstart.ipynb: committed without outputs, equal to what examples/make_quickstart.py
writes, runs top to bottom in a fresh kernel (draws a figure, prints a score table), and without its
bundled checkpoint stops at the first cell with one line naming the file and how to get it back."""
import importlib.util
import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def generator():
    spec = importlib.util.spec_from_file_location("make_quickstart", ROOT / "examples" / "make_quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def execute(nb, **kwargs):
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}},
                   **kwargs).execute()
    return nb


def test_the_committed_notebook_is_generated_and_has_no_outputs():
    assert NOTEBOOK.read_text() == generator().text(), "re-run python examples/make_quickstart.py"
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c["cell_type"] == "code")


def test_the_notebook_runs_draws_and_scores_and_names_a_missing_checkpoint():
    """One kernel (each start costs seconds): the first code cell with the checkpoint check pointed at a
    file that does not exist (the real check and message), then the whole notebook as committed."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = nbformat.from_dict(next(c for c in nb.cells if c.cell_type == "code"))
    hide = nbformat.v4.new_code_cell(
        "import m2ib.models.embedded as e, pathlib\n"
        "real = e.verify_checkpoint.__defaults__\n"
        "e.verify_checkpoint.__defaults__ = (pathlib.Path('/nonexistent/m2ib-shapes-vit.pt'),)")
    restore = nbformat.v4.new_code_cell("e.verify_checkpoint.__defaults__ = real")
    cells = list(nb.cells)
    nb.cells = [hide, first, restore] + cells
    execute(nb, allow_errors=True)

    errors = [o for o in first.outputs if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "SystemExit", first.outputs
    message = errors[0].evalue
    assert "\n" not in message
    assert "m2ib-shapes-vit.pt is missing" in message and "restore it with" in message, message

    outputs = [o for c in cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)              # the figure
    table = cells[-2].outputs[-1]["data"]["text/plain"]                        # the score table
    for name in ("m2ib", "gradcam", "rise", "iou", "drop"):
        assert name in table, table
