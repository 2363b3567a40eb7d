"""The output folder belongs to the user: mlora replaces only what its manifest says it made,
and one command works in a folder at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mlora.run_folder import BOOKKEEPING, MANIFEST, FolderError, open_run_folder


def test_only_what_the_program_created_is_replaced_or_removed(tmp_path):
    out = tmp_path / "out"
    (out / "mine").mkdir(parents=True)
    (out / "mine" / "notes.txt").write_text("the user's")
    with open_run_folder(out) as folder:
        with folder.replace_dir(out / "made") as tmp:
            (tmp / "a.txt").write_text("1")
        assert folder.owns(out / "made") and folder.owns(out / "made" / "a.txt")
        with folder.replace_dir(out / "made") as tmp:  # its own: replaced
            (tmp / "a.txt").write_text("2")
        assert (out / "made" / "a.txt").read_text() == "2"
        with pytest.raises(FolderError, match="was not written by mlora, or was changed since"):
            with folder.replace_dir(out / "mine"):
                pass
        with pytest.raises(FolderError, match="was not written by mlora, or was changed since"):
            folder.remove(out / "mine")
        with pytest.raises(FolderError, match="was not written by mlora, or was changed since"):
            folder.write_text(out / "mine" / "notes.txt", "replaced")
        assert (out / "mine" / "notes.txt").read_text() == "the user's"
        assert not list((out / BOOKKEEPING / "tmp").iterdir())  # no half-written folder left behind
    manifest = json.loads((out / BOOKKEEPING / MANIFEST).read_text())
    assert set(manifest["created"]) == {"made"}

    with open_run_folder(out) as folder:  # the manifest outlives the command
        assert folder.owns(out / "made")
        assert folder.remove(out / "made") and not (out / "made").exists()
        assert not folder.owns(out / "made")


def test_a_path_the_user_replaced_is_no_longer_the_programs(tmp_path):
    out = tmp_path / "out"
    with open_run_folder(out) as folder:
        folder.write_text(out / "result.txt", "ours")
    (out / "result.txt").unlink()
    (out / "result.txt").write_text("the user's own file, same name")
    with open_run_folder(out) as folder:
        with pytest.raises(FolderError, match="was not written by mlora, or was changed since"):
            folder.write_text(out / "result.txt", "again")
    assert (out / "result.txt").read_text() == "the user's own file, same name"


def test_a_folder_the_user_added_to_is_no_longer_the_programs_but_a_growing_log_is(tmp_path):
    out = tmp_path / "out"
    with open_run_folder(out) as folder:
        with folder.replace_dir(out / "adapter") as tmp:
            (tmp / "weights").write_text("w")
        log = folder.logs / "adapter.jsonl"
        log.parent.mkdir(parents=True)
        log.write_text("{}\n")
        folder.created(log, growing=True)
        with pytest.raises(ValueError, match="only paths inside"):
            folder.created(out / "adapter", growing=True)
    time.sleep(0.01)
    (out / "adapter" / "my-notes.txt").write_text("the user's")
    with log.open("a") as handle:  # a killed run's log grew after it was recorded
        handle.write("{}\n")
    with open_run_folder(out) as folder:
        assert not folder.owns(out / "adapter") and folder.owns(log)
        with pytest.raises(FolderError):
            folder.remove(out / "adapter")
    assert (out / "adapter" / "my-notes.txt").read_text() == "the user's"


def test_a_failed_write_leaves_the_old_folder(tmp_path):
    out = tmp_path / "out"
    with open_run_folder(out) as folder:
        with folder.replace_dir(out / "x") as tmp:
            (tmp / "w").write_text("old")
        with pytest.raises(RuntimeError):
            with folder.replace_dir(out / "x") as tmp:
                (tmp / "w").write_text("new, half")
                raise RuntimeError("disk full")
        assert (out / "x" / "w").read_text() == "old"


def test_second_command_in_the_same_folder_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "out"
    with open_run_folder(out):
        with pytest.raises(FolderError, match=rf"in use by another mlora command \(pid {os.getpid()} on "):
            with open_run_folder(out):
                pass
    with open_run_folder(out):  # released at the end of the command
        pass


def test_a_killed_holder_does_not_block_the_folder(tmp_path):
    out = tmp_path / "out"
    code = ("import sys, time; from mlora.run_folder import open_run_folder\n"
            f"with open_run_folder({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(FolderError, match=f"pid {proc.pid}"):
            with open_run_folder(out):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 5
    while True:  # the kernel drops the lock with the process
        try:
            with open_run_folder(out):
                break
        except FolderError:
            assert time.time() < deadline
            time.sleep(0.05)


def test_unusable_output_folders_are_named(tmp_path):
    a_file = tmp_path / "out.txt"
    a_file.write_text("x")
    with pytest.raises(FolderError, match="is a file"):
        with open_run_folder(a_file):
            pass
    foreign = tmp_path / "foreign"
    (foreign / BOOKKEEPING).mkdir(parents=True)
    (foreign / BOOKKEEPING / "theirs.txt").write_text("x")
    with pytest.raises(FolderError, match="was not made by mlora"):
        with open_run_folder(foreign):
            pass
    damaged = tmp_path / "damaged"
    (damaged / BOOKKEEPING).mkdir(parents=True)
    (damaged / BOOKKEEPING / MANIFEST).write_text("{not json")
    with pytest.raises(FolderError, match="is damaged"):
        with open_run_folder(damaged):
            pass
