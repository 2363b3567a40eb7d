"""Hub ids: a local folder first; a cached id (or any, offline) read from the cache alone; else a download."""

import time

import huggingface_hub
import pytest
import transformers

from mlora.hub import AdapterNotFoundError, local_files_only, looks_like_hub_id, resolve_adapter
from mlora.io import AdapterFileError
from mlora.model.loading import ModelLoadError, load_base_model
from tests.hub_cache import offline_hub, publish
from tests.tiny import save_tiny, tiny_model, word_tokenizer


def online_cache(monkeypatch, hf_home):
    """`hf_home` as the hub cache with offline mode off (no HF_*_OFFLINE variable, the constant False)."""
    offline_hub(monkeypatch, hf_home)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return hf_home


@pytest.fixture
def adapter_files(tmp_path):
    folder = tmp_path / "made"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


@pytest.fixture
def calls(monkeypatch):
    """Record how snapshot_download is called (then call the real one)."""
    seen = []
    real = huggingface_hub.snapshot_download

    def recorded(repo_id, **kwargs):
        seen.append((repo_id, kwargs))
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recorded)
    return seen


def test_hub_ids_and_paths_are_told_apart():
    assert looks_like_hub_id("TUDB-Labs/alpaca-mixlora-7b") and looks_like_hub_id("o/n.v1_x")
    for path in ("output/mixlora_0/", "./o/n", "/o/n", "~/n", "a/b/c", "../x", "o/..", "mixlora_0", "o--p/n"):
        assert not looks_like_hub_id(path), path


def test_a_local_folder_wins_over_the_hub(tmp_path, monkeypatch, adapter_files, no_network, calls):
    hf_home = offline_hub(monkeypatch, tmp_path / "hf")
    publish(hf_home, "owner/ad", adapter_files)
    local = tmp_path / "work" / "owner" / "ad"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_adapter("owner/ad").resolve() == local
    assert resolve_adapter(adapter_files) == adapter_files
    assert calls == []


def test_offline_hub_id_comes_from_the_cache(tmp_path, monkeypatch, adapter_files, no_network, calls):
    snapshot = publish(offline_hub(monkeypatch, tmp_path / "hf"), "owner/ad", adapter_files)
    monkeypatch.chdir(tmp_path)
    folder = resolve_adapter("owner/ad")
    assert folder == snapshot and (folder / "adapter_config.json").is_file()
    assert calls[0][1]["local_files_only"] is True
    # Only the adapter's own files are ever fetched.
    assert set(calls[0][1]["allow_patterns"]) == {"adapter_config.json", "adapter_model.safetensors",
                                                  "adapter_model.bin"}


def test_a_cached_id_is_read_from_the_cache_with_offline_mode_off(tmp_path, monkeypatch, adapter_files, no_network,
                                                                  calls):
    snapshot = publish(online_cache(monkeypatch, tmp_path / "hf"), "owner/ad", adapter_files)
    monkeypatch.chdir(tmp_path)
    assert resolve_adapter("owner/ad") == snapshot
    assert calls[0][1]["local_files_only"] is True


def test_offline_without_a_cached_copy_says_how_to_use_a_folder(tmp_path, monkeypatch, no_network):
    offline_hub(monkeypatch, tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    with pytest.raises(AdapterNotFoundError) as caught:
        resolve_adapter("TUDB-Labs/alpaca-mixlora-7b")
    assert time.monotonic() - start < 10
    text = str(caught.value)
    assert "'TUDB-Labs/alpaca-mixlora-7b' is not a local folder and is not in the Hugging Face cache" in text
    assert str(tmp_path / "hf" / "hub") in text and "offline mode is on (HF_HUB_OFFLINE)" in text
    assert "hf download TUDB-Labs/alpaca-mixlora-7b --local-dir DIR" in text
    assert "pass the path of a local adapter folder" in text
    assert "\n" not in text
    # An adapter that cannot be found is an adapter file problem to every caller.
    assert isinstance(caught.value, AdapterFileError)


def test_missing_paths_and_files_are_named(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AdapterNotFoundError, match=f"adapter folder {tmp_path / 'nope'} does not exist"):
        resolve_adapter(tmp_path / "nope")
    with pytest.raises(AdapterNotFoundError, match="adapter folder output/run/mixlora_0 does not exist"):
        resolve_adapter("output/run/mixlora_0")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(AdapterNotFoundError, match="weights.bin is a file"):
        resolve_adapter(tmp_path / "weights.bin")


def test_a_cached_model_id_loads_without_network_or_patched_globals(tmp_path, monkeypatch, no_network):
    hf_home = online_cache(monkeypatch, tmp_path / "hf")
    publish(hf_home, "owner/tiny-base", save_tiny(tiny_model(), word_tokenizer(), tmp_path / "base"))
    monkeypatch.chdir(tmp_path)
    seen = []  # the hub library's offline setting while transformers loads
    real = transformers.AutoModelForCausalLM.from_pretrained

    def recorded(*args, **kwargs):
        seen.append((huggingface_hub.constants.HF_HUB_OFFLINE, kwargs.get("local_files_only")))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", recorded)
    assert local_files_only("owner/tiny-base") and not local_files_only("owner/not-cached")
    model, tokenizer = load_base_model("owner/tiny-base", device="cpu")
    assert model.config.vocab_size == len(tokenizer)
    assert seen == [(False, True)] and no_network == []


def test_an_id_absent_in_offline_mode_is_a_one_line_error_naming_it(tmp_path, monkeypatch, no_network):
    offline_hub(monkeypatch, tmp_path / "hf")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the environment alone says offline
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as caught:
        load_base_model("owner/absent-base", device="cpu")
    text = str(caught.value)
    assert text.startswith("could not load base model 'owner/absent-base': it is not in the Hugging Face cache")
    assert "offline mode is on (HF_HUB_OFFLINE)" in text and "hf download owner/absent-base" in text
    assert "\n" not in text and no_network == []
