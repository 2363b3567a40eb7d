"""Sweeps in `launch.py gen`: comma lists and --seeds expand into the adapters of one run config
(mlora.sweep, mlora.gen), named after the grid point, validated as a whole."""

from __future__ import annotations

import itertools
import json

import pytest

from mlora.cli import main
from mlora.config import ConfigError, config_from_dict, load_config, to_dict
from mlora.gen import GenError, generate_config, read_template
from mlora.sweep import SweepError, expand_grid, format_value

SET_BY_GEN = ("name", "r", "lr", "seed", "task_name", "data")  # the swept keys, and what the task sets


def run_gen(capsys, tmp_path, *args):
    status = main(["gen", "--file_name", str(tmp_path / "mlora.json"), *args])
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return status, out.out, out.err


def test_the_grid_expands_as_asked():
    cfg = generate_config("mixlora", ["arc-e"], adapter_name="mixlora", grid={"r": [8, 16, 32], "lr": [1e-4, 2e-4]},
                          seeds=[0, 1, 2])
    # Written out by hand: r slowest, then lr, then the seed.
    expected = [(f"mixlora_r{r}_lr{lr}_s{s}", r, float(lr), s)
                for r, lr, s in itertools.product([8, 16, 32], ["1e-4", "2e-4"], [0, 1, 2])]
    assert [(a.name, a.r, a.lr, a.seed) for a in cfg.lora] == expected
    # Everything that is not swept is the template's.
    template = to_dict(read_template("mixlora").lora[0])
    for a in cfg.lora:
        got = to_dict(a)
        assert {k: v for k, v in got.items() if k not in SET_BY_GEN} == \
            {k: v for k, v in template.items() if k not in SET_BY_GEN}


def test_command_writes_what_the_library_makes(capsys, tmp_path):
    status, out, err = run_gen(capsys, tmp_path, "--template", "mixlora", "--tasks", "arc-e", "--adapter_name",
                               "mixlora", "--r", "8,16,32", "--lr", "1e-4,2e-4", "--seeds", "3",
                               "--train_lora_simultaneously_num", "4", "--train_lora_candidate_num", "6")
    assert status == 0, err
    written = json.loads((tmp_path / "mlora.json").read_text())
    library = generate_config("mixlora", ["arc-e"], adapter_name="mixlora", grid={"r": [8, 16, 32], "lr": [1e-4, 2e-4]},
                              seeds=[0, 1, 2], run_overrides={"train_lora_simultaneously_num": 4,
                                                              "train_lora_candidate_num": 6})
    assert written == to_dict(library)
    assert "18 adapters" in out and "r 8,16,32 x lr 1e-4,2e-4 x 3 seeds" in out and "4 at a time" in out
    # A single value is a plain override: not in the names.
    status, _, err = run_gen(capsys, tmp_path, "--template", "lora", "--tasks", "arc-e", "--r", "4", "--lr",
                             "1e-3,3e-3", "--overwrite")
    assert status == 0, err
    assert [(a.name, a.r) for a in load_config(tmp_path / "mlora.json").lora] == [("arc_e_lr1e-3", 4), ("arc_e_lr3e-3", 4)]


def test_names_say_the_point_of_the_grid():
    names = [p.suffix for p in expand_grid({"use_dora": [True, False], "scheduler_type": ["cosine", "linear"],
                                            "lora_alpha": [16.0, 32.0], "lora_dropout": [0.05, 0.1]})]
    assert names[0] == "dora_cosine_alpha16_dropout0.05" and names[-1] == "nodora_linear_alpha32_dropout0.1"
    assert [format_value(v) for v in (2e-4, 3e-5, 1e-3, 0.05, 1.5e-4, 32.0, 8)] == \
        ["2e-4", "3e-5", "1e-3", "0.05", "1.5e-4", "32", "8"]
    # Several single tasks under one --adapter_name: the task keeps the names apart.
    cfg = generate_config("lora", ["arc-e", "boolq"], adapter_name="lora", grid={"r": [4, 8]})
    assert cfg.adapter_names == ["lora_arc_e_r4", "lora_arc_e_r8", "lora_boolq_r4", "lora_boolq_r8"]
    assert all(a.seed is None for a in cfg.lora)  # no --seeds: seeds derived from the run, as before


def test_seeds_alone_and_appended_replicas():
    first = generate_config("lora", ["arc-e"], adapter_name="lora", seeds=[0, 1])
    more = generate_config("lora", ["arc-e"], adapter_name="lora", seeds=[2, 3], base=first)
    assert [(a.name, a.seed) for a in more.lora] == [("lora_s0", 0), ("lora_s1", 1), ("lora_s2", 2), ("lora_s3", 3)]
    with pytest.raises(ConfigError, match=r"lora\[2\]\.name: 'lora_s1' is already used by lora\[1\]"):
        generate_config("lora", ["arc-e"], adapter_name="lora", seeds=[1, 2], base=first)


def test_an_invalid_point_names_its_values():
    with pytest.raises(ConfigError) as err:
        generate_config("lora", ["arc-e"], grid={"batch_size": [8, 16], "r": [4, 8]},
                        adapter_overrides={"micro_batch_size": 16}, seeds=[0, 1, 2])
    # Points with batch_size 8 are invalid (each reported once for its three seeds); 16 is fine.
    assert err.value.problems == [
        ("lora[0].micro_batch_size: 16 must divide batch_size 8 (grid point batch_size=8, r=4; the same in its other "
         "seeds: lora[1], lora[2])"),
        ("lora[3].micro_batch_size: 16 must divide batch_size 8 (grid point batch_size=8, r=8; the same in its other "
         "seeds: lora[4], lora[5])"),
    ]
    # A problem of every point is said once.
    with pytest.raises(ConfigError) as err:
        generate_config("lora", ["arc-e"], grid={"r": [4, 8]}, adapter_overrides={"warmup_steps": 5}, seeds=[0, 1])
    assert len(err.value.problems) == 1 and "every one of the sweep's 4 adapters" in err.value.problems[0]


def test_invalid_sweeps_are_one_line_errors(capsys, tmp_path):
    with pytest.raises(SweepError, match="r: lists 8 more than once.*lr: give a non-empty list"):
        expand_grid({"r": [8, 16, 8], "lr": []})
    with pytest.raises(SweepError, match="seed: cannot be swept"):
        generate_config("lora", ["arc-e"], grid={"seed": [1, 2]})
    with pytest.raises(SweepError, match="seeds: lists 1 more than once"):
        expand_grid(seeds=[1, 1])
    with pytest.raises(GenError, match="r given both as a single value and as a sweep"):
        generate_config("lora", ["arc-e"], grid={"r": [4, 8]}, adapter_overrides={"r": 4})

    status, _, err = run_gen(capsys, tmp_path, "--template", "lora", "--tasks", "arc-e", "--batch_size", "8,16",
                             "--micro_batch_size", "16")
    assert status == 2 and "grid point batch_size=8" in err and not (tmp_path / "mlora.json").exists()
    status, _, err = run_gen(capsys, tmp_path, "--template", "lora", "--tasks", "arc-e", "--r", "8,8")
    assert (status, err.strip()) == (2, "error: invalid sweep: r: lists 8 more than once")
    status, _, err = run_gen(capsys, tmp_path, "--template", "lora", "--tasks", "arc-e", "--first_seed", "3")
    assert (status, err.strip()) == (2, "error: --first_seed needs --seeds N (the number of replicas)")
    status, _, err = run_gen(capsys, tmp_path, "--template", "lora", "--tasks", "arc-e", "--seeds", "0")
    assert status == 2 and err.count("\n") == 1


def test_the_seed_key_is_optional_and_round_trips():
    plain = config_from_dict({"lora": [{"name": "a", "task_name": "arc-e"}]})
    assert plain.lora[0].seed is None and to_dict(plain)["lora"][0]["seed"] is None
    seeded = config_from_dict({"lora": [{"name": "a", "task_name": "arc-e", "seed": 7}]})
    assert config_from_dict(to_dict(seeded)).lora[0].seed == 7
    with pytest.raises(ConfigError, match=r"lora\[0\]\.seed: expected a value >= 0"):
        config_from_dict({"lora": [{"name": "a", "task_name": "arc-e", "seed": -1}]})
