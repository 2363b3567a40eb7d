"""The grouped result table: replicas of one configuration (configs equal but for name and seed)
reported as mean ± sample standard deviation over seeds, the best configuration per method, and
every replica kept in the JSON. Reference values are computed here from the JSON's replica rows
with the statistics module, not by the code under test."""

from __future__ import annotations

import json
import statistics

import pytest

from mlora.config import config_from_dict, to_dict
from mlora.evaluate import EvalResults, TaskResult, format_table, save_results
from mlora.evaluate.replicas import group_replicas
from mlora.gen import generate_config

TASKS = ("arc-e", "boolq")


def sweep_config():
    """LoRA r in {4, 8} x 3 seeds, MixLoRA x 2 seeds: three configurations, eight adapters."""
    lora = generate_config("lora", list(TASKS), multi_task=True, adapter_name="lora", grid={"r": [4, 8]},
                           seeds=[0, 1, 2])
    return generate_config("mixlora", list(TASKS), multi_task=True, adapter_name="mix", seeds=[0, 1], base=lora)


def made_up_results(names, items=8) -> EvalResults:
    """Each adapter answers a different number of items right on each task (2-choice items)."""
    tasks = []
    for i, name in enumerate(names):
        for j, task in enumerate(TASKS):
            correct = (3 * i + 5 * j + i * j) % (items + 1)
            scores = [[0.0, -1.0]] * correct + [[-1.0, 0.0]] * (items - correct)
            tasks.append(TaskResult(name, task, "choice", "test", [0] * items, scores))
    return EvalResults(tasks, model="tiny")


def test_grid_replicas_group_into_configurations():
    groups = group_replicas(sweep_config().lora)
    assert [(g.label, g.method, g.adapters, g.seeds) for g in groups] == [
        ("lora_r4", "LoRA", ("lora_r4_s0", "lora_r4_s1", "lora_r4_s2"), (0, 1, 2)),
        ("lora_r8", "LoRA", ("lora_r8_s0", "lora_r8_s1", "lora_r8_s2"), (0, 1, 2)),
        ("mix", "MixLoRA", ("mix_s0", "mix_s1"), (0, 1)),
    ]
    # Hand-written replicas group too; adapters without a seed key never do.
    d = to_dict(sweep_config())
    d["lora"] = [{**d["lora"][0], "name": "mine_a", "seed": 11}, {**d["lora"][0], "name": "mine_b", "seed": 12},
                 {**d["lora"][0], "name": "x", "seed": None}, {**d["lora"][0], "name": "y", "seed": None}]
    assert [(g.label, g.adapters) for g in group_replicas(config_from_dict(d).lora)] == [
        ("mine", ("mine_a", "mine_b")), ("x", ("x",)), ("y", ("y",))]


def test_grouped_mean_and_std_come_from_the_replica_rows(tmp_path):
    cfg = sweep_config()
    results = made_up_results([*cfg.adapter_names, "base"])
    results.configurations = group_replicas(cfg.lora)
    json_path, csv_path = save_results(results, tmp_path)
    doc = json.loads(json_path.read_text())

    # The JSON keeps every replica.
    assert [r["adapter"] for r in doc["results"]] == [n for n in [*cfg.adapter_names, "base"] for _ in TASKS]
    assert len(csv_path.read_text().splitlines()) == 1 + 9 * len(TASKS) + 9

    acc = {(r["adapter"], r["task"]): r["correct"] / r["items"] for r in doc["results"]}
    table = format_table(results).splitlines()
    assert table[1].split() == ["configuration", "n", "metric", *TASKS, "avg"]
    rows = {line.split()[0]: line for line in table[2:] if line.split()[2:3] == ["acc"]}
    best_avg = {}
    for c in doc["configurations"]:
        members = c["adapters"]
        per_replica_avg = [statistics.mean(acc[a, t] for t in TASKS) for a in members]
        expected_cells = []
        for task in TASKS:
            values = [acc[a, task] for a in members]
            assert c["tasks"][task]["acc_mean"] == pytest.approx(statistics.mean(values))
            std = statistics.stdev(values) if len(values) > 1 else None
            assert c["tasks"][task]["acc_std"] == (pytest.approx(std) if std is not None else None)
            expected_cells.append(f"{100 * statistics.mean(values):.1f}" + (f" ± {100 * std:.1f}" if std is not None else ""))
        mean_avg = statistics.mean(per_replica_avg)
        std_avg = statistics.stdev(per_replica_avg) if len(members) > 1 else None
        assert c["average"]["acc_mean"] == pytest.approx(mean_avg)
        assert c["average"]["acc_std"] == (pytest.approx(std_avg) if std_avg is not None else None)
        expected_cells.append(f"{100 * mean_avg:.1f}" + (f" ± {100 * std_avg:.1f}" if std_avg is not None else ""))
        # The printed row shows the same numbers.
        line = rows[c["configuration"]]
        assert line.split()[1] == str(len(members))
        for cell in expected_cells:
            assert cell in line
        if c["method"] != "base":
            best_avg.setdefault(c["method"], []).append((mean_avg, c["configuration"]))

    assert [c["configuration"] for c in doc["configurations"]] == ["lora_r4", "lora_r8", "mix", "base"]
    assert doc["configurations"][-1]["n"] == 1 and doc["configurations"][-1]["average"]["acc_std"] is None
    for best in doc["best"]:
        ranked = sorted(best_avg[best["method"]], key=lambda x: -x[0])
        assert best["configuration"] == ranked[0][1]
        assert (best["runner_up"] or {}).get("configuration") == (ranked[1][1] if len(ranked) > 1 else None)
        assert any(line.startswith(f"best {best['method']}: {best['configuration']} ") for line in table)


def test_without_replicas_the_table_is_per_adapter_as_before():
    cfg = generate_config("lora", list(TASKS), multi_task=True, adapter_name="lora", grid={"r": [4, 8]})
    results = made_up_results(cfg.adapter_names)
    results.configurations = group_replicas(cfg.lora)
    assert not results.grouped
    assert format_table(results).splitlines()[1].split() == ["adapter", "metric", *TASKS, "avg"]
    assert [c["n"] for c in results.to_dict()["configurations"]] == [1, 1]
