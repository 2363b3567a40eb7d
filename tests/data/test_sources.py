"""Local files and folders in every format, and the Hub path, which is never reached: it is
tested offline (an empty cache) and with `datasets.load_dataset` replaced."""

import json
import time

import datasets
import datasets.config
import huggingface_hub.constants
import pyarrow
import pyarrow.parquet
import pytest

from mlora.data import DataError, build_training_examples, load_items

PIQA_ROWS = [
    {"goal": "To cool soup,", "sol1": "stir it in a wide bowl.", "sol2": "cover it with a blanket.", "label": 0},
    {"goal": "To find a lost key,", "sol1": "shout at the door.", "sol2": "retrace your steps.", "label": 1},
    {"goal": "To fold a shirt,", "sol1": "lay it flat first.", "sol2": "crumple it up.", "label": 0},
]
ARC_ROWS = [
    {
        "id": "x1", "question": "Pick one.",
        "choices": {"text": ["red", "blue", "green"], "label": ["A", "B", "C"]}, "answerKey": "C",
    },
    {
        "id": "x2", "question": "Pick two.",
        "choices": {"text": ["a", "b", "c", "d", "e"], "label": ["1", "2", "3", "4", "5"]}, "answerKey": "2",
    },
]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)


def _piqa_answers(items):
    return [(item.loglikelihood.contexts[0], item.answer) for item in items]


PIQA_EXPECTED = [
    ("Question: To cool soup,\nAnswer:", 0),
    ("Question: To find a lost key,\nAnswer:", 1),
    ("Question: To fold a shirt,\nAnswer:", 0),
]


# ----------------------------------------------------------------------------- formats


def test_jsonl_file_and_folder(tmp_path):
    _write_jsonl(tmp_path / "validation.jsonl", PIQA_ROWS)
    assert _piqa_answers(load_items("piqa", "eval", tmp_path)) == PIQA_EXPECTED
    assert _piqa_answers(load_items("piqa", "validation", tmp_path / "validation.jsonl")) == PIQA_EXPECTED


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_file_in_another_encoding_names_the_file_and_the_encoding(tmp_path, suffix):
    path = tmp_path / f"validation{suffix}"
    text = "goal,sol1,sol2,label\ncaf\u00e9,a,b,0\n" if suffix == ".csv" else json.dumps({"goal": "caf\u00e9"},
                                                                                        ensure_ascii=False)
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=rf"validation\{suffix}: not UTF-8 text \(byte 0xe9.*convert it"):
        load_items("piqa", "eval", path)


@pytest.mark.parametrize(
    "content",
    [
        PIQA_ROWS,  # a list of records
        {"data": PIQA_ROWS},  # records under one key
        {key: [row[key] for row in PIQA_ROWS] for key in PIQA_ROWS[0]},  # columns
    ],
)
def test_json_layouts(tmp_path, content):
    (tmp_path / "validation.json").write_text(json.dumps(content), encoding="utf-8")
    assert _piqa_answers(load_items("piqa", "eval", tmp_path)) == PIQA_EXPECTED


def test_json_file_holding_json_lines(tmp_path):
    _write_jsonl(tmp_path / "validation.json", PIQA_ROWS)
    assert _piqa_answers(load_items("piqa", "eval", tmp_path)) == PIQA_EXPECTED


def test_parquet_with_nested_choices(tmp_path):
    _write_parquet(tmp_path / "test.parquet", ARC_ROWS)
    first, second = load_items("arc-c", "eval", tmp_path)
    assert first.labels == ("A", "B", "C") and first.answer == 2
    assert second.labels == ("A", "B", "C", "D", "E") and second.answer == 1
    assert second.prompt == "Question: Pick two.\nA. a\nB. b\nC. c\nD. d\nE. e\nAnswer:"


def test_csv_cells_are_text(tmp_path):
    (tmp_path / "test.csv").write_text(
        "question,choices,answerKey\n"
        'Pick one.,"{""text"": [""red"", ""blue"", ""green""], ""label"": [""A"", ""B"", ""C""]}",C\n'
        "Pick two.,\"{'text': ['a', 'b', 'c', 'd'], 'label': ['1', '2', '3', '4']}\",2\n",
        encoding="utf-8",
    )
    first, second = load_items("arc-c", "eval", tmp_path)
    assert (first.labels, first.answer) == (("A", "B", "C"), 2)
    assert (second.labels, second.answer) == (("A", "B", "C", "D"), 1)
    (tmp_path / "validation.csv").write_text(
        "question,passage,answer\nis it so,It is so.,True\nis it not,It is not.,false\n", encoding="utf-8"
    )
    assert [item.answer for item in load_items("boolq", "eval", tmp_path)] == [0, 1]
    (tmp_path / "train.csv").write_text("goal,sol1,sol2,label\nTo go,walk,fly,1\nTo stay,sit,run,3\n", encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_items("piqa", "train", tmp_path)
    expected = f"{tmp_path / 'train.csv'} row 2: field 'label' is '3', out of range (expected one of 0, 1)"
    assert expected in str(caught.value)


def test_shards_and_hub_snapshot_layouts(tmp_path):
    _write_parquet(tmp_path / "ARC-Challenge" / "test-00000-of-00002.parquet", ARC_ROWS[:1])
    _write_parquet(tmp_path / "ARC-Challenge" / "test-00001-of-00002.parquet", ARC_ROWS[1:])
    assert [item.answer for item in load_items("arc-c", "eval", tmp_path)] == [2, 1]
    _write_parquet(tmp_path / "piqa_copy" / "data" / "validation-00000-of-00001.parquet", PIQA_ROWS)
    assert _piqa_answers(load_items("piqa", "eval", tmp_path / "piqa_copy")) == PIQA_EXPECTED


def test_split_aliases_in_file_names(tmp_path):
    _write_jsonl(tmp_path / "dev.jsonl", PIQA_ROWS)
    assert len(load_items("piqa", "eval", tmp_path)) == 3


def test_single_file_holds_the_split_its_name_says(tmp_path):
    _write_jsonl(tmp_path / "piqa_val.jsonl", PIQA_ROWS)
    assert len(load_items("piqa", "eval", tmp_path / "piqa_val.jsonl")) == 3
    with pytest.raises(DataError, match="holds the 'validation' split"):
        load_items("piqa", "train", tmp_path / "piqa_val.jsonl")
    _write_jsonl(tmp_path / "mine.jsonl", PIQA_ROWS)
    assert len(build_training_examples("piqa", tmp_path / "mine.jsonl")) == 3  # no split named: train
    with pytest.raises(DataError, match="holds the 'train' split"):
        load_items("piqa", "eval", tmp_path / "mine.jsonl")


# ----------------------------------------------------------------------------- local errors


def test_missing_split_lists_what_is_there(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", PIQA_ROWS)
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(DataError) as caught:
        load_items("piqa", "eval", tmp_path)
    text = str(caught.value)
    assert f"piqa: no 'validation' split in {tmp_path}" in text
    assert "found train.jsonl." in text


def test_missing_path_and_unsupported_file(tmp_path):
    with pytest.raises(DataError, match="data path './no/such/train.jsonl' does not exist"):
        load_items("piqa", "train", "./no/such/train.jsonl")
    (tmp_path / "train.txt").write_text("goal")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_items("piqa", "train", tmp_path / "train.txt")


def test_broken_json_line_is_located(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(PIQA_ROWS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"{path} line 2: not valid JSON"):
        load_items("piqa", "train", tmp_path)


# ----------------------------------------------------------------------------- the Hub


def _hub_mode(monkeypatch, offline: bool) -> None:
    """Offline mode on or off as a user's shell sets it: the environment, and the settings the hub
    libraries read from it when they were imported (before this test)."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", offline)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture
def offline(monkeypatch):
    _hub_mode(monkeypatch, True)


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace `datasets.load_dataset`; records each call and the offline settings it saw."""
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append({
            "path": path, "name": name, "split": split, "kwargs": kwargs,
            "offline": (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE),
        })
        return datasets.Dataset.from_list(PIQA_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_offline_hub_error_says_how_to_use_a_local_copy(monkeypatch, tmp_path, offline, no_network):
    # An empty cache: the real loader, offline, must give up at once and open no connection.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    start = time.monotonic()
    with pytest.raises(DataError) as caught:
        load_items("arc-c", "eval")
    assert time.monotonic() - start < 30
    text = str(caught.value)
    assert "arc-c: could not load the dataset 'allenai/ai2_arc' (subset 'ARC-Challenge'), split 'test'" in text
    assert "offline mode is on (HF_HUB_OFFLINE)" in text
    assert '"data": "path/to/folder"' in text
    assert "--data_path path/to/folder" in text
    assert no_network == []


def test_hub_call_arguments(fake_hub, offline):
    assert _piqa_answers(load_items("piqa", "eval")) == PIQA_EXPECTED
    load_items("piqa", "train", trust_remote_code=True)
    load_items("piqa", "train", "someone/piqa-mirror:clean")
    assert [(c["path"], c["name"], c["split"], c["kwargs"]) for c in fake_hub] == [
        ("ybisk/piqa", None, "validation", {}),
        ("ybisk/piqa", None, "train", {"trust_remote_code": True}),
        ("someone/piqa-mirror", "clean", "train", {}),
    ]


def test_hub_subset_follows_the_dataset(fake_hub, offline):
    for data in ("allenai/ai2_arc", "mirror/arc"):
        with pytest.raises(DataError):  # PIQA rows do not parse as ARC; only the call matters here
            load_items("arc-c", "train", data)
    assert [(c["path"], c["name"]) for c in fake_hub] == [("allenai/ai2_arc", "ARC-Challenge"), ("mirror/arc", None)]


@pytest.mark.parametrize("mode", [False, True], ids=["online", "offline"])
def test_offline_mode_is_the_libraries_own_setting(monkeypatch, fake_hub, no_network, mode):
    """mlora neither probes the Hub nor changes a library's offline setting: `datasets` loads
    under the mode the environment gave it (and, offline, reads its cache alone)."""
    _hub_mode(monkeypatch, mode)
    load_items("piqa", "eval")
    assert [call["offline"] for call in fake_hub] == [(mode, mode)]
    assert no_network == []
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == (mode, mode)


@pytest.mark.parametrize("mode", [False, True], ids=["online", "offline"])
def test_hub_failure_is_a_data_error(monkeypatch, mode):
    _hub_mode(monkeypatch, mode)

    def load_dataset(*args, **kwargs):
        raise ConnectionError("boom")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError) as caught:
        load_items("siqa", "eval", "data/siqa")
    text = str(caught.value)
    assert "could not load the dataset 'data/siqa', split 'validation'" in text
    assert "There is no local file or folder 'data/siqa' either." in text
    # Why: offline mode when it is on, else the library's own error.
    assert ("offline mode is on (HF_HUB_OFFLINE)" if mode else "ConnectionError: boom") in text
    assert isinstance(caught.value.__cause__, ConnectionError)
