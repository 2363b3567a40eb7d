"""Built-in sample data: generated multiple-choice items in the real benchmark schemas.

The quickstart needs data that ships with the package and that a small model can learn in
a few dozen steps, so that training visibly moves the scores above the base model's. The
items quiz an invented language ("Vell"): each invented word means one common English word.
No pretrained model knows the lexicon (the base model scores near chance), and every item
exercises the same lexicon, so the adapters can learn it. Rows follow the hub schemas of
ARC-Easy (``question``, ``choices{text,label}``, ``answerKey``) and BoolQ (``question``,
``passage``, ``answer``), so they load through the ordinary task registry.

Generation is deterministic for a given seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LEXICON = {
    "zopple": "water", "mirv": "fire", "quenth": "stone", "brask": "bread", "dolv": "horse",
    "fennick": "music", "grol": "winter", "plimb": "silver", "sarn": "garden", "tovik": "candle",
    "wubbet": "river", "yarrin": "salt",
}
_QUESTIONS = (
    "In the Vell language, what does the word '{w}' mean?",
    "A Vell speaker says '{w}'. What are they talking about?",
    "Which thing is called '{w}' in Vell?",
)
_PASSAGE = "Vell is a language spoken by traders on a far northern coast. Its words sound nothing like English."
SAMPLE_TASKS = {"arc-e": "test", "boolq": "validation"}  # task -> its eval split


def _arc_rows(rng: random.Random, n: int) -> list[dict]:
    words, meanings = list(LEXICON), sorted(set(LEXICON.values()))
    rows = []
    for i in range(n):
        word = rng.choice(words)
        wrong = rng.sample([m for m in meanings if m != LEXICON[word]], 3)
        options = wrong + [LEXICON[word]]
        rng.shuffle(options)
        labels = ["A", "B", "C", "D"]
        rows.append({
            "id": f"vell-arc-{i}",
            "question": rng.choice(_QUESTIONS).format(w=word),
            "choices": {"text": options, "label": labels},
            "answerKey": labels[options.index(LEXICON[word])],
        })
    return rows


def _boolq_rows(rng: random.Random, n: int) -> list[dict]:
    words, meanings = list(LEXICON), sorted(set(LEXICON.values()))
    rows = []
    for _ in range(n):
        word = rng.choice(words)
        truth = rng.random() < 0.5
        meaning = LEXICON[word] if truth else rng.choice([m for m in meanings if m != LEXICON[word]])
        rows.append({"question": f"does the vell word {word} mean {meaning}", "passage": _PASSAGE, "answer": truth})
    return rows


def write_sample_data(folder: str | Path, *, n_train: int = 96, n_eval: int = 36, seed: int = 0) -> dict[str, Path]:
    """Write ``<folder>/<task>/{train,<eval split>}.jsonl`` for each sample task.

    Returns task name -> its folder (usable as an adapter's ``data``).
    """
    rng = random.Random(seed)
    out = {}
    for task, eval_split in SAMPLE_TASKS.items():
        make = _arc_rows if task == "arc-e" else _boolq_rows
        task_dir = Path(folder) / task
        task_dir.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), (eval_split, n_eval)):
            rows = make(rng, n)
            (task_dir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[task] = task_dir
    return out
