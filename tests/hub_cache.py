"""A Hugging Face hub cache built by hand, so hub ids resolve without any network.

The layout is huggingface_hub's own: ``<HF_HOME>/hub/models--owner--name/snapshots/<rev>/``
holding the files, and ``refs/main`` holding ``<rev>``. `huggingface_hub.constants` reads
HF_HOME and HF_HUB_OFFLINE once, at import; a test that sets them in-process therefore also sets
the two constants they become (`offline_hub`), while a subprocess sees the environment alone, as
a user's shell would give it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants

REVISION = "0123456789abcdef0123456789abcdef01234567"


def publish(hf_home: Path, repo_id: str, folder: str | Path) -> Path:
    """Copy `folder` into the hub cache under `hf_home` as model repository `repo_id`."""
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


def offline_hub(monkeypatch, hf_home: Path) -> Path:
    """Use `hf_home` as this test's HF_HOME with HF_HUB_OFFLINE=1; returns it."""
    hf_home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hf_home
