"""Damaged checkpoints: `--resume` names the damaged one, falls back to the newest intact one,
and still ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import logging
import pickle

import pytest
import torch

from mlora.cli import main as launch_main
from mlora.config import to_dict
from mlora.train import TrainError
from tests.train.helpers import adapter, checkpoint_paths, run_config, train, weights


def damage_truncated_state(cp):
    path = cp / "x" / "trainer_state.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def damage_garbled_run_state(cp):
    (cp / "run_state.json").write_text('{"seed": 4')


def damage_empty_run_state(cp):
    (cp / "run_state.json").write_text("")


def damage_missing_state(cp):
    (cp / "x" / "trainer_state.pt").unlink()


def damage_plain_pickle(cp):
    (cp / "x" / "trainer_state.pt").write_bytes(pickle.dumps({"step": 3}))


def damage_no_manifest(cp):
    (cp / "manifest.json").unlink()


DAMAGES = [damage_truncated_state, damage_garbled_run_state, damage_empty_run_state, damage_missing_state,
           damage_plain_pickle, damage_no_manifest]


@pytest.fixture(scope="module")
def straight(base_model, tmp_path_factory):
    from tests.train.helpers import write_pairs

    folder = tmp_path_factory.mktemp("straight")
    cfg = run_config([adapter("x", write_pairs(folder), num_epochs=3, lora_dropout=0.1)], save_step=1)
    train(cfg, base_model, folder / "out")
    return cfg, weights(folder / "out" / "x")


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__.removeprefix("damage_"))
def test_resume_skips_a_damaged_checkpoint_for_the_newest_intact_one(base_model, tmp_path, straight, damage, caplog):
    cfg, want = straight
    out = tmp_path / "out"
    assert train(cfg, base_model, out, stop_after_steps=3).interrupted
    older, newest = checkpoint_paths(out)
    damage(newest)
    with caplog.at_level(logging.WARNING, logger="mlora.train"):
        summary = train(cfg, base_model, out, resume=True)
    assert f"checkpoint {newest} is damaged" in caplog.text
    assert summary.adapters["x"].status == "finished"
    got = weights(out / "x")
    assert all(torch.equal(got[k], want[k]) for k in want)  # resumed from `older`, same end


def test_resume_with_only_damaged_checkpoints_is_a_clear_error(base_model, tmp_path, straight, capsys):
    cfg, _ = straight
    out = tmp_path / "out"
    train(cfg, base_model, out, stop_after_steps=3)
    for cp in checkpoint_paths(out):
        damage_truncated_state(cp)
    with pytest.raises(TrainError, match=r"no intact checkpoint.*trainer_state\.pt.*--overwrite"):
        train(cfg, base_model, out, resume=True)
    config = tmp_path / "run.json"
    config.write_text(json.dumps(to_dict(cfg)))
    status = launch_main(["run", "--config", str(config), "--base_model", base_model, "--output_dir", str(out),
                          "--resume"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and "no intact checkpoint" in errors[0]
