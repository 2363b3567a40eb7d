"""Smoke test of the evaluation-throughput harness (bench/eval_throughput.py): structure only,
never timings, on a tiny saved model (the scorers in this process, to keep it quick)."""

import json

import pytest

from bench import eval_throughput as bench
from tests.tiny import save_tiny, tiny_model, word_tokenizer


def test_every_scorer_reports_and_agrees(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    folder = save_tiny(tiny_model(), word_tokenizer(), tmp_path / "tiny")
    out = tmp_path / "eval.json"
    status = bench.main(["--model", folder, "--items", "6", "--warmup", "2", "--threads", "1", "--batch-size", "4",
                         "--no-isolate", "--json", str(out)])
    assert status == 0, capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert [r["scorer"] for r in doc["results"]] == list(bench.SCORERS)
    for r in doc["results"]:
        assert r["items_per_s"] > 0 and len(r["scores"]) == 6 and all(len(s) == 4 for s in r["scores"])
        # The same requests scored three ways: mlora shared, mlora plain, lm-eval's HF backend.
        assert r["max_abs_dll_vs_plain"] < 1e-4
    assert "items/s" in capsys.readouterr().out


def test_items_are_arc_rows(tmp_path):
    from mlora.data import load_items

    items = load_items("arc-e", "eval", bench.write_items(tmp_path, 5, 3, seed=1))
    assert len(items) == 5 and all(len(item.labels) == 3 for item in items)
    assert items[0].loglikelihood.contexts[0].startswith("Question: ")
