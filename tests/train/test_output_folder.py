"""A run never deletes or replaces what it did not create (DESIGN.md section 11), whatever the
adapter names, the flags or what else lies in the output folder."""

from __future__ import annotations

import json

import pytest

from mlora.cli import main as launch_main
from mlora.config import to_dict
from mlora.run_folder import BOOKKEEPING, FolderError, open_run_folder
from mlora.train import TrainError
from tests.train.helpers import adapter, checkpoint_paths, metrics, run_config, train, weights


def test_adapters_named_like_bookkeeping_keep_their_folders_and_the_logs(base_model, pairs_file, tmp_path):
    cfg = run_config([adapter("logs", pairs_file, num_epochs=2), adapter("checkpoints", pairs_file, num_epochs=1)],
                     save_step=1)
    out = tmp_path / "out"
    summary = train(cfg, base_model, out)
    for name in ("logs", "checkpoints"):
        assert summary.adapters[name].status == "finished"
        assert weights(out / name)  # saved, and not deleted by the end-of-run checkpoint clean-up
        assert len(metrics(out, name)) == summary.adapters[name].steps  # every adapter's log survived
    assert not checkpoint_paths(out)  # the run's own checkpoints are gone


def test_the_users_files_are_never_touched(base_model, pairs_file, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "my-model.pt").write_text("the user's")
    (out / "logs").mkdir()
    (out / "logs" / "x.jsonl").write_text("the user's log")
    cfg = run_config([adapter("x", pairs_file, num_epochs=2)], save_step=1)
    train(cfg, base_model, out)
    train(cfg, base_model, out, overwrite=True)
    assert (out / "checkpoints" / "my-model.pt").read_text() == "the user's"
    assert (out / "logs" / "x.jsonl").read_text() == "the user's log"


def test_a_folder_the_run_did_not_make_is_refused_even_with_overwrite(base_model, pairs_file, tmp_path):
    out = tmp_path / "out"
    (out / "x").mkdir(parents=True)
    (out / "x" / "adapter_config.json").write_text("{}")
    cfg = run_config([adapter("x", pairs_file, num_epochs=1)])
    for flags in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(FolderError, match="was not written by mlora, or was changed since"):
            train(cfg, base_model, out, **flags)
    assert (out / "x" / "adapter_config.json").read_text() == "{}"


def test_an_earlier_log_is_not_replaced_without_overwrite(base_model, pairs_file, tmp_path):
    out = tmp_path / "out"
    cfg = run_config([adapter("x", pairs_file, num_epochs=1)])
    train(cfg, base_model, out)
    with open_run_folder(out) as folder:  # as if the adapter had stopped (no folder, a log)
        folder.remove(out / "x")
    before = (out / BOOKKEEPING / "logs" / "x.jsonl").read_text()
    with pytest.raises(TrainError, match=r"x\.jsonl.*--overwrite"):
        train(cfg, base_model, out)
    assert (out / BOOKKEEPING / "logs" / "x.jsonl").read_text() == before
    train(cfg, base_model, out, overwrite=True)
    assert (out / "x" / "adapter_config.json").is_file()


def test_a_second_run_into_the_same_folder_is_refused(base_model, pairs_file, tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(to_dict(run_config([adapter("x", pairs_file, num_epochs=1)]))))
    out = tmp_path / "out"
    with open_run_folder(out):  # stands for a first run still working there
        status = launch_main(["run", "--config", str(config), "--base_model", base_model, "--output_dir", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and "in use by another mlora command (pid" in err and len(err.strip().splitlines()) == 1
    assert not (out / "x").exists()


def test_output_dir_that_is_a_file_is_a_one_line_error(base_model, pairs_file, tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(to_dict(run_config([adapter("x", pairs_file, num_epochs=1)]))))
    (tmp_path / "out").write_text("a file")
    status = launch_main(["run", "--config", str(config), "--base_model", base_model, "--output_dir",
                          str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 2 and "is a file" in err and len(err.strip().splitlines()) == 1


def test_odd_but_valid_names_train_and_save(base_model, pairs_file, tmp_path):
    cfg = run_config([adapter("v1.0", pairs_file, num_epochs=1), adapter("train", pairs_file, num_epochs=1)])
    summary = train(cfg, base_model, tmp_path / "out")
    for name in ("v1.0", "train"):
        assert summary.adapters[name].status == "finished"
        assert weights(tmp_path / "out" / name)
