"""Writes examples/quickstart.ipynb (no outputs; tests/test_notebook.py executes it).

Edit the cells here, then `python examples/make_quickstart.py`; the test checks the committed notebook
equals what this script writes."""
from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).with_name("quickstart.ipynb")

CELLS = [
    ("markdown", """\
# m2ib-bench quickstart

Explain three image-caption pairs with **M2IB** and two baselines, draw the maps and score them.
Everything runs offline on a CPU in well under a minute: the small CLIP of the embedded shapes benchmark
(`m2ib-shapes-vit`, 7 MB) ships with the package, and its data are generated on first use."""),
    ("code", """\
import matplotlib.pyplot as plt
import pandas as pd

import m2ib
from m2ib.core.errors import M2IBError

print("m2ib-bench", m2ib.__version__)
try:   # the bundled small CLIP, sha256-checked; any real open_clip model loads the same way
    adapter = m2ib.load_adapter("m2ib-shapes-vit", pretrained="embedded")
except M2IBError as err:   # e.g. a bundled file is missing: one line naming it and how to get it back
    raise SystemExit(err) from None"""),
    ("markdown", """\
## Three pairs
The first three pairs of the embedded benchmark's test split: generated shapes, a caption naming one
of them, and the true box of the named object."""),
    ("code", """\
from m2ib.data.registry import load_dataset

samples = load_dataset({"kind": "embedded", "split": "test", "limit": 3}, progress=False)
images, captions, ids = [s.image for s in samples], [s.caption for s in samples], [s.id for s in samples]
for s in samples:
    print(f"{s.id}: {s.caption!r}")"""),
    ("markdown", """\
## Explain
`m2ib.explain(adapter, images, captions, method)` takes file paths, PIL images or arrays. Each pair's
seed comes from its id and the run seed, the same rule the `m2ib-bench` command uses, so these maps
equal the ones a benchmark run computes for the same pairs."""),
    ("code", """\
methods = {"m2ib": {}, "gradcam": {}, "rise": {"n_masks": 200}}   # name -> hyperparameters (conf/method/*.yaml)
attributions = {name: m2ib.explain(adapter, images, captions, name, ids=ids, seed=0, **hparams)
                for name, hparams in methods.items()}
for name, att in attributions.items():
    print(f"{name:8s} image maps {tuple(att.image.shape)}, {att.seconds:.2f} s")"""),
    ("markdown", """\
## Draw
Every Attribution carries its pairs' original images and the model's input frame, so `att.plot(i)` draws
pair i's map over the ORIGINAL image (the resize and centre crop undone; what the model never saw is
hatched), the caption's words shaded by their scores, a colour bar and the method's hyperparameters.
`method_grid` puts pairs x methods side by side, the layout of Figure 1 of the M2IB paper."""),
    ("code", """\
from m2ib.core.figures import method_grid

attributions["m2ib"].plot(0, boxes=samples[0].boxes)      # boxes: x, y, w, h in original pixels
grid = method_grid(attributions)
plt.show()"""),
    ("markdown", """\
## Score
Metrics are registered functions (`m2ib.core.metric.METRICS`, one module each in `metrics/`):
localisation compares the map's top pixels with the true box (IoU, pointing game, box ratio) and the
caption's word scores with its target words; confidence re-scores the pair keeping only what the map
calls important. Three pairs make a demonstration, not a result: the tables in `results/` use hundreds."""),
    ("code", """\
from m2ib.core.metric import METRICS, MetricContext

tables = {}
for metric in ("localisation", "confidence"):
    spec = METRICS.get(metric)
    rows = pd.concat([spec.score(att, adapter, samples, MetricContext()) for att in attributions.values()])
    columns = [c for c in spec.columns if c in rows.columns]
    tables[metric] = rows.groupby(["method", "modality"])[columns].mean()
pd.concat(tables, axis=1).round(3)"""),
    ("markdown", """\
## Next
The same methods and metrics over the whole benchmark, as a versioned table:
`m2ib-bench experiment=table1 method=[m2ib,gradcam,rise]` (`m2ib-bench --help` lists every method, model,
data set and metric)."""),
]


def build() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    make = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    nb.cells = [make[kind](source) for kind, source in CELLS]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"          # stable ids: the committed file is reproducible byte for byte
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                   "language_info": {"name": "python"}}
    return nb


def text() -> str:
    return nbformat.writes(build()) + "\n"


if __name__ == "__main__":
    NOTEBOOK.write_text(text())
    print(f"wrote {NOTEBOOK}")
