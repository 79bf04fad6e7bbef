"""``hfcompress.oneshot``: compress a loaded model with a calibrated method (GPTQ, ...), in place.

::

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hfcompress.oneshot(model, HfCompressConfig(method="gptq", bits=4, group_size=64), tokenizer=tok)
    model.save_pretrained(out)          # packed format; reloads with plain from_pretrained(out)

The calibration data (``dataset``) is described in :mod:`hfcompress.calibration.data`, the
layer-by-layer pipeline in :mod:`hfcompress.calibration.pipeline`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .algorithms import get_method
from .apply import check_compressible, compress, mark_compressed
from .calibration.data import check_token_ids, model_calibration_batches
from .calibration.pipeline import LayerResult, run_calibration
from .config import HfCompressConfig
from .modules import CompressedModule
from .spec import LayerSpec
from .plan import config_with_layer_specs

logger = logging.getLogger("hfcompress.calibration")

__all__ = ["oneshot"]


def _is_image_data(dataset: Any, image_processor: Any, image_column: str | None) -> bool:
    """Images to preprocess: a ``datasets.Dataset`` with an image column, or a list of PIL images."""
    if image_column is not None:
        return True
    if isinstance(dataset, (list, tuple)) and dataset:
        return hasattr(dataset[0], "convert") and hasattr(dataset[0], "size")  # PIL images
    if hasattr(dataset, "column_names") and hasattr(dataset, "select"):
        from .vision.data import image_column_of

        return image_column_of(dataset) is not None and (image_processor is not None or "text" not in dataset.column_names)
    return False


def _load_image_processor(model: nn.Module):
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if name and Path(name).is_dir():
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(name)
    raise ValueError(
        "Image calibration data needs the model's image processor and the model was not loaded from a local folder "
        "that has one; pass image_processor=AutoImageProcessor.from_pretrained(...)."
    )


def _input_device(model: nn.Module) -> torch.device:
    get_in = getattr(model, "get_input_embeddings", None)
    try:
        emb = get_in() if callable(get_in) else None
    except NotImplementedError:
        emb = None
    if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def oneshot(
    model: nn.Module,
    config: HfCompressConfig,
    dataset: Any = None,
    *,
    tokenizer=None,
    num_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    text_column: str | None = None,
    dataset_config: str | None = None,
    split: str = "train",
    blocks: str | None = None,
    true_sequential: bool = False,
    layer_specs: dict[str, LayerSpec] | None = None,
    show_progress: bool = True,
    return_results: bool = False,
    image_processor=None,
    image_column: str | None = None,
) -> nn.Module | tuple[nn.Module, dict[str, LayerResult]]:
    """Compress ``model`` in place with ``config``'s method, calibrating on ``dataset``; returns the model.

    Args:
        model: a loaded transformers model (any dtype; float32 gives the most accurate statistics). Models
            dispatched with accelerate (``device_map``, CPU/disk offload) are processed one block at a time.
        config: the :class:`~hfcompress.HfCompressConfig`; a data-free method (``"rtn"``) ignores the data.
        dataset: calibration data: ``None`` (offline Wikipedia summaries), a list of strings, a
            ``datasets.Dataset``/``IterableDataset``, a local ``.txt``/``.json``/``.jsonl``/``.csv``/``.parquet``
            file, a Hub dataset name, or ready model inputs (a tensor, or a list of dicts of tensors, e.g.
            ``pixel_values`` for vision models). See :mod:`hfcompress.calibration.data`.
        tokenizer: needed for text data; defaults to the tokenizer saved with the model's local folder.
        num_samples, seq_len: the calibration set is ``num_samples`` windows of ``seq_len`` tokens.
        seed: selects and orders the documents; the same seed gives the same windows.
        batch_size: windows per forward pass (memory vs speed; results do not depend on it beyond float
            rounding; ``blocktune``'s tuning steps take ``method_args["tune_batch_size"]`` windows each,
            within a calibration batch).
        text_column, dataset_config, split: how to read a ``datasets`` source.
        blocks: name of the model's block list when the automatic search picks the wrong one.
        true_sequential: calibrate the modules inside each block in execution order (slower, often better).
        layer_specs: ``{module name: LayerSpec}`` overriding the config per module (e.g. non-uniform
            per-layer sparsity); they are written into the saved config's ``overrides``.
        show_progress: tqdm progress bar per block.
        return_results: also return ``{module name: LayerResult}`` (relative output error per module).
        image_processor: for image data (a ``datasets.Dataset`` with an image column, or a list of PIL
            images): the model's image processor; ``num_samples`` images drawn by ``seed`` are preprocessed
            with it (:func:`hfcompress.vision.image_calibration_batches`). Defaults to the processor saved
            with the model's local folder.
        image_column: the column holding the images (default: the dataset's first ``Image`` feature).

    Bad arguments raise before anything is modified; an error during compression puts every replaced
    module back. Afterwards ``model.save_pretrained(out)`` writes the compressed checkpoint.
    """
    check_compressible(model, config, "hfcompress.oneshot")
    already = [n for n, m in model.named_modules() if isinstance(m, CompressedModule)]
    if already:
        raise ValueError(
            f"The model is already compressed ({len(already)} modules, e.g. {already[0]!r}); reload the dense model."
        )
    method = get_method(config.method)
    config, plan = config_with_layer_specs(model, config, layer_specs)
    if method.data_free:
        if layer_specs:
            logger.info("method=%r needs no calibration data; the layer_specs overrides are applied as given.", method.name)
        compress(model, config)
        return (model, {}) if return_results else model
    main_input = getattr(model, "main_input_name", "input_ids")
    if _is_image_data(dataset, image_processor, image_column):
        from .vision.data import image_calibration_batches

        batches = image_calibration_batches(
            dataset, image_processor if image_processor is not None else _load_image_processor(model),
            num_samples=num_samples, batch_size=batch_size, seed=seed, image_column=image_column,
            main_input_name=main_input,
        )  # fmt: skip
    else:
        batches = model_calibration_batches(
            dataset, tokenizer, tokenizer_from=getattr(getattr(model, "config", None), "_name_or_path", None),
            main_input_name=main_input, num_samples=num_samples, seq_len=seq_len, seed=seed, batch_size=batch_size,
            text_column=text_column, dataset_config=dataset_config, split=split,
        )  # fmt: skip
    check_token_ids(batches, model)
    device = _input_device(model)
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    from .plan.allocation import allocated_config

    # non-uniform per-layer sparsity (OWL needs the dense model's activations): pinned in config.overrides
    config, plan = allocated_config(model, config, plan, batches, layer_specs)
    results = run_calibration(
        model, plan, method, config.method_args, batches, blocks=blocks, true_sequential=true_sequential,
        show_progress=show_progress,
    )  # fmt: skip
    mark_compressed(model, config)
    return (model, results) if return_results else model
