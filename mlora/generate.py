"""One-shot generation with a saved adapter (the seed's ``generate.py`` interface)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate.py", description="Generate a completion with a trained adapter "
                                "(LoRA, DoRA, MixLoRA or MixDoRA) applied to its base model.")
    p.add_argument("--base_model", help="hub id, local folder or .gguf file (default: the one in the adapter config)")
    p.add_argument("--lora_weights", required=True, help="adapter folder (adapter_config.json + weights)")
    p.add_argument("--template", default="alpaca", help="prompt template: 'alpaca' or a template JSON file")
    p.add_argument("--instruction", required=True, help="the instruction to answer")
    p.add_argument("--input", default=None, help="optional input for the instruction")
    p.add_argument("--max_new_tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy and deterministic (default)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass when temperature > 0")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="base dtype (default fp32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return p


def generate(args) -> str:
    """Load the adapter, render the prompt, return the completion text (prompt excluded)."""
    import torch
    from transformers import AutoTokenizer

    from mlora.data import load_template
    from mlora.io import read_adapter_config
    from mlora.model.inference import MixLoraModelForCausalLM

    _, stored = read_adapter_config(args.lora_weights)
    model, _ = MixLoraModelForCausalLM.from_pretrained(args.lora_weights, base_model=args.base_model,
                                                       torch_dtype=args.dtype, device=args.device)
    tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path or args.base_model or stored)
    prompt = load_template(args.template).render(args.instruction, args.input)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    extra = dict(temperature=args.temperature, top_p=args.top_p) if sample else {}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=sample,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **extra)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mlora.io import AdapterFileError
    from mlora.model.loading import ModelLoadError

    try:
        print(generate(args))
    except (AdapterFileError, ModelLoadError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
