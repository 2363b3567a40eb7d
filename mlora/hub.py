"""Adapters named by a Hugging Face Hub id: a local folder first, else the hub cache, else a download.

    resolve_adapter("output/mixlora_0")             -> Path("output/mixlora_0")
    resolve_adapter("TUDB-Labs/alpaca-mixlora-7b")   -> <hub cache>/models--TUDB-Labs--alpaca-mixlora-7b/snapshots/<rev>

The inference API and every command that takes an adapter (`generate.py --lora_weights`) go
through `resolve_adapter`, so an id works wherever a folder does. The Hub is used the way the
rest of mlora uses it (`mlora.data.sources` holds the rule): with HF_HUB_OFFLINE (or
HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE) set, or a Hub that does not answer, only the local
cache is read and nothing is requested, so a missing copy fails at once instead of after minutes
of retries. The cache is huggingface_hub's own (HF_HOME / HF_HUB_CACHE).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mlora.io import ADAPTER_CONFIG, BIN_FILE, SAFETENSORS_FILE, AdapterFileError

# An adapter repository is fetched without its other files (model cards, training logs ...).
ADAPTER_FILES = [ADAPTER_CONFIG, SAFETENSORS_FILE, BIN_FILE]

# "owner/name" as the Hub spells repository ids; anything else that is not a folder is a path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class AdapterNotFoundError(AdapterFileError):
    """An adapter is neither a local folder nor a repository in the hub cache or on the Hub."""


def looks_like_hub_id(text: str) -> bool:
    """Whether `text` reads as a Hub repository id (``owner/name``), not as a path."""
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text and "--" not in text


def hub_offline_reason() -> str | None:
    """Why the Hub must not be asked right now (offline mode or no answer), or None to ask it."""
    from mlora.data import sources

    if sources.offline_requested():
        return "offline mode is on (HF_HUB_OFFLINE)"
    if not sources.hub_reachable():
        return f"the Hub did not answer within {sources.HUB_PROBE_TIMEOUT_S:g} s"
    return None


def resolve_adapter(name_or_path: str | os.PathLike) -> Path:
    """The local folder holding the adapter `name_or_path` names.

    Args:
        name_or_path: an adapter folder, or a Hub model id (``owner/name``) when no folder of
            that name exists.
    Returns:
        The folder itself, or the snapshot folder of the id in the hub cache (downloaded first
        when the Hub is reachable and offline mode is off).
    Raises:
        AdapterNotFoundError: no such folder, and the id is not cached (offline) or not on the
            Hub; the message names it and says how to point at a local folder instead.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise AdapterNotFoundError(f"{text} is a file; an adapter is named by its folder (the one holding "
                                   f"{ADAPTER_CONFIG}) or by a Hub id (owner/name)")
    if not looks_like_hub_id(text):
        raise AdapterNotFoundError(f"adapter folder {text} does not exist (relative paths start at {Path.cwd()})")
    return _hub_snapshot(text)


def _hub_snapshot(repo_id: str) -> Path:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    reason = hub_offline_reason()
    local = f"pass the path of a local adapter folder (one holding {ADAPTER_CONFIG} and the weights) instead"
    try:
        folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=ADAPTER_FILES,
                                                   local_files_only=reason is not None)
    except LocalEntryNotFoundError as err:
        cache = huggingface_hub.constants.HF_HUB_CACHE
        why = reason or f"the Hub could not be reached ({str(err).splitlines()[0]})"
        raise AdapterNotFoundError(
            f"adapter {repo_id!r} is not a local folder and is not in the Hugging Face cache ({cache}), and {why}. "
            f"Download it where the Hub is reachable (`hf download {repo_id} --local-dir DIR`) and pass DIR, "
            f"or {local}") from err
    except RepositoryNotFoundError as err:
        raise AdapterNotFoundError(
            f"adapter {repo_id!r} is neither a local folder nor a model repository on the Hugging Face Hub "
            f"(a private or gated one needs `hf auth login`); check the id, or {local}") from err
    except Exception as err:  # the hub stack raises many types (HTTP, proxy, validation); all mean "not loaded"
        first = str(err).splitlines()[0] if str(err) else ""
        raise AdapterNotFoundError(f"could not fetch adapter {repo_id!r} from the Hugging Face Hub "
                                   f"({type(err).__name__}: {first}); {local}") from err
    return Path(folder)
