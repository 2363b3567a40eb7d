"""`launch.py evaluate` over a tiny saved model and saved adapters, the scoring at the end of
`launch.py run`, and the user errors (exit status 2, one readable message, no traceback)."""

import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mlora.cli import main
from mlora.config import load_config
from mlora.evaluate import BASE, base_spec, evaluate, evaluate_adapters, evaluate_run, evaluate_trained
from mlora.io import save_adapter
from mlora.model.adapted import MultiAdapterModel
from tests.tiny import save_tiny, tiny_model, word_tokenizer

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def adapter(name, task_name, **kw):
    data = ";".join(str(FIXTURES / t) for t in task_name.split(";")) if task_name != "casual" else None
    a = {"name": name, "task_name": task_name, "data": data, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
         "target_modules": TARGETS, "evaluate_batch_size": 3}
    a.update(kw)
    return a


ADAPTERS = [
    adapter("arc_c_0", "arc-c"),
    adapter("multi", "arc-e;boolq", protocol="loglikelihood", routing_strategy="mixlora", num_experts=2, top_k=1,
            router_init_range=0.5),
    adapter("chat", "casual", data=str(FIXTURES / "alpaca" / "train.json")),
]


def write_config(path, adapters, **run_level):
    path.write_text(json.dumps({"eval_lora_simultaneously_num": 2, **run_level, "lora": adapters}))
    return str(path)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls gain nothing from two threads, and lose a lot when the cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base on disk, a config, and its two benchmark adapters saved in out/<name>/."""
    root = tmp_path_factory.mktemp("evaluate")
    base = save_tiny(tiny_model(), word_tokenizer(), root / "base")
    config = write_config(root / "mlora.json", ADAPTERS)
    cfgs = load_config(config).lora
    model = MultiAdapterModel(tiny_model())
    gen = torch.Generator().manual_seed(0)
    for cfg in cfgs[:2]:
        model.add_adapter(cfg, seed=1)
        with torch.no_grad():
            for key, p in model.adapter_parameters(cfg.name).items():
                if "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        save_adapter(model, cfg.name, root / "out" / cfg.name, base_model_name_or_path=base)
    return SimpleNamespace(root=root, base=base, config=config, out=root / "out", cfgs=cfgs, model=model)


def run_cli(capsys, *args):
    status = main(["evaluate", *map(str, args)])
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return status, out.out, out.err


def test_evaluate_prints_and_saves_the_table(saved, capsys):
    status, out, err = run_cli(capsys, "--base_model", saved.base, "--config", saved.config,
                               "--output_dir", saved.out, "--limit", 5)
    assert status == 0, err
    header = next(line for line in out.splitlines() if line.startswith("adapter"))
    assert header.split() == ["adapter", "metric", "arc-c", "arc-e", "boolq", "avg"]
    assert "chat" not in out  # instruction data has nothing to score

    doc = json.loads((saved.out / "_mlora" / "eval_results_limit5.json").read_text())
    assert (doc["model"], doc["split"], doc["limit"]) == (saved.base, "eval", 5)
    got = {(r["adapter"], r["task"]): r for r in doc["results"]}
    assert list(got) == [("arc_c_0", "arc-c"), ("multi", "arc-e"), ("multi", "boolq")]
    assert [(r["protocol"], r["split"], r["items"]) for r in got.values()] == [
        ("choice", "test", 5), ("loglikelihood", "test", 5), ("loglikelihood", "validation", 5)]
    # acc_norm where lm-eval reports it: not under choice, nor for boolq (lm-eval scores it by acc only).
    assert got["arc_c_0", "arc-c"]["acc_norm"] is None and got["multi", "boolq"]["acc_norm"] is None
    assert got["multi", "arc-e"]["acc_norm"] is not None

    # The adapters read back from their folders score as the ones still in memory.
    memory = evaluate_adapters(saved.model, word_tokenizer(), saved.cfgs, limit=5, simultaneous=2)
    for r in memory.tasks:
        assert got[r.adapter, r.task]["acc"] == pytest.approx(r.acc)
        assert got[r.adapter, r.task]["correct"] == r.correct
    multi = [r for r in memory.tasks if r.adapter == "multi"]
    assert doc["averages"][1]["acc"] == pytest.approx(sum(r.acc for r in multi) / 2)

    rows = list(csv.DictReader((saved.out / "_mlora" / "eval_results_limit5.csv").open()))
    assert [(r["adapter"], r["task"]) for r in rows] == [*got, ("arc_c_0", "average"), ("multi", "average")]
    assert f"{saved.out / '_mlora' / 'eval_results_limit5.json'}" in out


def test_adapter_base_scores_the_bare_model_on_the_configs_tasks(saved, capsys):
    status, out, err = run_cli(capsys, "--base_model", saved.base, "--config", saved.config,
                               "--output_dir", saved.out, "--adapter", "base", "--limit", 4)
    assert status == 0, err
    doc = json.loads((saved.out / "_mlora" / "eval_results_base_limit4.json").read_text())
    # Each task under the protocol of the adapter that has it, so the rows compare.
    assert [(r["adapter"], r["task"], r["protocol"]) for r in doc["results"]] == [
        (BASE, "arc-c", "choice"), (BASE, "arc-e", "loglikelihood"), (BASE, "boolq", "loglikelihood")]
    assert doc["averages"][0]["protocol"] == "choice+loglikelihood" and doc["averages"][0]["acc_norm"] is None
    norm_line = next(line for line in out.splitlines() if line.split()[:1] == ["acc_norm"])
    assert norm_line.split()[1] == "-"  # arc-c, scored by letter, has no acc_norm
    bare = MultiAdapterModel(tiny_model())
    expected = evaluate(bare, word_tokenizer(), [base_spec(saved.cfgs)], limit=4)
    assert [r["correct"] for r in doc["results"]] == [r.correct for r in expected.tasks]


def test_protocol_flag_overrides_the_adapters_own(saved, capsys):
    status, _, err = run_cli(capsys, "--base_model", saved.base, "--config", saved.config, "--output_dir",
                             saved.out, "--adapter", "multi", "--protocol", "choice", "--limit", 3)
    assert status == 0, err
    doc = json.loads((saved.out / "_mlora" / "eval_results_multi_choice_limit3.json").read_text())
    assert [(r["adapter"], r["protocol"], r["acc_norm"]) for r in doc["results"]] == [
        ("multi", "choice", None), ("multi", "choice", None)]


def test_evaluate_run_loads_the_folders_and_leaves_the_model_as_found(saved):
    model = MultiAdapterModel(tiny_model())
    lines = []
    results = evaluate_run(model, word_tokenizer(), load_config(saved.config), saved.out, "tiny", adapters=["multi"],
                           limit=3, stem="loaded", progress=False, echo=lines.append)
    assert model.configs == {}
    memory = evaluate_adapters(saved.model, word_tokenizer(), saved.cfgs[1:2], limit=3)
    for got, want in zip(results.tasks, memory.tasks):
        for a, b in zip(got.scores, want.scores):
            assert a == pytest.approx(b, abs=1e-5)
    assert (saved.out / "_mlora" / "loaded.json").is_file() and lines[0].startswith("evaluation:")


def test_after_training_only_finished_benchmark_adapters_are_scored(saved, tmp_path):
    extra = write_config(tmp_path / "c.json", [*ADAPTERS, adapter("broken", "arc-e")])
    status = {"arc_c_0": "finished", "multi": "failed", "chat": "finished", "broken": "interrupted"}
    summary = SimpleNamespace(output_dir=saved.out, model=MultiAdapterModel(tiny_model()), tokenizer=word_tokenizer(),
                              adapters={n: SimpleNamespace(name=n, status=s) for n, s in status.items()})
    results = evaluate_trained(summary, load_config(extra), "tiny", echo=lambda _: None)
    assert results.adapters == ["arc_c_0"]
    summary.adapters["arc_c_0"].status = "failed"
    assert evaluate_trained(summary, load_config(extra), "tiny", echo=lambda _: None) is None


def test_run_trains_then_scores(saved, tmp_path, capsys):
    config = write_config(tmp_path / "run.json", [adapter("arc_e_0", "arc-e", batch_size=4, micro_batch_size=2,
                                                          num_epochs=1)], cutoff_len=64)
    status = main(["run", "--config", config, "--base_model", saved.base, "--output_dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert status == 0
    doc = json.loads((tmp_path / "out" / "_mlora" / "eval_results.json").read_text())
    assert [(r["adapter"], r["task"], r["items"]) for r in doc["results"]] == [("arc_e_0", "arc-e", 8)]
    assert "adapter  metric" in out


# ----------------------------------------------------------------------------------- errors


def assert_user_error(status, err, *fragments):
    assert status == 2
    for fragment in fragments:
        assert fragment in err, err


def test_unknown_adapter_name(saved, capsys):
    status, _, err = run_cli(capsys, "--base_model", saved.base, "--config", saved.config,
                             "--output_dir", saved.out, "--adapter", "arc_c")
    assert_user_error(status, err, "unknown adapter 'arc_c' (did you mean arc_c_0?)", "'base'")


def test_adapter_without_benchmark_tasks(saved, capsys):
    status, _, err = run_cli(capsys, "--base_model", saved.base, "--config", saved.config,
                             "--output_dir", saved.out, "--adapter", "chat")
    assert_user_error(status, err, "chat (casual) has no benchmark task")


def test_config_without_benchmark_tasks(saved, tmp_path, capsys):
    config = write_config(tmp_path / "chat.json", ADAPTERS[2:])
    for extra in ([], ["--adapter", "base"]):
        status, _, err = run_cli(capsys, "--base_model", saved.base, "--config", config,
                                 "--output_dir", saved.out, *extra)
        assert_user_error(status, err, "no adapter in the config has a benchmark task")


def test_missing_adapter_folder_is_named_before_the_model_loads(saved, tmp_path, capsys):
    config = write_config(tmp_path / "more.json", [*ADAPTERS, adapter("untrained", "arc-e")])
    status, _, err = run_cli(capsys, "--base_model", tmp_path / "no-model", "--config", config,
                             "--output_dir", saved.out)
    assert_user_error(status, err, f"no saved adapter in {saved.out / 'untrained'}", "launch.py run")


def test_missing_base_model_and_bad_flags(saved, tmp_path, capsys):
    status, _, err = run_cli(capsys, "--config", saved.config, "--output_dir", saved.out)
    assert_user_error(status, err, "--base_model is required")
    status, _, err = run_cli(capsys, "--base_model", tmp_path / "nothing", "--config", saved.config,
                             "--output_dir", saved.out)
    assert_user_error(status, err, "does not exist")
    status, _, err = run_cli(capsys, "--base_model", saved.base, "--config", saved.config, "--limit", 0)
    assert_user_error(status, err, "--limit must be a positive number")
    status, _, err = run_cli(capsys, "--base_model", saved.base, "--config", tmp_path / "none.json")
    assert_user_error(status, err, "none.json")


def test_errors_in_a_real_process_have_no_traceback(saved):
    proc = subprocess.run([sys.executable, "launch.py", "evaluate", "--base_model", saved.base, "--config",
                           saved.config, "--output_dir", str(saved.root / "empty"), "--adapter", "arc_c_0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: no saved adapter in") and proc.stderr.count("\n") == 1


def test_a_limited_evaluation_never_replaces_the_full_results(saved, capsys):
    assert run_cli(capsys, "--config", saved.config, "--base_model", saved.base, "--output_dir", saved.out)[0] == 0
    full = (saved.out / "_mlora" / "eval_results.json").read_text()
    assert run_cli(capsys, "--config", saved.config, "--base_model", saved.base, "--output_dir", saved.out,
                   "--limit", 2)[0] == 0
    assert (saved.out / "_mlora" / "eval_results.json").read_text() == full
    limited = json.loads((saved.out / "_mlora" / "eval_results_limit2.json").read_text())
    assert {r["items"] for r in limited["results"]} == {2}
