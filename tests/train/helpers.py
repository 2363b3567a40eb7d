"""Builders for the trainer tests: small data sets, configs, and reading outputs back."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from mlora.config import config_from_dict
from mlora.run_folder import BOOKKEEPING, open_run_folder
from mlora.train import TrainOptions, run_training

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

# A learnable instruction task in the tiny tokenizer's vocabulary: "what is the X" -> Y.
PAIRS = [("sky", "blue"), ("fire", "red"), ("tree", "green"), ("sun", "hot"),
         ("moon", "night"), ("water", "cold"), ("cat", "dog"), ("fish", "water")]
OTHER_PAIRS = [("big", "small"), ("fast", "slow"), ("up", "down"), ("left", "right"),
               ("day", "night"), ("eat", "food"), ("run", "walk"), ("yes", "no")]


# A short prompt template in the tiny vocabulary, so the question sits close to the answer.
TEMPLATE = {"prompt_input": "### instruction :\n{instruction}\n### input :\n{input}\n### response :\n",
            "prompt_no_input": "### instruction :\n{instruction}\n### response :\n",
            "response_split": "### response :"}


def write_template(folder: Path) -> str:
    path = Path(folder) / "template.json"
    path.write_text(json.dumps(TEMPLATE))
    return str(path)


def write_pairs(folder: Path, pairs=PAIRS, name: str = "pairs.json") -> str:
    """Alpaca-style records "what is the X" -> "Y" as a JSON file; returns its path."""
    records = [{"instruction": f"what is the {a}", "input": "", "output": b} for a, b in pairs]
    path = Path(folder) / name
    path.write_text(json.dumps(records))
    return str(path)


def adapter(name: str, data: str, **overrides) -> dict:
    """A small LoRA adapter dict on instruction data (dropout 0: deterministic)."""
    a = {"name": name, "task_name": "casual", "data": data, "lr": 1e-2, "batch_size": 4, "micro_batch_size": 2,
         "num_epochs": 2, "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
         "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}
    return {**a, **overrides}


def run_config(adapters: list[dict], **run_level):
    settings = {"cutoff_len": 64, "save_step": 0, "train_lora_candidate_num": 2, "train_lora_simultaneously_num": 2}
    return config_from_dict({**settings, **run_level, "lora": adapters})


def train(config, base: str, out: Path, **options):
    """`run_training` with the progress bar off."""
    return run_training(config, TrainOptions(base_model=base, output_dir=out, progress=False, **options))


def checkpoint_paths(out: Path) -> list[Path]:
    """The run's checkpoint folders under `out`, oldest first."""
    from mlora.train.checkpoint import checkpoints

    with open_run_folder(out) as folder:
        return [cp.path for cp in checkpoints(folder)]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter folder."""
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def metrics(out: Path, name: str) -> list[dict]:
    path = Path(out) / BOOKKEEPING / "logs" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
