"""inference.py's start-up: every problem is one line with exit status 2 (checked before the model
loads where it can), 127.0.0.1 by default, no public share link."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mlora.web.server import DEFAULT_HOST, build_parser, main
from tests.hub_cache import offline_hub
from tests.model.helpers import lora_cfg
from tests.tiny import save_tiny, tiny_model, word_tokenizer
from tests.web.test_workspace import save

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    base = save_tiny(tiny_model(), word_tokenizer(), tmp / "base")
    other = save_tiny(tiny_model(), word_tokenizer(), tmp / "other")
    return {"lora": save(lora_cfg("lora"), tmp / "lora", base), "other": save(lora_cfg("other"), tmp / "o", other)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def failure(capsys, argv):
    """Run main(argv); it must fail with one line and exit status 2. Returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_defaults_are_local_and_private():
    args = build_parser().parse_args(["--lora_weights", "a", "b"])
    assert (args.host, args.port, args.template, args.lora_weights) == (DEFAULT_HOST, 7860, "alpaca", ["a", "b"])
    assert DEFAULT_HOST == "127.0.0.1"
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["--lora_weights", "a", "--share"])
    assert stop.value.code == 2


def test_a_port_in_use_is_named(adapters, capsys):
    pytest.importorskip("gradio")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = failure(capsys, ["--lora_weights", str(adapters["lora"]), "--port", str(port)])
    assert f"port {port} on 127.0.0.1 is in use" in err and "pass --port with a free one" in err


@pytest.mark.parametrize("args, message", [
    (["--lora_weights", "{tmp}/nope"], "adapter folder {tmp}/nope does not exist"),
    (["--lora_weights", "owner/not-cached"], "'owner/not-cached' is not a local folder and is not in the Hugging"),
    (["--lora_weights", "{lora}", "{other}"], "trained on different base models: lora names"),
    (["--lora_weights", "{lora}", "--template", "template/vicuna.json"], "'template/vicuna.json' is neither"),
    (["--lora_weights", "{lora}", "--base_model", "{tmp}/no-base"], "base model folder {tmp}/no-base does not exist"),
    (["--lora_weights", "{lora}", "--port", "70000"], "--port must be in 1..65535, got 70000"),
])
def test_bad_input_is_one_line_exit_2(adapters, tmp_path, monkeypatch, capsys, args, message):
    pytest.importorskip("gradio")
    offline_hub(monkeypatch, tmp_path / "hf")
    fill = {"tmp": tmp_path, "lora": adapters["lora"], "other": adapters["other"]}
    port = [] if "--port" in args else ["--port", str(free_port())]
    err = failure(capsys, [a.format(**fill) for a in args] + port)
    assert message.format(**fill) in err


def test_without_gradio_the_message_says_how_to_install_it(adapters, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    err = failure(capsys, ["--lora_weights", str(adapters["lora"]), "--port", str(free_port())])
    assert 'the web UI needs Gradio: pip install -e ".[web]"' in err


def test_the_command_prints_no_traceback(tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "inference.py"), "--lora_weights", "missing"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, check=False)
    assert done.returncode == 2
    assert "adapter folder missing does not exist" in done.stderr and "Traceback" not in done.stderr
