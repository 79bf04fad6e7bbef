"""transformers' own adapter methods on compressed models: ``model.add_adapter``, ``model.load_adapter``, Trainer
(tiny Llama, fast). Each must give exactly what the hfcompress.peft functions give."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hfcompress import peft as hpeft
from hfcompress.modules import CompressedLinear

from test_peft import compressed_tiny, lora_config, packed_state, randomize_lora

TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def saved_base(kind, tmp_path):
    compressed_tiny(kind).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model."): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("kind", ["w4", "sparse50-w4"])
def test_add_adapter_puts_the_compressed_lora_layer_on_reloaded_and_fresh_models(kind, ids, tmp_path):
    for model in (AutoModelForCausalLM.from_pretrained(saved_base(kind, tmp_path)), compressed_tiny(kind)):
        model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        layers = hpeft.compressed_lora_layers(model)
        assert len(layers) == 6 and all(name.rpartition(".")[2] in TARGETS for name in layers)
        assert isinstance(model.model.layers[0].self_attn.k_proj, CompressedLinear)  # not targeted: untouched
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # same layers, same outputs as hfcompress.peft.get_peft_model with the same adapter weights
    reference = hpeft.get_peft_model(compressed_tiny(kind), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)).eval()
    randomize_lora(reference)
    with torch.no_grad():
        loaded = model.load_state_dict(lora_weights(reference), strict=False)
        assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if "lora_" in k]
        assert torch.equal(model.eval()(ids).logits, reference(ids).logits)


def test_add_adapter_keeps_a_policy_the_caller_registered(ids):
    model = compressed_tiny("sparse50")
    config = hpeft.register_compressed_lora(lora_config(), mask_update=False)
    model.add_adapter(config)
    assert hpeft.lora_policy(model)["mask_update"] is False


def test_add_adapter_all_linear_reaches_compressed_modules_but_not_the_head():
    model = compressed_tiny("w4")
    model.add_adapter(lora_config(target_modules="all-linear"))
    assert len(hpeft.compressed_lora_layers(model)) == 14  # 2 blocks x 7 projections
    assert not hasattr(model.lm_head, "lora_A")


def test_add_adapter_refuses_what_the_compressed_layer_cannot_do_and_leaves_the_model():
    model = compressed_tiny("w4")
    before = packed_state(model)
    with pytest.raises(ValueError, match="init_lora_weights"):
        model.add_adapter(lora_config(init_lora_weights="pissa"))
    assert all(torch.equal(v, before[k]) for k, v in packed_state(model).items())


@pytest.mark.parametrize("kind", ["w4", "sparse50"])
def test_load_adapter_reads_the_recorded_policy(kind, ids, tmp_path):
    base = saved_base(kind, tmp_path)
    lora = hpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora_config(), quant_aware=kind == "w4").eval()
    randomize_lora(lora)
    with torch.no_grad():
        expected = lora(ids).logits
    hpeft.save_adapter(lora, tmp_path / "adapter")
    # transformers' load_adapter with no peft_config: config and policy come from the folder
    model = AutoModelForCausalLM.from_pretrained(base)
    model.load_adapter(tmp_path / "adapter")
    assert hpeft.lora_policy(model)["quant_aware"] == (kind == "w4")
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, expected)
    # a string path and an adapter name, as scripts write it
    model = AutoModelForCausalLM.from_pretrained(base)
    model.load_adapter(str(tmp_path / "adapter"), adapter_name="tuned")
    assert model.active_adapters() == ["tuned"]
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, expected)


def test_load_adapter_positional_arguments_beyond_the_path_are_refused(tmp_path):
    model = compressed_tiny("w4")
    with pytest.raises(TypeError, match="by keyword"):
        model.load_adapter(tmp_path, "name")


def test_trainer_trains_only_the_adapter_and_keeps_the_base(tmp_path):
    model = compressed_tiny("sparse50-w4")
    masks = hpeft.sparsity_masks(model)
    before = packed_state(model)
    model.add_adapter(lora_config(r=8, lora_alpha=16))
    start = lora_weights(model)
    rows = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=8, learning_rate=2e-2,
        report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert result.global_step == 8 and losses[-1] < losses[0]
    after = lora_weights(model)
    assert any(not torch.equal(after[k], start[k]) for k in start if ".lora_B." in k)
    assert all(torch.equal(v, before[k.replace(".base_layer", "")]) for k, v in packed_state(model).items())
    # the trained adapter merges exactly as hfcompress.peft's: mask kept
    model.save_pretrained(tmp_path / "adapter")  # transformers writes the adapter alone
    fresh = AutoModelForCausalLM.from_pretrained(saved_base("sparse50-w4", tmp_path))
    merged, report = hpeft.merge_and_unload(hpeft.load_adapter(fresh, tmp_path / "adapter"))
    assert report.masks_preserved
    assert all(torch.equal(hpeft.sparsity_masks(merged)[k], masks[k]) for k in masks)


def test_resizing_a_compressed_embedding_or_head_is_refused():
    from hfcompress import HfCompressConfig, compress
    from hfcompress.testing.models import tiny_llama

    model = compress(tiny_llama(tie_word_embeddings=False), HfCompressConfig(bits=4, group_size=32, ignore=[]))  # the head too
    with pytest.raises(ValueError, match="output head is compressed"):
        model.resize_token_embeddings(300)
    assert isinstance(model.lm_head, CompressedLinear) and model.lm_head.out_features == 256
    dense_head = compressed_tiny("w4")  # head left dense: transformers resizes as usual
    dense_head.resize_token_embeddings(300)
    assert dense_head.lm_head.out_features == 300
