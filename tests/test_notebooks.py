"""The notebooks run headless from a fresh install, with small settings, and draw their figures.

Each notebook's first code cell (tagged `parameters`) holds its settings; like papermill, the
test adds a cell after it that overrides them, runs every cell with nbclient (any cell error
fails the test) and checks the PNGs the notebook wrote and what it printed.
"""

import re

import nbclient  # the [dev] extra: the README's setup installs it
import nbformat
import pytest

from tests.test_main import ROOT, TINY, run_cli, write_corpus

NOTEBOOKS = ROOT / "notebooks"


def execute(name: str, parameters: dict, monkeypatch, timeout: int = 900):
    """Runs notebooks/<name> with `parameters` injected; returns the executed notebook."""
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", [])]
    assert tagged, f"{name} has no cell tagged 'parameters'"
    assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), (
        f"{name} is stored with outputs"
    )
    source = "# injected by tests/test_notebooks.py\n" + "\n".join(
        f"{k} = {v!r}" for k, v in parameters.items()
    )
    book.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source))
    monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device in the kernel, as a user would have
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(
        book, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    return book


def printed(book) -> str:
    return "\n".join(
        out.get("text", "")
        for cell in book.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream"
    )


def images(book) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for cell in book.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two tiny trained workdirs under one root, like a sweep's."""
    root = tmp_path_factory.mktemp("nb")
    source = write_corpus(root / "corpus")
    runs = root / "runs"
    for lr in ("0.001", "0.003"):
        run_cli(
            TINY,
            "--config.train.steps=20",
            f"--config.optimizer.learning_rate={lr}",
            workdir=runs / f"learning_rate={lr}",
            source=source,
            data_dir=root / "data",
        )
    return runs


@pytest.mark.slow
def test_training_notebook_plots_every_run_of_a_sweep_root(tiny_runs, tmp_path, monkeypatch):
    figures = tmp_path / "figures"
    book = execute(
        "training.ipynb", {"RUNS": [str(tiny_runs)], "FIGURES": str(figures)}, monkeypatch
    )
    assert "2 run(s)" in printed(book)
    assert (figures / "curves.png").stat().st_size > 10_000
    assert images(book) >= 1
    table = [
        o["data"]["text/markdown"]
        for c in book.cells
        for o in c.get("outputs", [])
        if "text/markdown" in o.get("data", {})
    ]
    assert table and "learning_rate=0.001" in table[0] and "learning_rate=0.003" in table[0]


def test_icl_notebook_draws_the_saved_results(tmp_path, monkeypatch):
    figures = tmp_path / "figures"
    book = execute("in_context_learning.ipynb", {"FIGURES": str(figures)}, monkeypatch)
    for name in (
        "garg_error_vs_k",
        "induction_scores_two_layers",
        "in_context_two_layers",
        "induction_scores_one_layer",
        "in_context_one_layer",
        "fewshot",
    ):
        assert (figures / f"{name}.png").stat().st_size > 10_000, name
    assert images(book) >= 6
    text = printed(book)
    assert "normalised squared error" in text


@pytest.mark.slow
def test_attention_notebook_finds_an_induction_head_in_smollm2(tiny_runs, tmp_path, monkeypatch):
    figures = tmp_path / "figures"
    workdir = tiny_runs / "learning_rate=0.003"
    book = execute(
        "attention.ipynb",
        {
            "SPAN": 24,
            "PROBE_BATCH": 2,
            "SHAKESPEARE_WORKDIR": str(workdir),
            "TRAIN_IF_MISSING": "",
            "FIGURES": str(figures),
        },
        monkeypatch,
    )
    for name in (
        "prompt_head",
        "prompt_layer_heads",
        "induction_scores",
        "induction_head_pattern",
        "log_probs",
        "shakespeare_layer_heads",
        "shakespeare_induction_scores",
    ):
        assert (figures / f"{name}.png").stat().st_size > 5_000, name
    text = printed(book)
    found = re.search(r"strongest induction head: layer (\d+), head (\d+), score ([\d.]+)", text)
    assert found, text[-2000:]
    assert float(found.group(3)) > 0.5, found.group(0)
