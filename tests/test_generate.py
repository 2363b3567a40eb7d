"""generate.py: deterministic at temperature 0, actually uses the adapter, runs the MixLoRA
README's line as written (hub ids, m-LoRA's template path) and fails in one line, exit 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlora.generate import build_parser, generate, main
from mlora.io import save_adapter
from mlora.model.adapted import MultiAdapterModel
from tests.hub_cache import offline_hub, publish
from tests.model.helpers import lora_cfg, randomise_b
from tests.model.test_mixlora import moe_cfg
from tests.tiny import save_tiny, tiny_model, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    base = save_tiny(tiny_model(), word_tokenizer(), tmp / "base")
    out = {"base": base}
    for name, cfg, std in [("zero", lora_cfg("zero"), 0.0), ("lora", lora_cfg("lora"), 1.0),
                           ("moe", moe_cfg("moe", router_init_range=1.0), 1.0)]:
        model = MultiAdapterModel(tiny_model())
        model.add_adapter(cfg, seed=1)
        randomise_b(model, name, std=std)
        out[name] = save_adapter(model, name, tmp / name, base_model_name_or_path=base)
    return out


def run(folder, instruction="what is the cat", **kwargs):
    argv = ["--lora_weights", str(folder), "--instruction", instruction, "--max_new_tokens", "8"]
    for key, value in kwargs.items():
        argv += [f"--{key}", str(value)]
    return generate(build_parser().parse_args(argv))


def test_greedy_generation_is_deterministic_and_uses_the_adapter(folders):
    first, second = run(folders["lora"]), run(folders["lora"])
    assert first == second and first.strip()
    assert run(folders["zero"]) != first
    assert run(folders["moe"]) == run(folders["moe"])


def test_sampling_follows_the_seed(folders):
    a = run(folders["lora"], temperature=1.5, seed=3)
    assert a == run(folders["lora"], temperature=1.5, seed=3)
    others = {run(folders["lora"], temperature=1.5, seed=s) for s in range(4, 8)}
    assert len(others | {a}) > 1


def command(*args, cwd, hf_home):
    """generate.py as a user runs it: its own process, offline, HF_HOME from the environment."""
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, check=False)


def test_the_mixlora_readme_line_runs_as_written(folders, tmp_path):
    # The README's line with its template path, from a folder that holds no template/ folder, with
    # the adapter and the base model named by hub ids served from a local hub cache.
    hf_home = tmp_path / "hf"
    publish(hf_home, "owner/tiny-base", Path(folders["base"]))
    publish(hf_home, "owner/mixlora-tiny", folders["moe"])
    done = command("--base_model", "owner/tiny-base", "--lora_weights", "owner/mixlora-tiny",
                   "--template", "template/alpaca.json", "--instruction", "What is m-LoRA?",
                   "--max_new_tokens", "8", cwd=tmp_path, hf_home=hf_home)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == run(folders["moe"], "What is m-LoRA?", template="alpaca")
    assert done.stdout.strip()
    assert "template/alpaca.json does not exist; using the built-in 'alpaca' template" in done.stderr


@pytest.mark.parametrize("args, message", [
    (["--lora_weights", "{tmp}/nope"], "adapter folder {tmp}/nope does not exist"),
    (["--lora_weights", "owner/not-cached"], "'owner/not-cached' is not a local folder and is not in the Hugging"),
    (["--lora_weights", "{lora}", "--template", "template/vicuna.json"], "'template/vicuna.json' is neither"),
    (["--lora_weights", "{lora}", "--base_model", "{tmp}/no-base"], "base model folder {tmp}/no-base does not exist"),
])
def test_errors_are_one_line_exit_2(folders, tmp_path, monkeypatch, capsys, args, message, no_network):
    offline_hub(monkeypatch, tmp_path / "hf")
    fill = {"tmp": tmp_path, "lora": folders["lora"]}
    assert main([a.format(**fill) for a in args] + ["--instruction", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message.format(**fill) in err
    assert no_network == []


def test_command_line_error_has_no_traceback(tmp_path):
    done = command("--lora_weights", "owner/not-cached", "--instruction", "hi", cwd=tmp_path, hf_home=tmp_path / "hf")
    assert done.returncode == 2
    assert "'owner/not-cached' is not a local folder" in done.stderr and "Traceback" not in done.stderr
