"""Problems found before training starts: clear errors, nothing trained or written, and
through the CLI exit status 2 without a traceback."""

from __future__ import annotations

import json
import re

import pytest

from mlora.cli import main as launch_main
from mlora.config import to_dict
from mlora.data import DataError
from mlora.model.adapted import AdapterError
from mlora.model.loading import ModelLoadError
from mlora.train import TrainError
from tests.train.helpers import FIXTURES, adapter, run_config, train


def case(kind: str, tmp_path, base_model: str, pairs_file: str):
    """(config, base model) that fail in the given way."""
    if kind == "missing data file":
        return run_config([adapter("x", str(tmp_path / "nowhere" / "data.json"))]), base_model
    if kind == "empty dataset":
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        return run_config([adapter("x", str(empty))]), base_model
    if kind == "base model not found":
        return run_config([adapter("x", pairs_file)]), str(tmp_path / "no-such-model")
    if kind == "missing target module":
        return run_config([adapter("x", pairs_file, target_modules=["q_proj", "query_key_value"])]), base_model
    if kind == "rank above the layer width":
        return run_config([adapter("x", pairs_file, r=1_000_000)]), base_model
    if kind == "expert rank above the layer width":
        return run_config([adapter("x", pairs_file, routing_strategy="mixlora", num_experts=2, top_k=1,
                                   expert_lora={"r": 500})]), base_model
    if kind == "benchmark file without an evaluation split":
        return run_config([adapter("x", str(FIXTURES / "arc-e" / "train.jsonl"), task_name="arc-e")]), base_model
    if kind == "latin-1 data file":
        path = tmp_path / "latin.json"
        path.write_bytes(json.dumps([{"instruction": "caf\u00e9", "output": "ol\u00e9"}]).encode()
                         .replace(b"\\u00e9", "\u00e9".encode("latin-1")))
        return run_config([adapter("x", str(path))]), base_model
    raise ValueError(kind)


CASES = {
    "missing data file": (DataError, "does not exist"),
    "empty dataset": (TrainError, "holds no examples"),
    "base model not found": (ModelLoadError, "does not exist"),
    "missing target module": (AdapterError, "query_key_value"),
    "rank above the layer width": (AdapterError, r"r = 1000000 exceeds the width of q_proj \(32x32\).*lower r"),
    "expert rank above the layer width": (AdapterError, r"expert_lora.r = 500 exceeds the width of up_proj"),
    "benchmark file without an evaluation split": (DataError, "test"),
    "latin-1 data file": (DataError, r"latin\.json: not UTF-8 text \(byte 0xe9"),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_errors_before_training(kind, base_model, pairs_file, tmp_path):
    cfg, base = case(kind, tmp_path, base_model, pairs_file)
    error, text = CASES[kind]
    with pytest.raises(error, match=text):
        train(cfg, base, tmp_path / "out")
    assert not (tmp_path / "out" / "_mlora" / "logs").exists() and not (tmp_path / "out" / "x").exists()


def test_evaluate_steps_needs_an_evaluation_split_before_training(base_model, tmp_path):
    train_only = str(FIXTURES / "arc-e" / "train.jsonl")  # a file holds one split: no test items
    cfg = run_config([adapter("x", train_only, task_name="arc-e", evaluate_steps=2)])
    with pytest.raises(DataError, match="test"):
        train(cfg, base_model, tmp_path / "out")
    assert not (tmp_path / "out" / "_mlora" / "logs").exists()


def test_data_is_checked_before_the_model_loads(tmp_path):
    cfg = run_config([adapter("x", str(tmp_path / "missing.json"))])
    with pytest.raises(DataError):  # not ModelLoadError: the data is read first, cheaply
        train(cfg, str(tmp_path / "no-such-model"), tmp_path / "out")


@pytest.mark.parametrize("kind", list(CASES))
def test_cli_reports_errors_with_status_2_and_no_traceback(kind, base_model, pairs_file, tmp_path, capsys):
    cfg, base = case(kind, tmp_path, base_model, pairs_file)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(to_dict(cfg)))
    status = launch_main(["run", "--config", str(path), "--base_model", base, "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(CASES[kind][1], errors[0])  # one line says it all
    assert "Traceback" not in err


def test_cli_refuses_to_overwrite_a_finished_adapter(base_model, pairs_file, tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(to_dict(run_config([adapter("x", pairs_file, num_epochs=1)]))))
    argv = ["run", "--config", str(path), "--base_model", base_model, "--output_dir", str(tmp_path / "out")]
    assert launch_main(argv) == 0
    before = (tmp_path / "out" / "x" / "adapter_model.safetensors").read_bytes()
    capsys.readouterr()
    status = launch_main(argv)
    assert status == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "out" / "x" / "adapter_model.safetensors").read_bytes() == before
