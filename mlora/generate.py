"""One-shot generation with a saved adapter (the seed's ``generate.py`` interface).

    python generate.py --lora_weights output/mixlora_0 --instruction "Name a colour."
    python generate.py --base_model B --lora_weights TUDB-Labs/alpaca-mixlora-7b \\
        --template template/alpaca.json --instruction "What is m-LoRA?"

The adapter is a folder or a Hub id (`mlora.hub.resolve_adapter`); the template is a built-in
name or a template file, and m-LoRA's ``template/alpaca.json`` means the built-in "alpaca" where
no such file exists (`mlora.data.load_template`). Every error the user can fix is printed as one
line with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from mlora.config import DTYPE_NAMES

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate.py", description="Generate a completion with a trained adapter "
                                "(LoRA, DoRA, MixLoRA or MixDoRA) applied to its base model.")
    p.add_argument("--base_model", help="hub id, local folder or .gguf file (default: the one in the adapter config)")
    p.add_argument("--lora_weights", required=True,
                   help="adapter folder (adapter_config.json + weights) or Hugging Face Hub id (owner/name)")
    p.add_argument("--template", default="alpaca",
                   help="prompt template: 'alpaca' or a template JSON file (a missing template/alpaca.json "
                        "means the built-in 'alpaca')")
    p.add_argument("--instruction", required=True, help="the instruction to answer")
    p.add_argument("--input", default=None, help="optional input for the instruction")
    p.add_argument("--max_new_tokens", type=int, default=128, help="tokens to generate (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy and deterministic (default)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass when temperature > 0")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES, help="base dtype (default fp32)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return p


def generate(args) -> str:
    """Load the adapter, render the prompt, return the completion text (prompt excluded)."""
    import torch
    from transformers import AutoTokenizer

    from mlora.data import load_template
    from mlora.hub import local_files_only
    from mlora.model.inference import MixLoraModelForCausalLM

    # The template first: a bad --template fails before a model is loaded.
    template = load_template(args.template)
    model, config = MixLoraModelForCausalLM.from_pretrained(args.lora_weights, base_model=args.base_model,
                                                            torch_dtype=args.dtype, device=args.device)
    base = config.base_model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=local_files_only(base))
    inputs = tokenizer(template.render(args.instruction, args.input), return_tensors="pt").to(model.device)
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    extra = {"temperature": args.temperature, "top_p": args.top_p} if sample else {}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=sample,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **extra)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mlora.errors import MloraError, one_line

    try:
        print(generate(args))
    except (MloraError, OSError) as err:
        # OSError: a file that cannot be read, or a tokenizer transformers cannot find.
        print(f"error: {one_line(err)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0
