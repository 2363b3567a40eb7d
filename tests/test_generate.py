"""generate.py: deterministic at temperature 0 and actually uses the adapter."""

import subprocess
import sys
from pathlib import Path

import pytest

from mlora.generate import build_parser, generate
from mlora.io import save_adapter
from mlora.model.adapted import MultiAdapterModel
from tests.model.helpers import lora_cfg, randomise_b
from tests.model.test_mixlora import moe_cfg
from tests.tiny import save_tiny, tiny_model, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    base = save_tiny(tiny_model(), word_tokenizer(), tmp / "base")
    out = {}
    for name, cfg, std in [("zero", lora_cfg("zero"), 0.0), ("lora", lora_cfg("lora"), 1.0),
                           ("moe", moe_cfg("moe", router_init_range=1.0), 1.0)]:
        model = MultiAdapterModel(tiny_model())
        model.add_adapter(cfg, seed=1)
        randomise_b(model, name, std=std)
        out[name] = save_adapter(model, name, tmp / name, base_model_name_or_path=base)
    return out


def run(folder, **kwargs):
    argv = ["--lora_weights", str(folder), "--instruction", "what is the cat", "--max_new_tokens", "8"]
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


def test_command_line_errors_exit_2_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--lora_weights", str(tmp_path / "nope"),
                           "--instruction", "hi"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr
