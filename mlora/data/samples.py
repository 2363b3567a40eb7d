"""Built-in sample data: generated multiple-choice items in the real benchmark schemas.

The quickstart needs data that ships with the package and that a small model can learn in
a few dozen steps, so that training visibly moves the scores above the base model's. The
items quiz an invented language ("Vell"): each invented word means one common English word.
No pretrained model knows the lexicon (the base model scores near chance), and every item
exercises the same lexicon, so the adapters can learn it: ARC-Easy rows ask for a word's
meaning, OpenBookQA rows for the word with a given meaning. Rows follow the hub schemas
(ARC: ``question``, ``choices{text,label}``, ``answerKey``; OpenBookQA: ``question_stem``,
``choices{text,label}``, ``answerKey``), so they load through the ordinary task registry.
(A yes/no form in BoolQ's schema stayed at chance for SmolLM2-135M after 40 steps, where
these two reached 100%; see docs/benchmarks.md.)

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
_REVERSE = (
    "Which Vell word means {m}?",
    "How do you say {m} in the Vell language?",
    "In Vell, the word for {m} is which of these?",
)
SAMPLE_TASKS = {"arc-e": "test", "obqa": "test"}  # task -> its eval split


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


def _obqa_rows(rng: random.Random, n: int) -> list[dict]:
    words = list(LEXICON)
    rows = []
    for i in range(n):
        word = rng.choice(words)
        options = rng.sample([w for w in words if w != word], 3) + [word]
        rng.shuffle(options)
        labels = ["A", "B", "C", "D"]
        rows.append({
            "id": f"vell-obqa-{i}",
            "question_stem": rng.choice(_REVERSE).format(m=LEXICON[word]),
            "choices": {"text": options, "label": labels},
            "answerKey": labels[options.index(word)],
        })
    return rows


def write_sample_data(folder: str | Path, *, n_train: int = 96, n_eval: int = 36, seed: int = 0,
                      write_text=None) -> dict[str, Path]:
    """Write ``<folder>/<task>/{train,<eval split>}.jsonl`` for each sample task.

    `write_text(path, text)` writes one file (default: create or replace it); the quickstart
    passes its run folder's, which replaces only files the program created.
    Returns task name -> its folder (usable as an adapter's ``data``).
    """
    rng = random.Random(seed)
    out = {}
    for task, eval_split in SAMPLE_TASKS.items():
        make = _arc_rows if task == "arc-e" else _obqa_rows
        task_dir = Path(folder) / task
        task_dir.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), (eval_split, n_eval)):
            rows = make(rng, n)
            path, text = task_dir / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows)
            if write_text is None:
                path.write_text(text, encoding="utf-8")
            else:
                write_text(path, text)
        out[task] = task_dir
    return out
