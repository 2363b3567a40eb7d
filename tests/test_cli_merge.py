"""launch.py merge: a plain transformers model whose logits equal the adapter's."""

import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from mlora import MixLoraModelForCausalLM
from mlora.io import save_adapter
from mlora.model.adapted import MultiAdapterModel
from tests.model.helpers import lora_cfg, randomise_b
from tests.model.test_mixlora import moe_cfg
from tests.tiny import save_tiny, tiny_model, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def launch(*argv):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *argv], capture_output=True, text=True, cwd=ROOT)


def test_merge_writes_a_plain_model_with_the_adapters_logits(tmp_path):
    base = save_tiny(tiny_model(), word_tokenizer(), tmp_path / "base")
    model = MultiAdapterModel(tiny_model())
    model.add_adapter(lora_cfg("d", use_dora=True), seed=0)
    randomise_b(model, "d")
    save_adapter(model, "d", tmp_path / "d", base_model_name_or_path=base)
    done = launch("merge", "--adapter", str(tmp_path / "d"), "--output_dir", str(tmp_path / "merged"))
    assert done.returncode == 0, done.stderr
    ids = torch.randint(4, 90, (2, 6))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapted, _ = MixLoraModelForCausalLM.from_pretrained(tmp_path / "d")
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()


def test_merge_refuses_mixlora_and_missing_folders(tmp_path):
    model = MultiAdapterModel(tiny_model())
    model.add_adapter(moe_cfg("m"), seed=0)
    save_adapter(model, "m", tmp_path / "m", base_model_name_or_path="x")
    done = launch("merge", "--adapter", str(tmp_path / "m"), "--output_dir", str(tmp_path / "out"))
    assert done.returncode == 2 and "routed experts cannot be folded" in done.stderr
    done = launch("merge", "--adapter", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out"))
    assert done.returncode == 2 and "does not exist" in done.stderr and "Traceback" not in done.stderr


def saved_lora(tmp_path):
    base = save_tiny(tiny_model(), word_tokenizer(), tmp_path / "base")
    model = MultiAdapterModel(tiny_model())
    model.add_adapter(lora_cfg("d"), seed=0)
    randomise_b(model, "d")
    save_adapter(model, "d", tmp_path / "d", base_model_name_or_path=base)
    return Path(base)


def test_merge_never_writes_into_the_base_models_folder(tmp_path):
    base = saved_lora(tmp_path)
    before = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    for flags in ([], ["--overwrite"]):
        done = launch("merge", "--adapter", str(tmp_path / "d"), "--base_model", str(base), "--output_dir",
                      str(base), *flags)
        assert done.returncode == 2 and "base model's own folder" in done.stderr and "Traceback" not in done.stderr
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()} == before


def test_merge_into_a_non_empty_folder_needs_overwrite(tmp_path):
    saved_lora(tmp_path)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    done = launch("merge", "--adapter", str(tmp_path / "d"), "--output_dir", str(out))
    assert done.returncode == 2 and "is not empty" in done.stderr and "--overwrite" in done.stderr
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    done = launch("merge", "--adapter", str(tmp_path / "d"), "--output_dir", str(out), "--overwrite")
    assert done.returncode == 0, done.stderr
    assert (out / "notes.txt").read_text() == "the user's" and (out / "config.json").is_file()


def test_truncated_adapter_weights_are_a_one_line_error(tmp_path):
    saved_lora(tmp_path)
    weights = tmp_path / "d" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    done = launch("merge", "--adapter", str(tmp_path / "d"), "--output_dir", str(tmp_path / "merged"))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "damaged or truncated" in errors[0]
    assert "Traceback" not in done.stderr
