"""`mlora.gen.generate_config`, the library behind `launch.py gen` (the CLI only parses flags and
writes the file; tests/test_cli_gen.py covers the command)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlora.config import ConfigError, to_dict
from mlora.gen import GenError, generate_config

REPO = Path(__file__).resolve().parent.parent


def test_library_and_command_write_the_same_config(tmp_path):
    cfg = generate_config("mixlora", ["arc-e", "boolq"], multi_task=True, adapter_name="mix",
                          adapter_overrides={"r": 4, "lr": 1e-3}, run_overrides={"cutoff_len": 128})
    subprocess.run([sys.executable, str(REPO / "launch.py"), "gen", "--template", "mixlora", "--tasks", "arc-e;boolq",
                    "--multi_task", "True", "--adapter_name", "mix", "--r", "4", "--lr", "1e-3", "--cutoff_len",
                    "128"], cwd=tmp_path, check=True, capture_output=True)
    assert json.loads((tmp_path / "mlora.json").read_text()) == to_dict(cfg)
    (a,) = cfg.lora
    assert (a.name, a.task_name, a.r, a.lr, cfg.cutoff_len) == ("mix_0", "arc-e;boolq", 4, 1e-3, 128)


def test_appending_keeps_the_base_and_continues_the_numbering():
    first = generate_config("lora", ["arc-e"], run_overrides={"cutoff_len": 64})
    both = generate_config("mixlora", ["arc-e", "piqa"], base=first)
    assert [a.name for a in both.lora] == ["arc_e_0", "arc_e_1", "piqa_2"]
    assert both.cutoff_len == 64 and not first.lora[0].is_moe and both.lora[1].is_moe


def test_bad_templates_tasks_and_values_raise_before_anything_is_written():
    with pytest.raises(GenError, match="unknown template 'mixlor'; did you mean mixlora"):
        generate_config("mixlor", ["arc-e"])
    with pytest.raises(GenError, match="unknown task 'arc_e'"):
        generate_config("lora", ["arc_e"])
    with pytest.raises(GenError, match="1 path"):
        generate_config("lora", ["arc-e", "boolq"], data_paths=["x.json"])
    with pytest.raises(ConfigError, match="warmup"):
        generate_config("lora", ["arc-e"], adapter_overrides={"warmup_steps": 10})
