"""Model cards, saving with a card, and publishing to the Hugging Face Hub (local inspection: :mod:`hfcompress.inspection`).

::

    from hfcompress.hub import model_card, push_to_hub, save_compressed

    save_compressed(model, "smollm2-int4", tokenizer=tok, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                    license="apache-2.0")
    push_to_hub("smollm2-int4", "me/smollm2-int4")      # or model.push_to_hub("me/smollm2-int4")
"""

from .card import DEFAULT_TEMPLATE, base_model_id, card_context, model_card, read_card_metadata, save_card
from .push import copy_companion_files, push_to_hub, save_compressed

__all__ = [
    "DEFAULT_TEMPLATE",
    "base_model_id",
    "card_context",
    "copy_companion_files",
    "model_card",
    "push_to_hub",
    "read_card_metadata",
    "save_card",
    "save_compressed",
]
