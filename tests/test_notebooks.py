"""The notebooks in notebooks/ run end to end (nbclient, a kernel on this interpreter) and are stored clean.

Each notebook runs in a fresh kernel with cwd = the repo root, the demo model built in a temporary
directory, and PYTHONPATH pointing at this checkout (so an editable install is not required). The
kernel is this test's `sys.executable` through a kernelspec written to a temporary directory: no
user-level `ipykernel install` is needed, and no other Python can be picked up by name.
"""

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from llava_next_jax import anyres
from llava_next_jax.processor import LlavaNextProcessor

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL_NAME = "llava-next-jax-test"
RELEASED = anyres.Geometry(336, 14, ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)), 576)


def test_expected_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} >= {"quickstart.ipynb", "anyres_explainer.ipynb", "finetune.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {i} has stored outputs: clear them before saving"
            assert cell.execution_count is None, f"{path.name} cell {i} has an execution count"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """Environment + kernelspec for the notebook kernels (set in os.environ, which the kernel inherits)."""
    tmp = tmp_path_factory.mktemp("notebooks")
    spec_dir = tmp / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "llava_next_jax tests", "language": "python"}))
    env = {
        "LLAVA_NEXT_JAX_DEMO_DIR": str(tmp / "demo"),   # built once, shared by the notebooks
        "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        "MPLBACKEND": "Agg",
        "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
        "IPYTHONDIR": str(tmp / "ipython"),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield {"kernel_dirs": [str(tmp / "kernels")], "demo_dir": tmp / "demo"}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def run_notebook(path: Path, kernel_env) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    km = AsyncKernelManager(kernel_name=KERNEL_NAME,
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_env["kernel_dirs"]))
    client = NotebookClient(nb, km=km, timeout=120, allow_errors=False,
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()   # raises CellExecutionError on the first failing cell
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"{path.name} cell {i}: {out.get('ename')}: {out.get('evalue')}"
    return nb


def cell_text(nb, tag: str) -> str:
    """stdout + text/plain of the code cell tagged `tag`."""
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    parts = []
    for out in cells[0].outputs:
        if out.output_type == "stream" and out.name == "stdout":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def images_shown(nb) -> int:
    return sum("image/png" in out.get("data", {}) for c in nb.cells if c.cell_type == "code" for out in c.outputs)


def test_quickstart(kernel_env):
    nb = run_notebook(ROOT / "notebooks" / "quickstart.ipynb", kernel_env)
    processor = LlavaNextProcessor.from_pretrained(kernel_env["demo_dir"])   # the demo model the notebook built
    geometry = processor.geometry

    single = cell_text(nb, "single-inputs")
    m = re.search(r"image tokens: (\d+) for image size \(h, w\) = \((\d+), (\d+)\)", single)
    assert m, single
    assert (int(m[2]), int(m[3])) == (600, 800)
    assert int(m[1]) == anyres.num_image_tokens((600, 800), geometry)

    caption = cell_text(nb, "single-caption")
    assert re.search(r"^\(1, 16\)$", caption, re.M), caption
    assert "caption (random weights, meaningless): '" in caption

    batch = cell_text(nb, "batch")
    rows = re.findall(r"(\S+\.(?:jpg|png)) +\(h, w\) = \((\d+), (\d+)\)  image tokens (\d+)", batch)
    assert len(rows) == 4, batch
    for _, h, w, n in rows:
        assert int(n) == anyres.num_image_tokens((int(h), int(w)), geometry)
    assert len({n for *_, n in rows}) > 1        # mixed sizes: different token counts in one batch
    captions = re.findall(r"^\S+\.(?:jpg|png) +'.*'$", batch, re.M)
    assert len(captions) == 4, batch

    one_call = dict(re.findall(r"^(\S+\.(?:jpg|png)) -> '(.*)'$", cell_text(nb, "one-call-api"), re.M))
    by_hand = {name: text.strip() for name, text in re.findall(r"^(\S+\.(?:jpg|png)) +'(.*)'$", batch, re.M)}
    assert one_call == by_hand and len(one_call) == 4, (one_call, by_hand)

    second = cell_text(nb, "second-turn")
    assert "[/INST]" in second and "What colours are in it?" in second and "answer (random weights" in second
    assert second.count("[INST]") == 2, second

    logits = cell_text(nb, "logits")
    ids_shape = re.search(r"input_ids \((\d+), (\d+)\)", logits)
    logits_shape = re.search(r"logits \((\d+), (\d+), (\d+)\) float32", logits)
    vocab = json.loads((kernel_env["demo_dir"] / "config.json").read_text())["text_config"]["vocab_size"]
    assert ids_shape and logits_shape, logits
    assert (int(logits_shape[1]), int(logits_shape[2])) == (int(ids_shape[1]), int(ids_shape[2]))
    assert int(logits_shape[3]) == vocab


def test_anyres_explainer(kernel_env):
    nb = run_notebook(ROOT / "notebooks" / "anyres_explainer.ipynb", kernel_env)

    best = cell_text(nb, "best-resolution")
    rows, cols = anyres.grid_shape((480, 640), RELEASED)
    assert (f"best resolution {anyres.select_best_resolution((480, 640), RELEASED.pinpoints)} -> grid {rows}x{cols} "
            f"-> {anyres.num_tiles((480, 640), RELEASED)} tiles") in best, best

    tiles = cell_text(nb, "tiles")
    assert f"pixel_values (1, {1 + rows * cols}, 3, 336, 336)" in tiles, tiles

    unpad = cell_text(nb, "unpad")
    r0, r1, c0, c1 = anyres.unpad_window((480, 640), rows * 24, cols * 24)
    assert f"keep rows [{r0}, {r1}) and columns [{c0}, {c1})" in unpad, unpad

    budget = cell_text(nb, "token-budget")
    table = {(int(h), int(w)): (int(gr), int(gc), int(uh), int(uw), int(t)) for h, w, gr, gc, uh, uw, t in re.findall(
        r"(\d+) x (\d+) +\(\d+, \d+\) +(\d+)x(\d+) +(\d+)x(\d+) +tokens (\d+)", budget)}
    assert len(table) >= 10 and (480, 640) in table, budget
    assert table[(480, 640)][-1] == 2340                       # the worked example of anyres.py's docstring
    for size, (gr, gc, uh, uw, tokens) in table.items():
        assert (gr, gc) == anyres.grid_shape(size, RELEASED), size
        assert (uh, uw) == anyres.unpadded_shape(size, RELEASED), size
        assert tokens == anyres.num_image_tokens(size, RELEASED), size

    assert images_shown(nb) >= 4                              # tiles, canvas, feature map, budget plot


def test_finetune(kernel_env):
    nb = run_notebook(ROOT / "notebooks" / "finetune.ipynb", kernel_env)

    dataset = cell_text(nb, "dataset")
    assert re.search(r"3 rows, 1 skipped", dataset), dataset
    assert re.search(r"skipped: line 4: image 'not_there.jpg' not found", dataset), dataset

    results = re.findall(r"^\S+: taught '(.*)', generated '(.*)'$", cell_text(nb, "captions"), re.M)
    assert len(results) == 3, cell_text(nb, "captions")
    assert all(generated == caption for caption, generated in results), results   # it learned them

    labels = cell_text(nb, "labels")
    trained = re.findall(r"^row \d: (\d+) tokens \((\d+) image tokens\), trained on '(.*)'$", labels, re.M)
    assert sorted(t for *_, t in trained) == sorted(c + "</s>" for c, _ in results), labels   # only the answers

    losses = [float(x) for x in re.findall(r"^step +\d+  loss ([\d.]+)$", cell_text(nb, "train"), re.M)]
    assert len(losses) >= 5 and losses[-1] < 0.1 * losses[0], losses
    assert "same tokens: True" in cell_text(nb, "reload")
    assert images_shown(nb) >= 1                                # the loss curve
