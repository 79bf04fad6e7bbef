"""llm-compressor reference for eval/bench_sparsity.py, run in llm-compressor's own venv (it pins an older transformers).

    python -c "..."  # see README: dump the calibration windows with hfcompress first
    /path/to/lc-venv/bin/python eval/lc_sparsity_reference.py {sparsegpt|sparsegpt24|wanda} MODEL_DIR CALIB_IDS.pt WIKI_TEST_RAW [WINDOWS [THREADS]]

``eval/bench_sparsity.py --lc-python /path/to/lc-venv/bin/python`` runs it for you on its own windows.

Uses exactly the calibration windows hfcompress used (a saved ``[n, seq_len]`` int tensor from
``hfcompress.calibration.data.calibration_batches``) and the same perplexity protocol as
``hfcompress.evaluation.perplexity`` (consecutive 2048-token windows, fp32), printing one JSON line.
"""

import json
import math
import resource
import sys
import time

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

which, src, calib, wiki = sys.argv[1:5]
windows = int(sys.argv[5]) if len(sys.argv) > 5 else 16
torch.set_num_threads(int(sys.argv[6]) if len(sys.argv) > 6 else 2)  # the same thread count as hfcompress's run
tok = AutoTokenizer.from_pretrained(src)
ids = torch.load(calib)
ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
common = dict(sparsity=0.5, targets=["Linear"], ignore=["lm_head"])
modifier = {
    "sparsegpt": lambda: SparseGPTModifier(mask_structure="0:0", **common),
    "sparsegpt24": lambda: SparseGPTModifier(mask_structure="2:4", **common),
    "wanda": lambda: WandaPruningModifier(mask_structure="0:0", **common),
}[which]()
t0 = time.time()  # like bench_sparsity.py: from the model load (above it, about a second) to the compressed model
oneshot(model=model, dataset=ds, recipe=[modifier], num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1])
seconds = time.time() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
tids = tok(open(wiki, encoding="utf-8").read(), return_tensors="pt").input_ids[0]
nll, count = 0.0, 0
with torch.no_grad():
    for start in range(0, windows * 2048, 2048):
        window = tids[start : start + 2048].unsqueeze(0)
        logits = model(window).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum").item()
        count += window.shape[1] - 1
print(json.dumps({"config": f"llm-compressor {which}", "seconds": seconds, "rss_mb": rss, "ppl": math.exp(nll / count)}))
