"""Models and adapters named by a Hugging Face Hub id: the one rule for when the Hub is asked.

    resolve_adapter("output/mixlora_0")             -> Path("output/mixlora_0")
    resolve_adapter("TUDB-Labs/alpaca-mixlora-7b")   -> <hub cache>/models--TUDB-Labs--alpaca-mixlora-7b/snapshots/<rev>

The rule (`local_files_only`): a local folder is used as it is; a hub id is read from the hub
cache alone (the hub libraries' own ``local_files_only=True``) when it is already there or when
HF_HUB_OFFLINE (or HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE) is set, and is otherwise loaded
the ordinary way, downloading into the cache. Nothing is probed and no library setting is
changed; a copy that is neither cached nor downloadable is a one-line error naming the id.
The cache is huggingface_hub's own (HF_HOME / HF_HUB_CACHE).

The base model loader (`mlora.model.loading.load_base_model`), the inference API and every
command that takes an adapter (`generate.py --lora_weights`) follow it, so an id works wherever
a folder does.
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

_TRUE = ("1", "on", "yes", "true")
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class AdapterNotFoundError(AdapterFileError):
    """An adapter is neither a local folder nor a repository in the hub cache or on the Hub."""


def offline_requested() -> bool:
    """True when the environment asks for no Hub access (read at call time, not at import)."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in _OFFLINE_VARIABLES)


def looks_like_hub_id(text: str) -> bool:
    """Whether `text` reads as a Hub repository id (``owner/name``), not as a path."""
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text and "--" not in text


def in_cache(repo_id: str, filename: str) -> bool:
    """Whether `filename` of model repository `repo_id` is in the hub cache (no request made)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)


def local_files_only(name_or_path: str | os.PathLike, filename: str = "config.json") -> bool:
    """The hub rule: whether loading `name_or_path` must read the hub cache only.

    Args:
        name_or_path: a local folder (False: it is used as it is) or a hub id.
        filename: a file every copy of the repository holds (``config.json`` for a model).
    Returns:
        True for a hub id that is already cached or when offline mode is on (HF_HUB_OFFLINE);
        pass it as ``local_files_only`` to ``from_pretrained`` / ``snapshot_download``.
    """
    text = os.fspath(name_or_path)
    if Path(text).expanduser().exists() or not looks_like_hub_id(text):
        return False
    return offline_requested() or in_cache(text, filename)


def not_loaded_reason(repo_id: str, err: BaseException) -> str:
    """Why hub id `repo_id` could not be loaded under the rule, on one line (after "could not load X: ")."""
    from huggingface_hub import constants

    if offline_requested():
        return (f"it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and offline mode is on "
                f"(HF_HUB_OFFLINE); download it where the Hub is reachable (`hf download {repo_id} --local-dir DIR`) "
                "and pass DIR")
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return (f"it is neither in the Hugging Face cache ({constants.HF_HUB_CACHE}) nor could it be downloaded "
            f"({first}); without network access, pass a local folder")


def resolve_adapter(name_or_path: str | os.PathLike) -> Path:
    """The local folder holding the adapter `name_or_path` names.

    Args:
        name_or_path: an adapter folder, or a Hub model id (``owner/name``) when no folder of
            that name exists.
    Returns:
        The folder itself, or the snapshot folder of the id in the hub cache (downloaded first
        when it is not cached and offline mode is off; see `local_files_only`).
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

    local = f"pass the path of a local adapter folder (one holding {ADAPTER_CONFIG} and the weights) instead"
    try:
        folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=ADAPTER_FILES,
                                                   local_files_only=local_files_only(repo_id, ADAPTER_CONFIG))
    except LocalEntryNotFoundError as err:
        cache = huggingface_hub.constants.HF_HUB_CACHE
        why = ("offline mode is on (HF_HUB_OFFLINE)" if offline_requested() else
               f"the Hub could not be reached ({str(err).splitlines()[0]})")
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
