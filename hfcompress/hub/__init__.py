"""Model cards, saving with a card, publishing to the Hugging Face Hub, and checkpoint inspection.

::

    from hfcompress.hub import model_card, push_to_hub, save_compressed

    save_compressed(model, "smollm2-int4", tokenizer=tok, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                    license="apache-2.0")
    push_to_hub("smollm2-int4", "me/smollm2-int4")      # or model.push_to_hub("me/smollm2-int4")
"""

from .card import DEFAULT_TEMPLATE, base_model_id, card_context, model_card, read_card_metadata, save_card
from .inspect import checkpoint_files, inspect_checkpoint, layer_groups, load_saved_config
from .push import copy_companion_files, enable_push_with_card, push_to_hub, save_compressed

__all__ = [
    "DEFAULT_TEMPLATE",
    "base_model_id",
    "card_context",
    "checkpoint_files",
    "copy_companion_files",
    "enable_push_with_card",
    "inspect_checkpoint",
    "layer_groups",
    "load_saved_config",
    "model_card",
    "push_to_hub",
    "read_card_metadata",
    "save_card",
    "save_compressed",
]
