"""A sweep end to end: `gen` with comma lists and --seeds, one `run` over the shared base, the
grouped table, every replica in the JSON, the charts (skipped in one line without matplotlib),
and `launch.py plot` drawing them afterwards."""

from __future__ import annotations

import json
import sys

from mlora.cli import main
from tests.train.helpers import FIXTURES


def test_gen_sweep_then_run_prints_the_grouped_table(base_model, tmp_path, capsys, monkeypatch):
    config, out = tmp_path / "mlora.json", tmp_path / "out"
    assert main(["gen", "--template", "lora", "--tasks", "arc-e", "--data_path", str(FIXTURES / "arc-e"),
                 "--file_name", str(config), "--adapter_name", "lora", "--r", "2,4", "--seeds", "2",
                 "--lora_alpha", "8", "--batch_size", "4", "--micro_batch_size", "2", "--num_epochs", "1",
                 "--lr", "1e-2", "--cutoff_len", "128", "--train_lora_candidate_num", "4",
                 "--train_lora_simultaneously_num", "4"]) == 0
    names = ["lora_r2_s0", "lora_r2_s1", "lora_r4_s0", "lora_r4_s1"]
    assert [a["name"] for a in json.loads(config.read_text())["lora"]] == names
    capsys.readouterr()

    # Without matplotlib the run still prints its table; one line says how to get the charts.
    with monkeypatch.context() as patch:
        for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
            patch.delitem(sys.modules, name)
        patch.setitem(sys.modules, "matplotlib", None)
        assert main(["run", "--config", str(config), "--base_model", base_model, "--output_dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("configuration"))
    assert lines[header].split() == ["configuration", "n", "metric", "arc-e", "avg"]
    assert [line.split()[:3] for line in lines[header + 1:header + 3]] == [["lora_r2", "2", "acc"], ["lora_r4", "2", "acc"]]
    assert any(line.startswith("best LoRA: ") for line in lines)
    assert 'charts skipped: charts need matplotlib, which is not installed; pip install "mlora[plot]"' in stdout
    assert not (out / "_mlora" / "eval_results.png").exists()

    doc = json.loads((out / "_mlora" / "eval_results.json").read_text())
    assert [r["adapter"] for r in doc["results"]] == names  # every replica
    assert [(c["configuration"], c["adapters"], c["seeds"]) for c in doc["configurations"]] == [
        ("lora_r2", names[:2], [0, 1]), ("lora_r4", names[2:], [0, 1])]
    for name, seed in zip(names, [0, 1, 0, 1]):
        assert json.loads((out / name / "mlora_training.json").read_text())["adapter_seed"] == seed

    assert main(["plot", str(out)]) == 0
    for chart in ("eval_results.png", "loss_curves.png"):
        assert (out / "_mlora" / chart).read_bytes().startswith(b"\x89PNG")
