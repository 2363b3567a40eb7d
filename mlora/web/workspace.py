"""One base model loaded once, every adapter the user named applied to it, answers streamed.

    workspace = load_workspace(["output/"], base_model=None, template="alpaca")
    for panels in workspace.answer("Name a colour.", None, ["lora_0", "mixlora_1", "base"],
                                   GenerationSettings(max_new_tokens=32)):
        print({p.name: p.text for p in panels})

`--lora_weights` entries are adapter folders, Hub ids, or the output folder of a run (then every
adapter folder in it: each sub-folder holding ``adapter_config.json``; the run's ``_mlora``
bookkeeping is skipped). All adapters join one `MultiAdapterModel`, so switching between them
never reloads the base and the chosen ones answer in one batched generation
(`mlora.model.generation`). Every problem a user can fix raises `WebUIError` naming the folder,
the base model and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlora.errors import MloraError
from mlora.model.generation import GenerationSettings, TokenRouting, generate_rows

BASE = "base"  # the choice that answers with the bare base model


class WebUIError(MloraError):
    """A web UI request or start-up setting that cannot be served; the message says what to change."""


@dataclass
class Adapter:
    """One adapter served by the page.

    Attributes:
        name: its name on the page and in the model (unique, case-insensitively; ``base`` is taken).
        folder: the folder its files were read from.
        config: its `LoraConfig` or `MixLoraConfig`.
        named_base: the base model its ``adapter_config.json`` names (None when it names none).
    """

    name: str
    folder: Path
    config: object
    named_base: str | None

    @property
    def kind(self) -> str:
        """``LoRA``, ``DoRA``, ``MixLoRA`` or ``MixDoRA``."""
        moe = self.config.is_moe
        return ("Mix" if moe else "") + ("DoRA" if self.config.use_dora else "LoRA")

    @property
    def is_moe(self) -> bool:
        return self.config.is_moe


@dataclass
class Panel:
    """One answer as it stands after a generation step.

    Attributes:
        name: the adapter (or ``base``).
        text: the decoded answer so far (special tokens left out).
        tokens: its token texts, one per generated token (for the routing view's columns).
        routing: one `TokenRouting` per generated token (MixLoRA adapters; empty otherwise).
        finished: True once the answer ended (end-of-sequence or the token limit).
    """

    name: str
    text: str
    tokens: list[str] = field(default_factory=list)
    routing: list[TokenRouting] = field(default_factory=list)
    finished: bool = False


@dataclass
class Workspace:
    """The loaded base model (a `MultiAdapterModel`), its tokenizer, the adapters and the template."""

    model: object
    tokenizer: object
    adapters: dict[str, Adapter]
    template: object
    base_model: str

    @property
    def choices(self) -> list[str]:
        """What the page offers: ``base`` first, then every adapter in the order given."""
        return [BASE, *self.adapters]

    def prompt_ids(self, instruction: str, input: str | None = None) -> list[int]:
        """The token ids of the rendered prompt (the tokenizer's special tokens included, as in generate.py)."""
        return self.tokenizer(self.template.render(instruction, input or None)).input_ids

    def answer(self, instruction: str, input: str | None, choices: Sequence[str],
               settings: GenerationSettings) -> Iterator[list[Panel]]:
        """Answer `instruction` with every chosen adapter in one batched generation.

        Args:
            instruction: the instruction (required); input: the optional input.
            choices: adapter names and/or ``base``, one answer panel each, in this order.
            settings: the decoding settings shared by every row.
        Yields:
            After every generation step, one `Panel` per choice, in the order of `choices`.
        Raises:
            WebUIError: an empty instruction, no choice, an unknown choice, or bad settings.
        """
        if not instruction or not instruction.strip():
            raise WebUIError("type an instruction first")
        if not choices:
            raise WebUIError(f"choose at least one adapter (or {BASE}) to answer")
        unknown = [c for c in choices if c not in self.choices]
        if unknown:
            raise WebUIError(f"unknown adapter(s) {unknown}; this page serves {self.choices}")
        settings.check()
        ids = self.prompt_ids(instruction, input)
        rows = [None if c == BASE else c for c in choices]
        # The ids that end an answer: the model's generation config first, as transformers' generate().
        stops = self.model.model.generation_config.eos_token_id
        pieces = [[] for _ in rows]  # each row's token texts, decoded once each
        for states in generate_rows(self.model, [ids] * len(rows), rows, settings,
                                    eos_token_id=self.tokenizer.eos_token_id if stops is None else stops,
                                    pad_token_id=self.tokenizer.pad_token_id or 0):
            for texts, state in zip(pieces, states):
                texts.extend(self.tokenizer.decode([t]) for t in state.tokens[len(texts):])
            yield [Panel(name, self.tokenizer.decode(state.tokens, skip_special_tokens=True), list(texts),
                         state.routing, state.finished)
                   for name, state, texts in zip(choices, states, pieces)]


# ------------------------------------------------------------------------------- loading
def adapter_folders(given: Sequence[str]) -> list[tuple[str, Path]]:
    """``(name, folder)`` of every adapter that the ``--lora_weights`` entries name.

    An entry is an adapter folder, a Hub id (`mlora.hub.resolve_adapter`), or a run's output
    folder (every sub-folder holding ``adapter_config.json``, in name order). Names come from
    the folder (or the id) and are made unique by a ``-2``, ``-3`` ... suffix.

    Raises:
        AdapterNotFoundError: a folder does not exist and is not a Hub id that can be had.
        WebUIError: a folder that holds no adapter, neither itself nor in its sub-folders.
    """
    from mlora.hub import resolve_adapter
    from mlora.io import ADAPTER_CONFIG, default_name
    from mlora.run_folder import BOOKKEEPING

    found = []
    for entry in given:
        folder = resolve_adapter(entry)
        if (folder / ADAPTER_CONFIG).is_file():
            found.append((default_name(Path(os.fspath(entry))), folder))
            continue
        subfolders = sorted(p for p in folder.iterdir()
                            if p.is_dir() and p.name != BOOKKEEPING and (p / ADAPTER_CONFIG).is_file())
        if not subfolders:
            raise WebUIError(f"{entry} holds no {ADAPTER_CONFIG}, and none of its sub-folders does: give an adapter "
                             "folder, a Hub id, or the output folder of a run")
        found.extend((default_name(p), p) for p in subfolders)
    taken, named = {BASE}, []
    for name, folder in found:
        unique, n = name, 1
        while unique.lower() in taken:
            n += 1
            unique = f"{name}-{n}"
        taken.add(unique.lower())
        named.append((unique, folder))
    return named


def choose_base(adapters: Sequence[Adapter], base_model: str | None) -> str:
    """The base model to load: `base_model` when given, else the one every adapter names.

    Raises:
        WebUIError: no `base_model` and an adapter that names none, or adapters naming different bases.
    """
    if base_model:
        return base_model
    unnamed = [a for a in adapters if not a.named_base]
    if unnamed:
        raise WebUIError(f"adapter {unnamed[0].name} ({unnamed[0].folder}) names no base model in its "
                         "adapter_config.json; pass --base_model (a hub id, folder or .gguf file)")
    first = adapters[0]
    for other in adapters[1:]:
        if other.named_base != first.named_base:
            raise WebUIError(f"the adapters were trained on different base models: {first.name} names "
                             f"{first.named_base!r}, {other.name} names {other.named_base!r}; one page serves one "
                             "base model: start one page per base, or pass --base_model if both are the same model")
    return first.named_base


def load_workspace(lora_weights: Sequence[str], *, base_model: str | None = None, template: str = "alpaca",
                   dtype: str | None = None, device: str | None = None) -> Workspace:
    """Load the base model once and apply every adapter `lora_weights` names.

    Args:
        lora_weights: adapter folders, Hub ids or run output folders (see `adapter_folders`).
        base_model: hub id, folder or ``.gguf`` file; None: the base every adapter config names.
        template: prompt template, ``alpaca`` or a template file (`mlora.data.load_template`).
        dtype, device: as in `mlora.model.loading.load_base_model`.
    Raises:
        WebUIError, AdapterFileError, ModelLoadError, DataError: a missing or damaged adapter, an
            adapter that does not fit the base, bases that differ, a base or template that cannot
            be loaded; each message names the file and the fix.
    """
    from mlora.data import load_template
    from mlora.io import load_adapter, read_adapter_config
    from mlora.model.adapted import MultiAdapterModel
    from mlora.model.loading import load_base_model

    prompt = load_template(template)  # a bad --template fails before a model is loaded
    adapters = []
    for name, folder in adapter_folders(lora_weights):
        cfg, named_base = read_adapter_config(folder, name=name)
        adapters.append(Adapter(name, folder, cfg, named_base))
    base = choose_base(adapters, base_model)
    hf_model, tokenizer = load_base_model(base, dtype=dtype, device=device)
    model = MultiAdapterModel(hf_model)
    for adapter in adapters:
        try:
            load_adapter(model, adapter.folder, adapter.config)
        except MloraError as err:  # shapes or modules that differ: an adapter made for another base
            trained = f" (its config names {adapter.named_base})" if adapter.named_base not in (None, base) else ""
            raise WebUIError(f"adapter {adapter.name} ({adapter.folder}) cannot be applied to base model "
                             f"{base}{trained}: {err}") from err
    return Workspace(model.eval(), tokenizer, {a.name: a for a in adapters}, prompt, base)
