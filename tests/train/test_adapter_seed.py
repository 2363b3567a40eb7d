"""The per-adapter ``seed`` key: replicas given one seed train identically whatever their names
and batch neighbours, other seeds differ, and an adapter without the key keeps the seed derived
from the run seed and its name (configs and checkpoints from before the key behave as they did)."""

from __future__ import annotations

import torch

from mlora.train.data import adapter_seed
from tests.train.helpers import FIXTURES, adapter, run_config, train, weights

MULTI_TASK_DATA = f"{FIXTURES / 'arc-e'};{FIXTURES / 'boolq'}"


def test_replicas_with_one_seed_train_identically_and_other_seeds_differ(base_model, tmp_path):
    # Multi-task with dropout: the seed must reach the initial weights, the mixture's shuffle,
    # each epoch's order and the dropout masks for the replicas to agree.
    common = {"task_name": "arc-e;boolq", "lora_dropout": 0.1, "num_epochs": 2, "batch_size": 4, "micro_batch_size": 2}
    cfg = run_config([
        adapter("rep_a", MULTI_TASK_DATA, seed=5, **common),
        adapter("other", MULTI_TASK_DATA, seed=6, **common),
        adapter("rep_b", MULTI_TASK_DATA, seed=5, **common),
        # Single task: without a seed key a multi-task mixture is shuffled by the run seed itself.
        adapter("plain", str(FIXTURES / "arc-e"), **{**common, "task_name": "arc-e"}),
        adapter("derived", str(FIXTURES / "arc-e"), seed=adapter_seed(3, "plain"), **{**common, "task_name": "arc-e"}),
    ])
    summary = train(cfg, base_model, tmp_path / "out", seed=3)
    assert all(a.status == "finished" for a in summary.adapters.values())
    w = {name: weights(tmp_path / "out" / name) for name in summary.adapters}

    def same(x, y):
        # Equal up to float rounding: an adapter's rows are summed with other neighbours in
        # the shared batch (alone, replicas come out bit-identical).
        if w[x].keys() != w[y].keys():
            return False
        return all(torch.allclose(w[x][k], w[y][k], rtol=1e-5, atol=1e-6) for k in w[x])

    assert same("rep_a", "rep_b")  # same seed, other name and other batch neighbours
    assert not same("rep_a", "other")
    trained = [k for k in w["rep_a"] if "lora_B" in k]
    assert min((w["rep_a"][k] - w["other"][k]).abs().max().item() for k in trained) > 1e-3
    assert same("plain", "derived")  # no seed key = the seed derived from the run seed and the name
    assert not same("plain", "rep_a")


def test_a_checkpoint_from_before_the_key_resumes_and_a_changed_seed_is_refused():
    from mlora.config import to_dict
    from mlora.train.state import _changed_keys

    cfg = run_config([adapter("a", "pairs.json")]).lora[0]
    saved = {k: v for k, v in to_dict(cfg).items() if k != "seed"}  # written before `seed` existed
    assert _changed_keys(saved, to_dict(cfg)) == []
    seeded = run_config([adapter("a", "pairs.json", seed=4)]).lora[0]
    assert _changed_keys(saved, to_dict(seeded)) == ["seed"]
