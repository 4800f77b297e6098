"""Publish extracted sub-networks to the Hugging Face Hub: the artefact plus a generated model card, in one upload."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import httpx
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError

from ..utils import atomic_directory, check_output_dir, overlaps, read_json
from .card_info import CardInfo, _check_repo_id, _is_repo_id
from .model_card import (
    _PLOT_SUFFIXES,
    CARD_NAME,
    build_model_card,
    check_model_card,
    detect_artifact_kind,
    infer_method,
    measure_sparsity,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CardInfo",
    "build_model_card",
    "check_model_card",
    "detect_artifact_kind",
    "infer_method",
    "measure_sparsity",
    "prepare_upload_folder",
    "push_to_hub",
]


def _place(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            dst.symlink_to(src.resolve())
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def _normalize_extra_files(
    extra_files: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike] | None,
) -> dict[str, Path]:
    if extra_files is None:
        return {}
    if isinstance(extra_files, (str, os.PathLike)):
        extra_files = [extra_files]
    pairs = extra_files.items() if isinstance(extra_files, Mapping) else ((Path(p).name, p) for p in extra_files)
    out = {}
    for name, path in pairs:
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"extra_files name {name!r} must be a relative path inside the repository.")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"extra file {str(path)!r} does not exist.")
        out[rel.as_posix()] = path
    return out


# What an upload may hold, by artefact part: weights, configs and reports, tokenizer, card and plots. Pickles
# (training_args.bin holds the Hub token; optimizer.pt, rng_state.pth), checkpoints and logs stay behind.
_UPLOAD_SUFFIXES = (
    ".safetensors",
    ".gguf",
    ".json",
    ".model",
    ".txt",
    ".tiktoken",
    ".jinja",
    ".md",
    ".csv",
) + _PLOT_SUFFIXES
_OPENVINO_FILE = re.compile(r"^openvino_[\w-]*\.(xml|bin)$")
_CHECKPOINT_PART = re.compile(r"^(checkpoint-\d+|runs|wandb)$")
_TEXT_SUFFIXES = (".json", ".md", ".txt", ".csv", ".xml", ".svg", ".jinja")


def _uploadable(rel: Path) -> bool:
    if any(_CHECKPOINT_PART.match(part) for part in rel.parts[:-1]) or rel.name == "trainer_state.json":
        return False
    return rel.suffix.lower() in _UPLOAD_SUFFIXES or bool(_OPENVINO_FILE.match(rel.name))


def _fill_folder(
    source: Path,
    dest: Path,
    card: ModelCard,
    extras: Mapping[str, Path],
    link: bool,
    token: str | None = None,
    base_model: str | None = None,
) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    written, left_out = [], []
    root = source.resolve()
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts) or rel.as_posix() == CARD_NAME:
            continue
        if path.is_symlink() and root not in path.resolve().parents:
            raise ValueError(f"{path} is a link to {path.resolve()}, outside {source}; copy the file in or remove it.")
        if not path.is_file():
            continue
        if not _uploadable(rel):
            left_out.append(rel.as_posix())
            continue
        _place(path, dest / rel, link)
        written.append(rel.as_posix())
    if left_out:
        logger.warning("Not uploaded (pickles, checkpoints and other non-artefact files): %s", ", ".join(left_out))
    for name, path in extras.items():
        if name in written and path.resolve() == (source / name).resolve():
            continue  # already part of the artefact
        if name == CARD_NAME or name in written:
            raise ValueError(f"extra file {name!r} would overwrite a file of the artefact or the model card.")
        _place(path, dest / name, link)
        written.append(name)
    for name in written:
        if Path(name).name == "adapter_config.json":
            _publish_base_model(dest / name, base_model)
    (dest / CARD_NAME).write_text(str(card), encoding="utf-8")
    if token:
        for name in [*written, CARD_NAME]:
            if Path(name).suffix.lower() in _TEXT_SUFFIXES and token in (dest / name).read_text(errors="ignore"):
                raise ValueError(f"{name} contains your Hub token; remove it from {source} before pushing.")


def _publish_base_model(config_path: Path, base_model: str | None) -> None:
    """Set `base_model_name_or_path` of a staged adapter config to the Hub id `base_model`, or drop it when it is
    not a Hub id (a local path never leaves the machine)."""
    config = read_json(config_path, "extract the adapter again")
    current = config.get("base_model_name_or_path")
    if base_model is not None and current != base_model:
        config["base_model_name_or_path"] = base_model
    elif current is not None and (not isinstance(current, str) or not _is_repo_id(current) or Path(current).exists()):
        del config["base_model_name_or_path"]
    else:
        return
    config_path.unlink()  # a link to the artefact's own file is replaced, not written through
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _check_no_overlap(source: Path, out: Path) -> None:
    if overlaps(source, out):
        raise ValueError(f"Output folder {str(out)!r} must not overlap the artefact folder {str(source)!r}.")


def _card_and_extras(
    source: Path,
    card_info: CardInfo,
    pareto_csv: str | os.PathLike | None,
    pareto_plot: str | os.PathLike | None,
    extra_files: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike] | None,
) -> tuple[ModelCard, dict[str, Path]]:
    card = build_model_card(source, card_info, pareto_csv=pareto_csv, pareto_plot=pareto_plot)
    extras = _normalize_extra_files(extra_files)
    for given in (pareto_csv, pareto_plot):
        if given is not None and Path(given).resolve() != (source / Path(given).name).resolve():
            extras.setdefault(Path(given).name, Path(given))
    return card, extras


def prepare_upload_folder(
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    card_info: CardInfo,
    *,
    pareto_csv: str | os.PathLike | None = None,
    pareto_plot: str | os.PathLike | None = None,
    extra_files: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the exact folder `push_to_hub` uploads: the artefact, its model card (`README.md`) and extra files.

    The artefact kind (LoRA adapter, merged checkpoint in any `export_subnetwork` format, OpenVINO IR or GGUF file) is
    detected from the files of `source_dir`, and the card's "How to load" matches it;
    hidden files and an existing `README.md` are left out. `pareto_csv` and `pareto_plot` are copied next to the card
    and shown in it. `extra_files` is a list of paths (placed at the root) or a `{path_in_repo: local_path}` dict.
    The folder is built beside `out_dir` and renamed into place, so `out_dir` is either complete or untouched.
    """
    source, out = Path(source_dir), Path(out_dir)
    _check_no_overlap(source, out)
    check_output_dir(out, overwrite)
    card, extras = _card_and_extras(source, card_info, pareto_csv, pareto_plot, extra_files)
    with atomic_directory(out, overwrite) as tmp:
        _fill_folder(source, tmp, card, extras, link=False, base_model=card_info.base_model)
    return out


def push_to_hub(
    source_dir: str | os.PathLike,
    repo_id: str,
    *,
    card_info: CardInfo,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    create_pr: bool = False,
    local_dir: str | os.PathLike | None = None,
    pareto_csv: str | os.PathLike | None = None,
    pareto_plot: str | os.PathLike | None = None,
    extra_files: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike] | None = None,
) -> str | Path:
    """Publish a sub-network artefact with its model card to the Hub repository `repo_id`.

    Creates the repository if needed (`private` applies to a new one), creates the branch `revision` if given, and
    uploads the folder `prepare_upload_folder` builds in one commit (or a pull request with `create_pr=True`).
    Returns the commit (or pull request) URL. With `dry_run=True` nothing is sent: the folder is written to
    `local_dir` (a new temporary folder by default) and its path returned. `token` defaults to the saved login; it is
    only handed to `huggingface_hub` and never logged.

    Example:

    ```py
    >>> supernet.extract_adapter(best, "sub")
    >>> info = CardInfo(base_model="meta-llama/Llama-3.2-1B", method="nls", max_size=supernet.count("max"))
    >>> push_to_hub("sub", "me/llama-nls-sub", card_info=info, dry_run=True)   # inspect, then push for real
    ```
    """
    _check_repo_id(repo_id)
    if create_pr and revision not in (None, "main"):
        raise ValueError(f"create_pr=True opens a pull request against main; do not also set revision={revision!r}.")
    if token is not None and (not isinstance(token, str) or not token):
        raise ValueError("token must be a non-empty string or None (use the saved login).")
    card_info = dataclasses.replace(card_info, repo_id=repo_id)
    source = Path(source_dir)
    kind = detect_artifact_kind(source)
    method = card_info.method or infer_method(source)
    folder_args = {"pareto_csv": pareto_csv, "pareto_plot": pareto_plot, "extra_files": extra_files}

    if dry_run:
        out = Path(local_dir) if local_dir is not None else Path(tempfile.mkdtemp(prefix="hf_elastic_push_"))
        if local_dir is None:
            out = out / repo_id.split("/")[-1]
        folder = prepare_upload_folder(source, out, card_info, **folder_args)
        logger.info("Dry run: the folder for %s is %s; nothing was uploaded.", repo_id, folder)
        return folder

    with tempfile.TemporaryDirectory(prefix="hf_elastic_push_") as tmp:
        if local_dir is not None:
            folder = prepare_upload_folder(source, local_dir, card_info, **folder_args)
        else:
            # Stage with symlinks: the upload reads through them, so large weights are never copied.
            folder = Path(tmp) / "upload"
            _check_no_overlap(source, folder)
            card, extras = _card_and_extras(source, card_info, pareto_csv, pareto_plot, extra_files)
            _fill_folder(source, folder, card, extras, link=True, token=token, base_model=card_info.base_model)
        try:
            api = HfApi(token=token)
            repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            logger.info("Uploading the %s sub-network in %s to %s.", kind, source, repo_url)
            if revision is not None and revision != "main" and not create_pr:
                api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
            commit = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                revision=revision,
                commit_message=commit_message or f"Upload {method} sub-network ({kind}) with hf-elastic",
                create_pr=create_pr,
            )
        except (OSError, HfHubHTTPError, httpx.HTTPError) as error:
            detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
            if token:
                detail = detail.replace(token, "***")
            raise ConnectionError(
                f"Could not push to {repo_id} ({type(error).__name__}: {detail}). Check the network and your login "
                "(`hf auth login` or HF_TOKEN); --dry-run writes the folder without the network."
            ) from None
    url = commit.pr_url or commit.commit_url
    logger.info("Uploaded to %s.", url)
    return url
