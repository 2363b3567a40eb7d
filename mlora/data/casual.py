"""Instruction data (`task_name: "casual"`): alpaca records rendered through a prompt template.

Records are `{"instruction": ..., "input": ..., "output": ...}` with `input` optional (absent,
null or empty selects the template's no-input form). The training example is the rendered
prompt followed by `output`, with EOS appended by the tokenizer step.

Templates follow the alpaca-lora file layout: a JSON object with `prompt_input` (placeholders
`{instruction}` and `{input}`), `prompt_no_input` (`{instruction}`), `response_split` (the
marker after which a generated answer starts) and an optional `description`: the format of
m-LoRA's and MoE-PEFT's `template/*.json` files. The adapter's `prompt` value (and
`generate.py --template`) is "alpaca" (built in) or the path of such a file. A path whose file
does not exist but whose name is a built-in template's (`template/alpaca.json`, as m-LoRA's
configs and README commands write it) means that built-in template, with a note on stderr: the
built-in text is the file's, so those lines work from any working directory.
"""

from __future__ import annotations

import json
import logging
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlora.config import CASUAL_TASK  # m-LoRA's task_name for instruction data
from mlora.data import fields
from mlora.data.errors import DataError, RowError
from mlora.data.items import TrainingExample
from mlora.data.sources import RowChunk, parse_rows

logger = logging.getLogger("mlora.data")


@dataclass(frozen=True)
class PromptTemplate:
    """An instruction prompt template (see the module docstring for the fields)."""

    prompt_input: str
    prompt_no_input: str
    response_split: str
    description: str = ""

    def render(self, instruction: str, input: str | None = None) -> str:
        """The prompt for one record; `input` None or empty selects `prompt_no_input`."""
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)


# The Stanford Alpaca prompt, word for word: adapters trained on "alpaca" must see the exact
# text that alpaca-style models and tools (alpaca-lora, m-LoRA) use.
ALPACA = PromptTemplate(
    description="The Stanford Alpaca prompt.",
    prompt_input=(
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    prompt_no_input=(
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    ),
    response_split="### Response:",
)

BUILTIN_TEMPLATES = {"alpaca": ALPACA}

_PLACEHOLDERS = {"prompt_input": {"instruction", "input"}, "prompt_no_input": {"instruction"}}


def _placeholders(template: str, key: str, source: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise DataError(
            f"{source}: {key!r} is not a valid template ({exc}); write a literal brace as '{{{{' or '}}}}'."
        ) from None


def template_from_dict(content: Any, source: str) -> PromptTemplate:
    """Validate a parsed template file; every problem is reported at once."""
    if not isinstance(content, dict):
        raise DataError(f"{source}: a prompt template must be a JSON object, got {type(content).__name__}.")
    problems = []
    known = ("prompt_input", "prompt_no_input", "response_split", "description")
    for key in content:
        if key not in known:
            problems.append(f"unknown key {key!r} (known: {', '.join(known)})")
    for key in known[:3]:
        if not isinstance(content.get(key), str) or not content[key]:
            problems.append(f"{key!r} must be a non-empty string")
    if not isinstance(content.get("description", ""), str):
        problems.append("'description' must be a string")
    for key, wanted in _PLACEHOLDERS.items():
        if isinstance(content.get(key), str):
            found = _placeholders(content[key], key, source)
            if found != wanted:
                problems.append(
                    f"{key!r} uses placeholders {sorted(found)}, expected exactly "
                    + ", ".join("{" + name + "}" for name in sorted(wanted))
                )
    if problems:
        raise DataError(f"{source}: bad prompt template:\n  " + "\n  ".join(problems))
    return PromptTemplate(
        prompt_input=content["prompt_input"],
        prompt_no_input=content["prompt_no_input"],
        response_split=content["response_split"],
        description=content.get("description", ""),
    )


def load_template(prompt: str | None = None) -> PromptTemplate:
    """The template an adapter's `prompt` value names: None or "alpaca", or a JSON file path.

    A missing file named after a built-in template (``template/alpaca.json``) gives that
    template, with a note on stderr (see the module docstring).

    Raises:
        DataError: unknown name, missing or unreadable file, or a malformed template.
    """
    if prompt is None:
        return ALPACA
    if prompt in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[prompt]
    path = Path(prompt).expanduser()
    if not path.is_file() and path.suffix.lower() == ".json" and path.stem in BUILTIN_TEMPLATES:
        logger.warning("note: prompt template file %s does not exist; using the built-in %r template", prompt,
                       path.stem)
        return BUILTIN_TEMPLATES[path.stem]
    if not path.is_file():
        raise DataError(
            f"Prompt template {prompt!r} is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}) "
            "nor an existing JSON file; give \"prompt\": \"alpaca\" or the path of a template file."
        )
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the prompt template ({exc}).") from None
    return template_from_dict(content, str(path))


def instruction_example(row: Mapping[str, Any], template: PromptTemplate) -> TrainingExample:
    """One alpaca record -> (rendered prompt, output + EOS); raises `RowError` if malformed."""
    instruction = fields.text(row, "instruction")
    raw_input = row.get("input") if isinstance(row, Mapping) else None
    if raw_input is not None and not isinstance(raw_input, str):
        raise RowError(f"field 'input' should be a string, got {type(raw_input).__name__}")
    # The output is kept as written (code answers may start with indentation); only a
    # blank one is refused, since it would train nothing but EOS.
    output = fields.value(row, "output")
    if not isinstance(output, str) or not output.strip():
        raise RowError(f"field 'output' should be a non-empty string, got {output!r}")
    return TrainingExample(CASUAL_TASK, template.render(instruction, (raw_input or "").strip()), output, add_eos=True)


def instruction_examples(
    chunks: Sequence[RowChunk], template: PromptTemplate, limit: int | None = None
) -> list[TrainingExample]:
    """Examples from every row (up to `limit`), or a `DataError` listing the malformed rows."""
    return parse_rows(CASUAL_TASK, chunks, lambda row: instruction_example(row, template), limit)
