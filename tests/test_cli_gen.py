"""The command line (launch.py gen/run/avail and train.py), run as a user would: subprocesses."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlora.config import LoraConfig, MixLoraConfig, load_config

REPO = Path(__file__).resolve().parent.parent
LAUNCH = str(REPO / "launch.py")
TRAIN = str(REPO / "train.py")
FIXTURES = REPO / "tests" / "fixtures"


def cli(cwd, *args, script=LAUNCH):
    return subprocess.run([sys.executable, script, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def gen(cwd, *args):
    result = cli(cwd, "gen", *args)
    assert result.returncode == 0, result.stderr
    return result


def read(path):
    return json.loads(Path(path).read_text())


def assert_user_error(result, *fragments):
    """Exit status 2, a readable message, no Python traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------- gen


def test_gen_single_task_one_adapter_per_task(tmp_path):
    out = gen(tmp_path, "--template", "mixlora", "--tasks", "arc-c;arc-e;boolq")
    assert "wrote mlora.json: 3 adapters" in out.stdout
    d = read(tmp_path / "mlora.json")
    assert [a["name"] for a in d["lora"]] == ["arc_c_0", "arc_e_1", "boolq_2"]
    assert [a["task_name"] for a in d["lora"]] == ["arc-c", "arc-e", "boolq"]
    assert all(a["data"] is None for a in d["lora"])  # benchmarks use their default source
    cfg = load_config(tmp_path / "mlora.json")
    assert all(isinstance(a, MixLoraConfig) and a.top_k == 2 for a in cfg.lora)


def test_gen_writes_fully_resolved_json(tmp_path):
    gen(tmp_path, "--template", "lora", "--tasks", "piqa")
    d = read(tmp_path / "mlora.json")
    assert set(d["lora"][0]) == {f.name for f in dataclasses.fields(LoraConfig)}
    assert d["lora"][0]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
    assert {"cutoff_len", "save_step", "train_lora_candidate_num", "train_lora_simultaneously_num",
            "train_strategy", "eval_lora_simultaneously_num"} <= set(d)  # fmt: skip


def test_gen_multi_task_one_adapter_for_all_tasks(tmp_path):
    gen(tmp_path, "--template", "mixlora", "--tasks", "arc-c;arc-e;boolq;obqa;piqa", "--multi_task", "True",
        "--adapter_name", "mixlora")  # fmt: skip
    (a,) = read(tmp_path / "mlora.json")["lora"]
    assert (a["name"], a["task_name"], a["data"]) == ("mixlora_0", "arc-c;arc-e;boolq;obqa;piqa", None)
    gen(tmp_path, "--template", "lora", "--tasks", "siqa;winogrande", "--multi_task", "--file_name", "m.json")
    (b,) = read(tmp_path / "m.json")["lora"]
    assert (b["name"], b["task_name"]) == ("multi_task_0", "siqa;winogrande")


def test_gen_overrides_apply_to_every_adapter(tmp_path):
    gen(tmp_path, "--template", "lora", "--tasks", "arc-e;boolq", "--r", "4", "--lora_alpha", "8",
        "--lora_dropout", "0", "--lr", "1e-3", "--batch_size", "8", "--micro_batch_size", "2", "--num_epochs", "3",
        "--cutoff_len", "256", "--save_step", "50", "--use_dora", "true", "--use_rslora", "1",
        "--group_by_length", "True", "--scheduler_type", "cosine", "--warmup_steps", "5",
        "--evaluate_batch_size", "4", "--protocol", "loglikelihood")  # fmt: skip
    d = read(tmp_path / "mlora.json")
    assert (d["cutoff_len"], d["save_step"]) == (256, 50)
    for a in d["lora"]:
        assert (a["r"], a["lora_alpha"], a["lora_dropout"], a["lr"]) == (4, 8, 0, 1e-3)
        assert (a["batch_size"], a["micro_batch_size"], a["num_epochs"], a["evaluate_batch_size"]) == (8, 2, 3, 4)
        assert (a["use_dora"], a["use_rslora"], a["group_by_length"]) == (True, True, True)
        assert (a["scheduler_type"], a["warmup_steps"], a["protocol"]) == ("cosine", 5, "loglikelihood")


def test_gen_accepts_m_lora_flag_spellings(tmp_path):
    gen(tmp_path, "--template", "lora", "--tasks", "obqa", "--learning_rate", "5e-5", "--lr_scheduler", "linear")
    (a,) = read(tmp_path / "mlora.json")["lora"]
    assert (a["lr"], a["scheduler_type"]) == (5e-5, "linear")


@pytest.mark.parametrize("text, value", [("True", True), ("true", True), ("1", True),
                                         ("False", False), ("false", False), ("0", False)])  # fmt: skip
def test_gen_boolean_spellings(tmp_path, text, value):
    gen(tmp_path, "--template", "dora", "--tasks", "boolq", "--use_dora", text)
    assert read(tmp_path / "mlora.json")["lora"][0]["use_dora"] is value


def test_gen_bad_boolean_and_bad_number(tmp_path):
    assert_user_error(cli(tmp_path, "gen", "--template", "lora", "--tasks", "boolq", "--use_dora", "maybe"),
                      "--use_dora", "expected True or False")  # fmt: skip
    assert_user_error(cli(tmp_path, "gen", "--template", "lora", "--tasks", "boolq", "--r", "eight"), "--r")
    assert not (tmp_path / "mlora.json").exists()


def test_gen_data_path_gives_each_task_a_source(tmp_path):
    gen(tmp_path, "--template", "lora", "--tasks", "arc-e;boolq", "--data_path", "data/arc.json;data/boolq.jsonl")
    d = read(tmp_path / "mlora.json")
    assert [(a["task_name"], a["data"]) for a in d["lora"]] == [("arc-e", "data/arc.json"), ("boolq", "data/boolq.jsonl")]
    gen(tmp_path, "--template", "lora", "--tasks", "arc-e;boolq", "--multi_task", "true", "--data_path", ";b.json",
        "--file_name", "m.json")  # fmt: skip
    (m,) = load_config(tmp_path / "m.json").lora
    assert m.task_sources == [("arc-e", None), ("boolq", "b.json")]
    assert_user_error(cli(tmp_path, "gen", "--template", "lora", "--tasks", "arc-e;boolq", "--data_path", "one.json",
                          "--file_name", "x.json"), "--data_path gives 1 path(s) for 2 task(s)")  # fmt: skip


def test_gen_dataset_names_become_instruction_adapters(tmp_path):
    (tmp_path / "notes.jsonl").write_text('{"instruction": "hi", "input": "", "output": "hello"}\n')
    gen(tmp_path, "--template", "mixlora", "--tasks", "yahma/alpaca-cleaned;notes.jsonl;my-set",
        "--data_path", ";;sets/mine.parquet")  # fmt: skip
    d = read(tmp_path / "mlora.json")
    got = [(a["name"], a["task_name"], a["data"], a["prompt"]) for a in d["lora"]]
    assert got == [
        ("alpaca_cleaned_0", "casual", "yahma/alpaca-cleaned", "alpaca"),
        ("notes_1", "casual", "notes.jsonl", "alpaca"),
        ("my_set_2", "casual", "sets/mine.parquet", "alpaca"),
    ]


def test_gen_unknown_template_lists_valid_names(tmp_path):
    result = cli(tmp_path, "gen", "--template", "mixlra", "--tasks", "boolq")
    assert_user_error(result, "unknown template 'mixlra'", "did you mean mixlora?")
    for name in ("lora", "dora", "mixlora", "mixdora", "mixlora-switch", "mixlora-dynamic"):
        assert name in result.stderr


def test_gen_unknown_task_lists_valid_names(tmp_path):
    result = cli(tmp_path, "gen", "--template", "lora", "--tasks", "arc-e;hellaswg")
    assert_user_error(result, "unknown task 'hellaswg'", "did you mean hellaswag?", "winogrande", "--data_path")
    assert not (tmp_path / "mlora.json").exists()


def test_gen_template_given_as_a_file(tmp_path):
    gen(tmp_path, "--template", "mixlora-switch", "--tasks", "boolq", "--file_name", "mine.json", "--r", "4")
    gen(tmp_path, "--template", "mine.json", "--tasks", "piqa")
    (a,) = load_config(tmp_path / "mlora.json").lora
    assert (a.name, a.routing_strategy, a.r) == ("piqa_0", "mixlora-switch", 4)


def test_gen_does_not_overwrite_without_flag(tmp_path):
    gen(tmp_path, "--template", "lora", "--tasks", "boolq")
    before = (tmp_path / "mlora.json").read_text()
    assert_user_error(cli(tmp_path, "gen", "--template", "dora", "--tasks", "piqa"), "already exists", "--overwrite")
    assert (tmp_path / "mlora.json").read_text() == before
    gen(tmp_path, "--template", "dora", "--tasks", "piqa", "--overwrite")
    assert [a["name"] for a in read(tmp_path / "mlora.json")["lora"]] == ["piqa_0"]


def test_gen_file_name_in_a_missing_folder_or_a_folder_is_a_clear_error(tmp_path):
    assert_user_error(cli(tmp_path, "gen", "--template", "lora", "--tasks", "boolq", "--file_name",
                          str(tmp_path / "no" / "such" / "run.json")), "does not exist", "create it first")
    assert not (tmp_path / "no").exists()
    (tmp_path / "adir").mkdir()
    assert_user_error(cli(tmp_path, "gen", "--template", "lora", "--tasks", "boolq", "--file_name", "adir"),
                      "is a folder")


def test_gen_append_adds_adapters_with_continued_numbering(tmp_path):
    gen(tmp_path, "--template", "lora", "--tasks", "arc-e", "--cutoff_len", "128")
    gen(tmp_path, "--template", "mixlora", "--tasks", "arc-e;boolq", "--append", "True")
    cfg = load_config(tmp_path / "mlora.json")
    assert cfg.adapter_names == ["arc_e_0", "arc_e_1", "boolq_2"]
    assert [a.is_moe for a in cfg.lora] == [False, True, True]
    assert cfg.cutoff_len == 128  # the existing file's run settings are kept
    assert_user_error(cli(tmp_path, "gen", "--template", "lora", "--tasks", "arc-e", "--append", "--file_name", "no.json"),
                      "cannot append")  # fmt: skip


def test_gen_refuses_to_write_an_invalid_config(tmp_path):
    result = cli(tmp_path, "gen", "--template", "lora", "--tasks", "boolq", "--warmup_steps", "10",
                 "--micro_batch_size", "5")  # fmt: skip
    assert_user_error(result, "2 problems", "nothing was written", "lora[0].micro_batch_size: 5 must divide",
                      "lora[0].scheduler_type: 'constant' has no warm-up")  # fmt: skip
    assert not (tmp_path / "mlora.json").exists()


# ------------------------------------------------------------------------------- avail, help


def test_avail_lists_templates_and_tasks(tmp_path):
    result = cli(tmp_path, "avail")
    assert result.returncode == 0
    for name in ("lora", "dora", "mixlora", "mixdora", "mixlora-switch", "mixlora-dynamic", "arc-c", "arc-e",
                 "boolq", "obqa", "piqa", "siqa", "hellaswag", "winogrande", "switch top-1 routing, capacity 32"):
        assert name in result.stdout, name  # fmt: skip


@pytest.mark.parametrize(
    "args, flags",
    [
        ([], ["gen", "run", "avail"]),
        (["gen"], ["--template", "--tasks", "--file_name", "--multi_task", "--adapter_name", "--data_path",
                   "--overwrite", "--append", "--r", "--lora_alpha", "--lora_dropout", "--lr", "--batch_size",
                   "--micro_batch_size", "--num_epochs", "--cutoff_len", "--save_step", "--use_dora",
                   "--use_rslora", "--group_by_length", "--scheduler_type", "--warmup_steps",
                   "--evaluate_batch_size", "--protocol"]),
        (["run"], ["--config", "--base_model", "--dtype", "fp32", "bf16", "fp16", "--quantize", "4bit", "8bit",
                   "--device", "--output_dir", "./output", "--seed", "--resume", "--overwrite",
                   "--gradient_checkpointing", "--attn_impl"]),
        (["avail"], ["templates"]),
    ],
)  # fmt: skip
def test_help_describes_every_flag(tmp_path, args, flags):
    result = cli(tmp_path, *args, "--help")
    assert result.returncode == 0
    for flag in flags:
        assert flag in result.stdout, flag


# --------------------------------------------------------------------------------- run, train


def test_run_rejects_an_invalid_config_with_every_problem(tmp_path):
    bad = {"cutoff": 3, "lora": [{"name": "a", "task_name": "arc-e", "lora_alfa": 3, "r": 0},
                                 {"name": "b", "task_name": "boolq", "micro_batch_size": 3}]}  # fmt: skip
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    result = cli(tmp_path, "run", "--config", "bad.json", "--base_model", "some/model")
    assert_user_error(result, "4 problems", "bad.json: cutoff: unknown key; did you mean cutoff_len?",
                      "bad.json: lora[0].lora_alfa: unknown key; did you mean lora_alpha?",
                      "bad.json: lora[0].r: expected a value >= 1, got 0",
                      "bad.json: lora[1].micro_batch_size: 3 must divide batch_size 16")  # fmt: skip


def test_run_reports_json_syntax_errors_and_missing_files(tmp_path):
    (tmp_path / "broken.json").write_text('{"lora": [\n  {"name": "a",}\n]}')
    assert_user_error(cli(tmp_path, "run", "--config", "broken.json", "--base_model", "m"),
                      "broken.json: line 2, column 16: invalid JSON")  # fmt: skip
    assert_user_error(cli(tmp_path, "run", "--base_model", "m"), "mlora.json: file not found")


def test_run_with_a_valid_config_reports_a_missing_base_model(tmp_path):
    gen(tmp_path, "--template", "mixlora", "--tasks", "arc-e", "--data_path", str(FIXTURES / "arc-e"))
    result = cli(tmp_path, "run", "--base_model", str(tmp_path / "no-such-model"), "--dtype", "bf16", "--seed", "1")
    assert result.returncode == 2, result.stderr
    assert "valid" in result.stdout and "arc_e_0" in result.stdout
    assert "no-such-model does not exist" in result.stderr and "Traceback" not in result.stderr
    assert_user_error(cli(tmp_path, "run"), "--base_model is required")
    assert_user_error(cli(tmp_path, "run", "--base_model", "m", "--dtype", "fp8"), "--dtype")


def test_run_validates_before_importing_torch(tmp_path):
    (tmp_path / "bad.json").write_text('{"lora": [{"name": "a", "task_name": "arc-e", "r": 0}]}')
    code = (
        "import sys\n"
        "from mlora.cli import main\n"
        "status = main(['run', '--config', 'bad.json', '--base_model', 'm'])\n"
        "assert status == 2, status\n"
        "assert 'torch' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": ""})  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_train_py_does_the_same_as_run(tmp_path):
    gen(tmp_path, "--template", "lora", "--tasks", "boolq", "--file_name", "c.json", "--data_path", str(FIXTURES / "boolq"))
    result = cli(tmp_path, "c.json", "--base_model", str(tmp_path / "absent"), script=TRAIN)
    assert result.returncode == 2 and "absent does not exist" in result.stderr
    (tmp_path / "bad.json").write_text('{"lora": [{"name": "a", "task_name": "boolq", "lr": -1}]}')
    assert_user_error(cli(tmp_path, "bad.json", "--base_model", "m", script=TRAIN), "lora[0].lr: expected a value > 0")
    help_text = cli(tmp_path, "--help", script=TRAIN).stdout
    for flag in ("config", "--base_model", "--dtype", "--quantize", "--output_dir", "--resume"):
        assert flag in help_text


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path):
    """`launch.py avail | head -1`: the listing stops quietly when the pipe closes."""
    proc = subprocess.Popen([sys.executable, str(LAUNCH), "avail"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, bufsize=0)
    proc.stdout.read(10)
    proc.stdout.close()  # the reader goes away before the listing is done
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err
