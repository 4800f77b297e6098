"""Base models from a folder or a Hub id (through a Hub-cache-shaped folder, offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ARCHS, hub_model_cache

from hf_elastic.models.loading import is_hub_id, load_causal_lm, load_tokenizer, resolve_dtype


def test_hub_id_and_revision_load_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    models = hub_model_cache(tmp_path, "acme/tiny-llama", {"main": 1, "v2": 2})
    offline = {"cache_dir": str(tmp_path)}
    for ref, reference in models.items():
        revision = None if ref == "main" else ref
        model = load_causal_lm("acme/tiny-llama", revision=revision, dtype="float32", **offline)
        state = reference.state_dict()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    bf16 = load_causal_lm("acme/tiny-llama", dtype="bfloat16", **offline)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    with pytest.raises(
        FileNotFoundError, match=r"Could not load 'acme/tiny-llama' at revision 'v9'.*pass a local folder"
    ):
        load_causal_lm("acme/tiny-llama", revision="v9", **offline)
    with pytest.raises(FileNotFoundError, match=r"Could not load 'acme/absent'"):
        load_causal_lm("acme/absent", **offline)


def test_folder_and_input_errors(tmp_path: Path) -> None:
    ARCHS["llama"].build().save_pretrained(tmp_path / "m")
    assert load_causal_lm(str(tmp_path / "m")).config.model_type == "llama"
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer files .* \(tokenizer.save_pretrained\)"):
        load_tokenizer(str(tmp_path / "m"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty is not a model folder \(no config.json\)"):
        load_causal_lm(str(tmp_path / "empty"))
    (tmp_path / "f.bin").write_text("x")
    with pytest.raises(ValueError, match=r"f.bin is a file; pass a model folder or a Hub id"):
        load_causal_lm(str(tmp_path / "f.bin"))
    with pytest.raises(FileNotFoundError, match=r"is neither a model folder nor a Hub model id"):
        load_causal_lm(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"--dtype 'int3' is not supported; use one of auto, bfloat16"):
        resolve_dtype("int3")
    assert is_hub_id("meta-llama/Llama-3.1-8B") and not is_hub_id("./local") and not is_hub_id("a/b/c")
