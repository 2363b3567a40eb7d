"""`launch.py gen` + `launch.py run` end to end in a subprocess, and `train.py CONFIG` on the
same engine, over a tiny saved model and the ARC-Easy fixture rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mlora.cli import main as launch_main
from mlora.cli import train_main
from tests.train.helpers import FIXTURES, metrics, weights

REPO = Path(__file__).resolve().parents[2]


def test_gen_then_launch_run_end_to_end(base_model, tmp_path, capsys):
    config = tmp_path / "mlora.json"
    assert launch_main(["gen", "--template", "lora", "--tasks", "arc-e", "--data_path", str(FIXTURES / "arc-e"),
                        "--file_name", str(config), "--r", "4", "--lora_alpha", "8", "--batch_size", "4",
                        "--micro_batch_size", "2", "--num_epochs", "1"]) == 0
    name = json.loads(config.read_text())["lora"][0]["name"]
    capsys.readouterr()

    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "launch.py", "run", "--config", str(config), "--base_model", base_model,
                           "--output_dir", str(out), "--seed", "3"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    folder = out / name
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 4
    assert adapter_config["base_model_name_or_path"] == base_model
    assert json.loads((folder / "mlora_training.json").read_text())["seed"] == 3
    records = metrics(out, name)
    assert [r["step"] for r in records] == [1, 2, 3]  # 12 fixture rows, batch 4, one epoch
    assert "12 examples, 0 truncated" in proc.stderr  # truncation count in the log
    assert str(folder) in proc.stdout and "metrics:" in proc.stdout
    assert not (out / "_mlora" / "checkpoints").exists()

    # train.py runs the same engine: same config, same seed, same weights.
    assert train_main([str(config), "--base_model", base_model, "--output_dir", str(tmp_path / "again"),
                       "--seed", "3"]) == 0
    again = weights(tmp_path / "again" / name)
    for key, value in weights(folder).items():
        torch.testing.assert_close(again[key], value, rtol=1e-5, atol=1e-7)
