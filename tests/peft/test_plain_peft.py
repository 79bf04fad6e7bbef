"""Plain ``peft.get_peft_model`` / ``PeftModel.from_pretrained`` / PEFT's ``merge_and_unload`` on compressed models,
with no hfcompress call: the LoRA layer PEFT builds on a compressed Linear is hfcompress's (tiny Llama, fast)."""

from __future__ import annotations

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from hfcompress import peft as hpeft
from hfcompress.modules import CompressedLinear
from hfcompress.testing.models import tiny_llama

from test_peft import compressed_tiny, packed_state, randomize_lora

TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture
def ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def plain_config(**kw) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "task_type": "CAUSAL_LM", **kw})


@pytest.mark.parametrize("kind", ["w4", "sparse50", "sparse50-w4", "2:4-w4"])
def test_the_issue_snippet_gives_what_hfcompress_peft_gives(kind, ids, tmp_path):
    compressed_tiny(kind).save_pretrained(tmp_path / "base")
    plain = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), plain_config()).eval()
    ours = hpeft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), plain_config()).eval()
    layers = hpeft.compressed_lora_layers(plain)
    assert sorted(layers) == sorted(hpeft.compressed_lora_layers(ours)) and len(layers) == 6
    assert {type(layer) for layer in layers.values()} == {hpeft.CompressedLoraLinear}
    trainable = [n for n, p in plain.named_parameters() if p.requires_grad]
    assert trainable == [n for n, p in ours.named_parameters() if p.requires_grad]
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    randomize_lora(ours)
    plain.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, ours(ids).logits)


def test_sparse_update_is_masked_and_peft_merge_is_hfcompress_merge(ids):
    base = compressed_tiny("sparse50-w4")
    masks = hpeft.sparsity_masks(base)
    plain = peft.get_peft_model(base, plain_config()).eval()
    ours = hpeft.get_peft_model(compressed_tiny("sparse50-w4"), plain_config()).eval()
    randomize_lora(ours, std=0.05)
    plain.load_state_dict(ours.state_dict())
    layer = plain.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.get_delta_weight("default")
    assert torch.equal(delta[~layer.sparsity_mask], torch.zeros_like(delta[~layer.sparsity_mask]))
    merged_plain = plain.merge_and_unload()                 # PEFT's own merge
    merged_ours, report = hpeft.merge_and_unload(ours)
    assert report.masks_preserved
    assert packed_state(merged_plain).keys() == packed_state(merged_ours).keys()
    assert all(torch.equal(v, packed_state(merged_ours)[k]) for k, v in packed_state(merged_plain).items())
    assert masks and hpeft.sparsity_masks(merged_plain).keys() == masks.keys()
    assert all(torch.equal(hpeft.sparsity_masks(merged_plain)[k], masks[k]) for k in masks)
    assert type(merged_plain.model.layers[0].self_attn.q_proj) is CompressedLinear


@pytest.mark.parametrize("kind", ["w4", "sparse50"])
def test_peft_model_from_pretrained_of_a_saved_adapter(kind, ids, tmp_path):
    compressed_tiny(kind).save_pretrained(tmp_path / "base")
    trained = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), plain_config()).eval()
    randomize_lora(trained)
    with torch.no_grad():
        expected = trained(ids).logits
    trained.save_pretrained(tmp_path / "adapter")            # PEFT's own save
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert len(hpeft.compressed_lora_layers(loaded)) == 6
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, expected)


def test_peft_all_linear_shorthand_reaches_compressed_modules_but_not_the_head():
    lora = peft.get_peft_model(compressed_tiny("w4"), plain_config(target_modules="all-linear"))
    assert len(hpeft.compressed_lora_layers(lora)) == 14
    assert not hasattr(lora.base_model.model.lm_head, "lora_A")


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(init_lora_weights="pissa"), "init_lora_weights"), (dict(use_dora=True), "variants"),
     (dict(lora_bias=True), "lora_bias")],
)  # fmt: skip
def test_what_the_compressed_layer_cannot_do_is_refused_and_the_base_is_kept(kwargs, match):
    model = compressed_tiny("w4")
    before = packed_state(model)
    with pytest.raises(ValueError, match=match):
        peft.get_peft_model(model, plain_config(**kwargs))
    assert all(torch.equal(v, before[k]) for k, v in packed_state(model).items())


def test_dense_linear_layers_keep_peft_s_own_layer():
    lora = peft.get_peft_model(tiny_llama(), plain_config())
    q = lora.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q) is peft.tuners.lora.layer.Linear and type(q.base_layer) is torch.nn.Linear


def test_other_peft_methods_on_compressed_modules_are_refused_with_a_clear_error():
    model = compressed_tiny("w4")
    before = packed_state(model)
    with pytest.raises(ValueError, match="IA3Layer|Linear.*compressed module.*LoRA"):
        peft.get_peft_model(model, peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]))
    assert all(torch.equal(v, before[k]) for k, v in packed_state(model).items())
    assert not hpeft.compressed_lora_layers(model)


@pytest.mark.slow
def test_smollm2_plain_peft_and_transformers_entry_points(smollm2_path, wikitext_text, tmp_path):
    """The issue's snippet on the real SmolLM2 (W4 g64, reloaded), then PEFT's own save/load, transformers' add_adapter
    and load_adapter, Trainer, and PEFT's merge_and_unload against hfcompress's merge."""
    from datasets import Dataset
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from hfcompress import HfCompressConfig

    AutoModelForCausalLM.from_pretrained(smollm2_path, quantization_config=HfCompressConfig(bits=4, group_size=64)).save_pretrained(tmp_path / "w4")
    tok = AutoTokenizer.from_pretrained(smollm2_path)
    ids = tok(wikitext_text[:4000], return_tensors="pt").input_ids[:, :64]
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "w4")
    p = peft.get_peft_model(m, LoraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM"))
    assert len(hpeft.compressed_lora_layers(p)) == 3 * 30
    rows = ids[:, :32].repeat(8, 1)
    data = Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist()})
    args = TrainingArguments(str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)  # fmt: skip
    before = packed_state(p)
    Trainer(model=p, args=args, train_dataset=data).train()
    assert all(torch.equal(v, before[k]) for k, v in packed_state(p).items())  # the base stays packed, unchanged
    p.eval()
    with torch.no_grad():
        expected = p(ids).logits
    p.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "w4"), tmp_path / "adapter").eval()
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "w4")
    fresh.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
        assert torch.equal(fresh.eval()(ids).logits, expected)
    added = AutoModelForCausalLM.from_pretrained(tmp_path / "w4")
    added.add_adapter(LoraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    assert len(hpeft.compressed_lora_layers(added)) == 3 * 30
    # PEFT's merge is hfcompress's merge: same packed tensors as hpeft.merge_and_unload of the same adapter
    ours, report = hpeft.merge_and_unload(hpeft.load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "w4"), tmp_path / "adapter"))
    merged = loaded.merge_and_unload()
    assert report.layers and all(torch.equal(v, packed_state(ours)[k]) for k, v in packed_state(merged).items())


# ------------------------------------------------------------------ attacks (each was a silent failure once)
def test_an_unpickled_model_in_a_fresh_process_still_gets_hfcompress_s_layer(tmp_path):
    """The hook is installed at ``import hfcompress``, which unpickling a compressed module imports."""
    import subprocess
    import sys

    torch.save(compressed_tiny("sparse50"), tmp_path / "whole.pt")
    script = f"""
import torch, peft
from peft import LoraConfig
model = torch.load({str(tmp_path / "whole.pt")!r}, weights_only=False)
lora = peft.get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
print(type(lora.base_model.model.model.layers[0].self_attn.q_proj).__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "CompressedLoraLinear"


def test_modules_to_save_on_a_compressed_module_is_refused():
    with pytest.raises(ValueError, match="modules_to_save"):
        peft.get_peft_model(compressed_tiny("w4"), plain_config(target_modules=["q_proj"], modules_to_save=["v_proj"]))


def test_the_refusal_names_peft_s_layer_class():
    with pytest.raises(ValueError, match=r"peft\.tuners\.ia3\.layer\.Linear"):
        peft.get_peft_model(compressed_tiny("w4"), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))


class _HalfLinear(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) * 0.5


def _with_half_q_proj(kind: str):
    model = tiny_llama()
    for layer in model.model.layers:
        old = layer.self_attn.q_proj
        layer.self_attn.q_proj = _HalfLinear(old.in_features, old.out_features, bias=False)
        layer.self_attn.q_proj.weight = old.weight
    from hfcompress import HfCompressConfig, compress

    from test_peft import CONFIGS

    return compress(model, HfCompressConfig(**CONFIGS[kind]))


def test_a_masked_update_on_a_linear_subclass_with_its_own_forward_is_refused(ids):
    with pytest.raises(ValueError, match="computes its own forward"):
        peft.get_peft_model(_with_half_q_proj("sparse50"), plain_config(target_modules=["q_proj"]))
    # a dense quantized base adds the update after the subclass's own forward: exact
    model = _with_half_q_proj("w4").eval()
    with torch.no_grad():
        before = model(ids).logits
        lora = peft.get_peft_model(model, plain_config(target_modules=["q_proj"])).eval()
        assert torch.equal(lora(ids).logits, before)  # B = 0: the adapter adds nothing


def test_hfcompress_entry_points_check_the_config_before_peft_wraps_anything():
    """A dense module targeted before the compressed ones must not be wrapped (or rewritten by PiSSA) when the
    config is refused."""
    from hfcompress import HfCompressConfig, compress

    model = compress(tiny_llama(), HfCompressConfig(bits=4, group_size=32, targets=["re:layers\\.1\\."]))
    dense_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    for call in (lambda cfg: hpeft.get_peft_model(model, cfg), lambda cfg: model.add_adapter(cfg)):
        with pytest.raises(ValueError, match="init_lora_weights"):
            call(plain_config(init_lora_weights="pissa"))
        assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
        assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, dense_before)
