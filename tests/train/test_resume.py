"""Checkpoints and resume: a killed or interrupted run, resumed, ends bit-identical to an
uninterrupted one; finished adapters are never overwritten without --overwrite."""

from __future__ import annotations

import signal

import pytest
import torch

import mlora.train.trainer as trainer_module
from mlora.train import TrainError
from mlora.train.checkpoint import read_run_state, read_trainer_state
from tests.train.helpers import (
    OTHER_PAIRS,
    PAIRS,
    adapter,
    checkpoint_paths,
    metrics,
    run_config,
    train,
    weights,
    write_pairs,
)


class Killed(Exception):
    """Stands in for the process dying (no checkpoint is written on the way out)."""


NAMES = ("a", "b", "c", "d")


def four_adapter_config(folder):
    """Four adapters, three loaded at a time, two per step (a queue and a choice): batches of
    different sizes, dropout on (RNG), length grouping, LoRA+ with a warm-up schedule, SGD
    with momentum, left padding."""
    pairs, other = write_pairs(folder), write_pairs(folder, OTHER_PAIRS, "other.json")
    more = write_pairs(folder, PAIRS[:5] + OTHER_PAIRS[:4], "more.json")
    return run_config([
        adapter("a", pairs, batch_size=4, micro_batch_size=2, num_epochs=2, lora_dropout=0.1, group_by_length=True),
        adapter("b", other, batch_size=3, micro_batch_size=1, num_epochs=2, lora_dropout=0.2, optim="sgd", momentum=0.9,
                lr=5e-2, scheduler_type="cosine", warmup_ratio=0.2),
        adapter("c", more, batch_size=2, micro_batch_size=2, num_epochs=2, loraplus_lr_ratio=4.0,
                scheduler_type="linear", warmup_steps=2),
        adapter("d", pairs, batch_size=8, micro_batch_size=4, num_epochs=3, expand_side="left", lora_dropout=0.1),
    ], save_step=2, train_lora_candidate_num=3, train_lora_simultaneously_num=2, train_strategy="optim")


def final_weights(out, names=NAMES):
    return {n: weights(out / n) for n in names}


def assert_bit_identical(got, want):
    for name in want:
        assert set(got[name]) == set(want[name])
        for key in want[name]:
            assert torch.equal(got[name][key], want[name][key]), f"{name}: {key} differs"


def losses(out, name):
    return [(r["step"], r.get("event"), r["loss"]) for r in metrics(out, name)]


@pytest.fixture
def uninterrupted(base_model, tmp_path):
    cfg = four_adapter_config(tmp_path)
    summary = train(cfg, base_model, tmp_path / "straight")
    assert all(a.status == "finished" for a in summary.adapters.values())
    assert not checkpoint_paths(tmp_path / "straight")  # removed once everything finished
    return cfg, tmp_path / "straight"


def test_killed_run_resumes_bit_exact(base_model, tmp_path, monkeypatch, uninterrupted):
    cfg, straight = uninterrupted
    out = tmp_path / "killed"
    real_step = trainer_module.optimizer_step
    count = {"n": 0}

    def dying_step(ar, epoch):
        count["n"] += 1
        if count["n"] == 9:
            raise Killed
        real_step(ar, epoch)

    monkeypatch.setattr(trainer_module, "optimizer_step", dying_step)
    with pytest.raises(Killed):
        train(cfg, base_model, out)
    monkeypatch.undo()

    steps = checkpoint_paths(out)
    assert steps, "no periodic checkpoint was written before the kill"
    state = read_run_state(steps[-1])
    assert state["dispatcher"]["active"]  # something was mid-training

    with pytest.raises(TrainError, match="--resume"):
        train(cfg, base_model, out)  # a fresh start would discard the unfinished run
    summary = train(cfg, base_model, out, resume=True)
    assert all(a.status in ("finished", "done-before") for a in summary.adapters.values())
    assert_bit_identical(final_weights(out), final_weights(straight))
    for name in NAMES:
        assert losses(out, name) == losses(straight, name)  # the log reads like one run


def test_ctrl_c_saves_a_checkpoint_mid_accumulation_and_resumes_bit_exact(base_model, tmp_path, monkeypatch,
                                                                         uninterrupted):
    cfg, straight = uninterrupted
    out = tmp_path / "interrupted"
    real_loss = trainer_module.adapter_loss
    count = {"n": 0}

    def interrupting_loss(ar, *args):
        count["n"] += 1
        if count["n"] == 7:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C during this step
        return real_loss(ar, *args)

    monkeypatch.setattr(trainer_module, "adapter_loss", interrupting_loss)
    summary = train(cfg, base_model, out)
    monkeypatch.undo()
    assert summary.interrupted and summary.checkpoint is not None
    assert any(a.status == "interrupted" for a in summary.adapters.values())
    # The step that was running finished first; some adapter is mid-accumulation.
    assert summary.checkpoint.name == f"step-{summary.global_steps:08d}"
    active = read_run_state(summary.checkpoint)["dispatcher"]["active"]
    states = [read_trainer_state(summary.checkpoint, name) for name in active]
    assert any(s["position"]["micro"] > 0 and s["grads"] for s in states)

    resumed = train(cfg, base_model, out, resume=True)
    assert not resumed.interrupted
    assert_bit_identical(final_weights(out), final_weights(straight))


def test_finished_adapters_are_not_overwritten(base_model, tmp_path, pairs_file):
    cfg = run_config([adapter("done", pairs_file, num_epochs=1)])
    out = tmp_path / "out"
    train(cfg, base_model, out)
    before = (out / "done" / "adapter_model.safetensors").read_bytes()

    with pytest.raises(TrainError, match="--overwrite"):
        train(cfg, base_model, out)
    assert (out / "done" / "adapter_model.safetensors").read_bytes() == before

    again = train(cfg, base_model, out, resume=True)  # nothing left to train
    assert again.adapters["done"].status == "done-before" and again.global_steps == 0
    assert (out / "done" / "adapter_model.safetensors").read_bytes() == before

    fresh = run_config([adapter("done", pairs_file, num_epochs=1, lr=5e-2)])
    replaced = train(fresh, base_model, out, overwrite=True)
    assert replaced.adapters["done"].status == "finished"
    assert (out / "done" / "adapter_model.safetensors").read_bytes() != before

    with pytest.raises(TrainError, match="not both"):
        train(cfg, base_model, out, overwrite=True, resume=True)


def test_resume_refuses_a_changed_adapter(base_model, tmp_path, pairs_file):
    cfg = run_config([adapter("x", pairs_file, num_epochs=3)], save_step=1)
    out = tmp_path / "out"
    summary = train(cfg, base_model, out, stop_after_steps=3)
    assert summary.interrupted
    changed = run_config([adapter("x", pairs_file, num_epochs=3, lr=3e-2)], save_step=1)
    with pytest.raises(TrainError, match="lr changed since the checkpoint"):
        train(changed, base_model, out, resume=True)
    resumed = train(cfg, base_model, out, resume=True)
    assert resumed.adapters["x"].status == "finished" and resumed.adapters["x"].steps == 6


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_cli_stop_signal_checkpoints_and_resume_finishes_bit_exact(signum, status, base_model, pairs_file, tmp_path,
                                                                   monkeypatch, capsys):
    """Ctrl-C, and SIGTERM (what Slurm, Kubernetes and systemd send before they kill a job),
    finish the step, checkpoint, exit 128 + the signal; --resume ends as an uninterrupted run."""
    import json

    from mlora.cli import main as launch_main
    from mlora.config import to_dict

    cfg = run_config([adapter("x", pairs_file, num_epochs=3)])
    path = tmp_path / "run.json"
    path.write_text(json.dumps(to_dict(cfg)))
    argv = ["run", "--config", str(path), "--base_model", base_model, "--output_dir", str(tmp_path / "out")]
    real_loss = trainer_module.adapter_loss
    count = {"n": 0}

    def interrupting_loss(ar, *args):
        count["n"] += 1
        if count["n"] == 3:
            signal.raise_signal(signum)
        return real_loss(ar, *args)

    previous = signal.getsignal(signum)
    monkeypatch.setattr(trainer_module, "adapter_loss", interrupting_loss)
    assert launch_main(argv) == status
    printed = capsys.readouterr()
    assert "--resume" in printed.out and signal.Signals(signum).name in printed.err
    assert checkpoint_paths(tmp_path / "out")
    monkeypatch.undo()
    assert signal.getsignal(signum) is previous  # the handler was put back
    assert launch_main([*argv, "--resume"]) == 0
    train(cfg, base_model, tmp_path / "straight")
    got = weights(tmp_path / "out" / "x")
    assert all(torch.equal(got[k], v) for k, v in weights(tmp_path / "straight" / "x").items())


def test_summary_names_optimizer_steps_and_shared_steps(base_model, pairs_file, other_pairs_file, tmp_path):
    cfg = run_config([adapter("a", pairs_file, num_epochs=1), adapter("b", other_pairs_file, num_epochs=1)],
                     train_lora_simultaneously_num=1)
    summary = train(cfg, base_model, tmp_path / "out")
    lines = summary.lines()
    assert any(line.startswith("a: finished, 2 optimizer steps") for line in lines)
    assert any(line.startswith(f"{summary.global_steps} shared forward/backward steps") for line in lines)
    assert summary.global_steps == 8  # 2 adapters x 2 optimizer steps x 2 micro-batches, one adapter a step
