"""Saving compressed checkpoints with their card, and publishing them to the Hugging Face Hub.

* :func:`save_compressed` writes ``save_pretrained`` output + tokenizer/processor files + ``recipe.yaml``
  + ``README.md`` (the model card) into a temporary folder beside the target and renames it into place,
  so a failure never leaves a half-written checkpoint.
* :func:`push_to_hub` uploads a compressed model or saved folder with its card through
  ``huggingface_hub`` (``create_repo`` + ``upload_folder``: LFS/Xet for the safetensors).
* :func:`push_with_card` is what ``model.push_to_hub(...)`` of a compressed model runs (installed by
  :func:`hfcompress.bindings.install_model_methods` on every model hfcompress compresses or loads):
  transformers' own ``push_to_hub`` would replace the card with a generic one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from ..config import HfCompressConfig
from ..outputs import MARKER, OutputFolder, copy_contained

__all__ = ["copy_companion_files", "push_to_hub", "push_with_card", "save_compressed"]

#: files that belong to the weights/config that ``save_pretrained`` writes, never copied from the source
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".ot", ".tflite", ".npz")
_OWN_FILES = {"config.json", "generation_config.json", "README.md", "recipe.yaml", "eval_results.json"}


def _compressed_config(model) -> HfCompressConfig:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if not isinstance(config, HfCompressConfig):
        raise ValueError(
            "The model is not compressed by hfcompress (model.config.quantization_config is not an HfCompressConfig); "
            "compress it first (from_pretrained(..., quantization_config=HfCompressConfig(...)) or hfcompress.compress)."
        )
    return config


def copy_companion_files(source: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy a model folder's tokenizer, processor and other companion files (not weights or config).

    Keeps sub-folders such as sentence-transformers' ``1_Pooling``; skips weight files, ``config.json``,
    ``generation_config.json``, the card, hidden files, symbolic links that leave ``source``, and anything
    ``dest`` already has.
    Returns the copied paths relative to ``dest``.
    """
    skip_suffixes = _WEIGHT_SUFFIXES + (".index.json",)
    return copy_contained(Path(source), Path(dest), skip=_OWN_FILES, skip_suffixes=skip_suffixes)


def _card_kwargs(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def save_compressed(
    model,
    folder: str | os.PathLike,
    *,
    tokenizer=None,
    companions_from: str | os.PathLike | None = None,
    card: bool = True,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
    base_model: str | None = None,
    license: str | None = None,
    model_name: str | None = None,
    repo_id: str | None = None,
    eval_results=None,
    tags: list[str] | None = None,
    command: str | None = None,
) -> Path:
    """Save a compressed model, its preprocessing files, ``recipe.yaml`` and model card, atomically.

    Args:
        model: a model compressed by hfcompress.
        folder: destination; must not exist unless ``overwrite=True`` (then it is replaced as a whole).
        tokenizer: a tokenizer/processor (anything with ``save_pretrained``) to save alongside.
        companions_from: a model folder whose tokenizer/processor/extra files are copied (see
            :func:`copy_companion_files`).
        card: write ``README.md`` (see :func:`hfcompress.hub.model_card` for the card arguments).
        max_shard_size: passed to ``save_pretrained``.

    Returns:
        the folder.
    """
    from ..recipes import save_recipe
    from .card import model_card, save_card

    config = _compressed_config(model)
    folder = Path(folder)
    if companions_from is not None and not Path(companions_from).is_dir():
        raise FileNotFoundError(f"companions_from={str(companions_from)!r} is not a folder.")
    source = getattr(model, "name_or_path", None)
    sources = [companions_from] + ([source] if source and os.path.isdir(source) else [])
    with OutputFolder(folder, sources=sources, overwrite=overwrite, kind="checkpoint", what="folder") as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if companions_from is not None:
            copy_companion_files(companions_from, tmp)
        save_recipe(config, tmp / "recipe.yaml")
        if card:
            rendered = model_card(
                tmp, **_card_kwargs(base_model=base_model, license=license, model_name=model_name or folder.name,
                                    repo_id=repo_id, eval_results=eval_results, tags=tags, command=command),
            )  # fmt: skip
            save_card(rendered, tmp)
    return folder


def _refuse_escaping_links(folder: Path) -> None:
    """Refuse a folder holding symbolic links that leave it (or lead nowhere): uploading one would publish the
    content of whatever file it points to."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder.")
    root = Path(os.path.realpath(folder))
    for path in folder.rglob("*"):
        if not path.is_symlink():
            continue
        target = Path(os.path.realpath(path))
        if not target.exists() or not (target == root or root in target.parents):
            raise ValueError(
                f"{path} is a symbolic link to {target}, outside {folder}; push uploads only the folder's own files. "
                "Replace the link by a copy of the file (cp -L) or remove it."
            )


def _stage_with_card(folder: Path, card_text: str, stage: Path) -> None:
    """Mirror ``folder`` into ``stage`` with symlinks, plus a new README.md (the folder is not modified)."""
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_dir() or rel.as_posix() == "README.md":
            continue
        target = stage / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(path.resolve(), target)
    (stage / "README.md").write_text(card_text, encoding="utf-8")


def push_to_hub(
    source,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    tokenizer=None,
    card=None,
    endpoint: str | None = None,
    max_shard_size: int | str = "5GB",
    base_model: str | None = None,
    license: str | None = None,
    eval_results=None,
    tags: list[str] | None = None,
):
    """Upload a compressed model (or a folder saved by :func:`save_compressed`) with its model card.

    Args:
        source: a compressed model, or a saved compressed folder (validated before anything is uploaded).
        repo_id: ``"namespace/name"``; the repo is created if needed.
        token, private, revision, create_pr, commit_message, commit_description: as ``huggingface_hub``'s.
        tokenizer: saved alongside when ``source`` is a model.
        card: ``None``: a folder's card rendered by hfcompress is re-rendered for ``repo_id`` (keeping its base
            model, license, evaluation and command), a README written by hand is kept, a missing one is
            rendered; ``True``: always render; ``False``: upload no card; a ``ModelCard``: upload that card.
        endpoint: Hub URL (default: ``HF_ENDPOINT`` or huggingface.co).
        base_model, license, eval_results, tags: card contents (see :func:`hfcompress.hub.model_card`).

    Returns:
        the ``huggingface_hub.CommitInfo`` of the upload.
    """
    from huggingface_hub import HfApi, ModelCard

    from .card import GENERATED_MARKER, model_card
    from ..inspection import inspect_checkpoint

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id={repo_id!r} must look like 'namespace/name'.")
    card_args = _card_kwargs(base_model=base_model, license=license, eval_results=eval_results, tags=tags, repo_id=repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="hfcompress-push-") as scratch:
        scratch = Path(scratch)
        if isinstance(source, (str, os.PathLike)):
            folder = Path(source)
            _refuse_escaping_links(folder)
            report = inspect_checkpoint(folder, verify=True)  # the checks loading runs: damage, edits, missing parts
            if not report["compressed"]:
                raise ValueError(f"{folder} is not an hfcompress checkpoint (no hfcompress quantization_config in config.json).")
            if tokenizer is not None:
                raise ValueError("tokenizer= is for pushing a model; a folder is uploaded with the files it holds.")
            readme = folder / "README.md"
            generated = readme.is_file() and GENERATED_MARKER in readme.read_text(encoding="utf-8")
            if isinstance(card, ModelCard):
                text = str(card)
            elif card is True or (card is None and (generated or card_args.keys() - {"repo_id"} or not readme.is_file())):
                # hfcompress's own card is re-rendered for this repo (load snippet, model-index name);
                # a README the user wrote is uploaded untouched.
                text = str(model_card(folder, model_name=repo_id.split("/")[1], **card_args))
            else:
                text = None
            upload_dir = folder
            if text is not None:
                upload_dir = scratch / "stage"
                _stage_with_card(folder, text, upload_dir)
            ignore = [MARKER] + (["README.md"] if card is False else [])
        else:
            _compressed_config(source)
            upload_dir = scratch / repo_id.split("/")[1]
            save_compressed(
                source, upload_dir, tokenizer=tokenizer, card=card is not False and not isinstance(card, ModelCard),
                max_shard_size=max_shard_size, model_name=repo_id.split("/")[1], **card_args,
            )  # fmt: skip
            if isinstance(card, ModelCard):
                (upload_dir / "README.md").write_text(str(card), encoding="utf-8")
            ignore = [MARKER]
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and not revision.startswith("refs/pr/") and not create_pr:
            api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(
            repo_id=repo.repo_id, folder_path=upload_dir, commit_message=commit_message or "Upload compressed model (hfcompress)",
            commit_description=commit_description, revision=revision, create_pr=create_pr, ignore_patterns=ignore,
        )  # fmt: skip


def push_with_card(
    model,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str | None = "50GB",
    tags: list[str] | None = None,
):
    """``model.push_to_hub(repo_id, ...)`` of a compressed model (transformers' signature): :func:`push_to_hub`
    with the model's own tags, so the upload carries the hfcompress card instead of transformers' generic one."""
    model_tags = list(getattr(model, "model_tags", None) or [])
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    return push_to_hub(
        model, repo_id, token=token, private=private, revision=revision, create_pr=create_pr,
        commit_message=commit_message, commit_description=commit_description,
        max_shard_size=max_shard_size or "50GB", tags=model_tags + [t for t in tags if t not in model_tags] or None,
    )  # fmt: skip
