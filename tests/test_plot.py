"""Charts of a run folder (mlora.plot): accuracy per configuration and loss curves as PNG written
through the run folder, `launch.py plot OUTPUT_DIR`, and the one-line answers without matplotlib
or with a file of the user's in the way."""

from __future__ import annotations

import json
import sys

import pytest

from mlora import plot
from mlora.cli import main
from mlora.evaluate import RESULTS_STEM, save_results
from mlora.evaluate.replicas import group_replicas
from mlora.run_folder import open_run_folder
from tests.test_replicas import made_up_results, sweep_config

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def run_folder(tmp_path):
    """An output folder as a sweep's run leaves it: results of 8 replicas and their metrics logs."""
    cfg = sweep_config()
    results = made_up_results([*cfg.adapter_names, "base"])
    results.configurations = group_replicas(cfg.lora)
    with open_run_folder(tmp_path) as folder:
        for path in save_results(results, folder.meta):
            folder.created(path)
        folder.logs.mkdir(parents=True)
        for i, name in enumerate(cfg.adapter_names):
            lines = [json.dumps({"step": s, "loss": 3.0 / (s + i), "lr": 1e-4}) for s in range(1, 6)]
            lines.insert(2, json.dumps({"step": 2, "event": "nan_loss"}))
            (folder.logs / f"{name}.jsonl").write_text("\n".join(lines) + "\n{\"step\": 6, \"lo")  # a cut line
    return tmp_path


def no_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError


def test_both_charts_are_drawn_into_the_run_folder(run_folder):
    with open_run_folder(run_folder) as folder:
        curves = plot.read_loss_curves(folder.logs, ["lora_r4_s0", "missing"])
        assert curves == {"lora_r4_s0": [(s, 3.0 / s) for s in range(1, 6)]}  # events and cut lines left out
        doc = json.loads((folder.meta / "eval_results.json").read_text())
        written = plot.draw_charts(folder, results=doc, adapters=sweep_config().adapter_names)
        assert written == [folder.meta / "eval_results.png", folder.meta / "loss_curves.png"]
        for path in written:
            assert path.read_bytes().startswith(PNG) and folder.owns(path)
        # Replicas share a colour in the loss chart: the configurations of the results.
        assert plot.groups_of(doc, ["mix_s1", "mix_s0", "other"]) == [("mix", ["mix_s0", "mix_s1"]),
                                                                      ("other", ["other"])]


def test_plot_command_redraws_from_the_files(run_folder, capsys):
    assert main(["plot", str(run_folder)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [f"wrote {run_folder / '_mlora' / 'eval_results.png'}",
                                f"wrote {run_folder / '_mlora' / 'loss_curves.png'}"]
    before = (run_folder / "_mlora" / "loss_curves.png").stat().st_mtime_ns
    assert main(["plot", str(run_folder)]) == 0  # ours: replaced
    assert (run_folder / "_mlora" / "loss_curves.png").stat().st_mtime_ns >= before
    assert plot.RESULTS_STEM == RESULTS_STEM


def test_plot_command_errors_are_one_line(run_folder, tmp_path_factory, capsys, monkeypatch):
    empty = tmp_path_factory.mktemp("empty")
    assert main(["plot", str(empty)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["plot", str(run_folder), "--results", "eval_results_limit5"]) == 2
    assert "no results" in capsys.readouterr().err

    # A file of the user's where a chart goes is never replaced.
    mine = run_folder / "_mlora" / "loss_curves.png"
    mine.write_bytes(b"my own picture")
    assert main(["plot", str(run_folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was not written by mlora" in err and mine.read_bytes() == b"my own picture"
    with open_run_folder(run_folder) as folder:
        said = []
        assert plot.draw_charts_or_say_why(folder, said.append, results=None, adapters=["lora_r4_s0"]) == []
        assert len(said) == 1 and said[0].startswith("charts skipped:")

    no_matplotlib(monkeypatch)
    assert main(["plot", str(run_folder)]) == 2
    err = capsys.readouterr().err
    assert err == 'error: charts need matplotlib, which is not installed; pip install "mlora[plot]" to draw them\n'
    with open_run_folder(run_folder) as folder:
        said = []
        assert plot.draw_charts_or_say_why(folder, said.append, results=None, adapters=["lora_r4_s0"]) == []
        assert said == [('charts skipped: charts need matplotlib, which is not installed; pip install "mlora[plot]" '
                         "to draw them")]
