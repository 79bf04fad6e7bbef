"""Sparse finetuning recovery: fixed masks, distillation losses, Trainer integration (tiny Llama)."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from hfcompress import HfCompressConfig, compress
from hfcompress import peft as hpeft
from hfcompress.testing.models import tiny_llama
from hfcompress.modules import compressed_modules


def sparse_tiny(**kw):
    model = tiny_llama()
    compress(model, HfCompressConfig(method="magnitude", **(kw or {"sparsity": 0.5})))
    return model


def packed(model):
    return {f"{n}.{k}": v.clone() for n, m in compressed_modules(model).items() for k, v in m.compressed_tensors().items()}


def test_prepare_then_finalize_is_exact(tmp_path):
    model = sparse_tiny()
    before = packed(model)
    state = hpeft.prepare_sparse_finetune(model)
    assert not compressed_modules(model) and not getattr(model, "is_quantized", False)
    assert len(state.masks) == 14 and not state.violations()
    assert all(p.requires_grad for n, p in model.named_parameters() if "proj" in n)
    hpeft.finalize_sparse_finetune(model)
    after = packed(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoModelForCausalLM.from_pretrained(tmp_path), type(model))


def test_gradients_are_masked_and_masks_survive_a_step():
    model = sparse_tiny(sparsity_structure="2:4")
    masks = hpeft.sparsity_masks(model)
    state = hpeft.prepare_sparse_finetune(model)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    model(ids, labels=ids).loss.backward()
    for name, mask in state.masks.items():
        grad = model.get_submodule(name).weight.grad
        assert torch.all(grad[~mask] == 0) and torch.count_nonzero(grad[mask]) > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    opt.step()
    assert not state.violations()
    hpeft.finalize_sparse_finetune(model)
    after = hpeft.sparsity_masks(model)
    assert all(torch.equal(after[k], masks[k]) for k in masks)


def test_finalize_refuses_a_revived_weight_and_apply_fixes_it():
    model = sparse_tiny()
    state = hpeft.prepare_sparse_finetune(model)
    name, mask = next(iter(state.masks.items()))
    with torch.no_grad():
        model.get_submodule(name).weight[~mask] = 1.0
    with pytest.raises(ValueError, match="became non-zero"):
        hpeft.finalize_sparse_finetune(model)
    assert not compressed_modules(model)  # untouched
    state.apply_()
    hpeft.finalize_sparse_finetune(model)
    assert len(compressed_modules(model)) == 14


def test_prepare_refuses_quantized_modules():
    model = tiny_llama()
    compress(model, HfCompressConfig(method="magnitude", sparsity=0.5, bits=4, group_size=32))
    before = packed(model)
    with pytest.raises(ValueError, match="sparse LoRA"):
        hpeft.prepare_sparse_finetune(model)
    assert all(torch.equal(v, before[k]) for k, v in packed(model).items())
    with pytest.raises(ValueError, match="no sparse"):
        hpeft.prepare_sparse_finetune(tiny_llama())


def _out(logits, hidden=None, loss=None):
    return types.SimpleNamespace(logits=logits, hidden_states=hidden, loss=loss)


def test_distillation_loss_terms():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    hidden = tuple(torch.randn(2, 5, 8, generator=g) for _ in range(3))
    cfg = hpeft.DistillationConfig(hard_weight=0, kl_weight=1.0, feature_weight=1.0)
    loss, parts = hpeft.distillation_loss(_out(logits, hidden), _out(logits.clone(), hidden), cfg)
    assert abs(loss.item()) < 1e-6 and parts["kl"] == pytest.approx(0, abs=1e-6) and parts["feature"] == 0
    other = _out(logits + torch.randn(2, 5, 11, generator=g), tuple(h * 1.5 for h in hidden))
    loss, parts = hpeft.distillation_loss(other, _out(logits, hidden), cfg)
    assert parts["kl"] > 0
    assert parts["feature"] == pytest.approx(0.25, rel=1e-5)  # ||0.5 h||^2 / ||h||^2
    # padding tokens do not count: a difference only at a masked position gives zero loss
    student = logits.clone()
    student[:, -1] += 5
    mask = torch.ones(2, 5)
    mask[:, -1] = 0
    _, parts = hpeft.distillation_loss(_out(student), _out(logits), hpeft.DistillationConfig(hard_weight=0, kl_weight=1), mask)
    assert parts["kl"] == pytest.approx(0, abs=1e-6)
    # KL matches the definition at temperature 2 (times T^2)
    t = 2.0
    p_t = torch.softmax(logits / t, -1)
    ref = (p_t * (torch.log_softmax(logits / t, -1) - torch.log_softmax(other.logits / t, -1))).sum(-1).mean() * t * t
    _, parts = hpeft.distillation_loss(other, _out(logits), hpeft.DistillationConfig(hard_weight=0, kl_weight=1, temperature=t))
    assert parts["kl"] == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hard_weight=0), "all 0"),
        (dict(kl_weight=-1), "kl_weight"),
        (dict(temperature=0), "temperature"),
        (dict(feature_weight=1, feature_layers=["1"]), "feature_layers"),
    ],
)
def test_distillation_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hpeft.DistillationConfig(**kwargs)


def test_trainer_needs_a_teacher_for_distillation(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(tmp_path, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="teacher"):
        hpeft.SparseRecoveryTrainer(model=tiny_llama(), args=args, distillation=hpeft.DistillationConfig(kl_weight=1))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_trainer_recovers_with_fixed_masks_and_distillation(mode, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainingArguments

    teacher = tiny_llama()
    model = sparse_tiny()
    masks = hpeft.sparsity_masks(model)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (1, 24), generator=g).repeat(16, 1)  # one sequence to learn
    ds = Dataset.from_dict({"input_ids": data.tolist(), "labels": data.tolist(), "attention_mask": [[1] * 24] * 16})
    if mode == "full":
        hpeft.prepare_sparse_finetune(model)
        student = model
    else:
        student = hpeft.get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    args = TrainingArguments(
        tmp_path / "run", max_steps=16, per_device_train_batch_size=8, learning_rate=5e-3 if mode == "full" else 1e-2,
        weight_decay=0.1, logging_steps=4, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    distill = hpeft.DistillationConfig(hard_weight=1.0, kl_weight=0.5, feature_weight=0.5)
    trainer = hpeft.SparseRecoveryTrainer(model=student, args=args, train_dataset=ds, teacher=teacher, distillation=distill)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.9 * losses[0]
    assert set(trainer.loss_parts) == {"ce", "kl", "feature"}
    if mode == "full":
        assert not trainer.sparse_masks.violations()
        merged = hpeft.finalize_sparse_finetune(model)
    else:
        merged, report = hpeft.merge_and_unload(student)
        assert report.masks_preserved
    after = hpeft.sparsity_masks(merged)
    assert after.keys() == masks.keys() and all(torch.equal(after[k], masks[k]) for k in masks)
    merged.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(reloaded(data[:2]).logits, merged(data[:2]).logits)
