"""vLLM side of eval/bench_vllm.py: runs in vLLM's own virtualenv (no hfcompress import).

For each model folder: greedy tokens for a few prompts (vLLM and, on the same folder, plain transformers with
compressed-tensors), perplexity from vLLM's prompt logprobs over the given token windows, and generation speed.

    python eval/vllm_worker.py SPEC.json OUT.json
"""

from __future__ import annotations

import json
import math
import sys
import time


def transformers_greedy(folder: str, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens of plain transformers on ``folder`` and, per step, the gap between its two best logits."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    out, gaps = [], []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)  # fmt: skip
            out.append(gen.sequences[0, len(ids):].tolist())
            gaps.append([float(s[0].float().topk(2).values.diff().abs()) for s in gen.scores])
    return out, gaps


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    results = {}
    for name, folder in spec["models"].items():
        t0 = time.perf_counter()
        llm = LLM(model=folder, dtype="bfloat16", max_model_len=spec["seq_len"] + 8, enforce_eager=True, seed=0)
        load_s = time.perf_counter() - t0
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
        greedy = SamplingParams(max_tokens=spec["new_tokens"], temperature=0.0)
        vllm_tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        # perplexity: -mean log p(token | prefix) over every token of each window but the first
        nll, count = 0.0, 0
        windows = [TokensPrompt(prompt_token_ids=w) for w in spec["windows"]]
        t0 = time.perf_counter()
        for out, w in zip(llm.generate(windows, SamplingParams(max_tokens=1, prompt_logprobs=0)), spec["windows"]):
            for tok, lp in zip(w[1:], out.prompt_logprobs[1:]):
                nll -= lp[tok].logprob
                count += 1
        prefill_tps = count / (time.perf_counter() - t0)
        batch = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]] * 2
        t0 = time.perf_counter()
        outs = llm.generate(batch, SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True))
        gen_tps = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)
        del llm
        hf_tokens, gaps = transformers_greedy(folder, spec["prompts"], spec["new_tokens"])
        match = [list(a) == list(b) for a, b in zip(vllm_tokens, hf_tokens)]
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(vllm_tokens, hf_tokens)]
        margins = [None if i is None else round(g[i], 4) for i, g in zip(first_diff, gaps)]
        results[name] = {"ppl": math.exp(nll / count), "tokens": count, "load_s": load_s, "prefill_tok_s": prefill_tps,
                         "generate_tok_s": gen_tps, "greedy_match": match, "first_difference": first_diff, "margins": margins}  # fmt: skip
        print(name, json.dumps(results[name]), flush=True)
    json.dump(results, open(sys.argv[2], "w"), indent=2)


if __name__ == "__main__":  # vLLM spawns worker processes: keep the entry point guarded
    main()
