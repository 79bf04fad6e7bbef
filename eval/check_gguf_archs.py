"""llama.cpp runs our GGUF exports of every supported architecture as transformers runs the same model.

For each architecture (llama, qwen2, qwen3, gemma, gemma2, gemma3_text): a small random model (weights scaled
up so its predictions are far from uniform), quantized with ``HfCompressConfig.for_export("gguf-q8_0")``, exported
to GGUF; ``llama-perplexity`` scores a text, and transformers scores the same tokens the way llama-perplexity does
(chunks of ``n_ctx`` tokens, the second half of each scored). Equal perplexities (to float tolerance: llama.cpp
quantizes activations to 8 bits for Q8_0 dot products) mean the metadata, tensor names and layouts are right; a
wrong rotary order, a missing norm offset or a wrong head size moves it by far more.

    python eval/check_gguf_archs.py --llama-bin /path/to/llama.cpp/build/bin
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def hf_ppl(model, ids: list[int], n_ctx: int, chunks: int) -> float:
    import torch

    nll, count = 0.0, 0
    for c in range(chunks):
        chunk = torch.tensor([ids[c * n_ctx : (c + 1) * n_ctx]])
        with torch.no_grad():
            logp = torch.log_softmax(model(chunk).logits.float()[0], dim=-1)
        first = n_ctx // 2
        for i in range(first, n_ctx - 1):
            nll -= logp[i, chunk[0, i + 1]].item()
            count += 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bin", type=Path, required=True)
    ap.add_argument("--n-ctx", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=4)
    args = ap.parse_args()

    import torch
    from test_export_gguf import _byte_tokenizer, _tiny

    import hfcompress
    from hfcompress.evaluation import wikitext2_test_text
    from hfcompress.export import export

    work = Path(tempfile.mkdtemp(prefix="gguf-archs-"))
    print("files in", work)
    tok = _byte_tokenizer()
    text = wikitext2_test_text()[:20000]
    ids = tok(text)["input_ids"][: args.n_ctx * (args.chunks + 2)]  # llama-perplexity wants more tokens than it scores
    text_file = work / "text.txt"
    text_file.write_text(tok.decode(ids), encoding="utf-8")
    print(f"{'architecture':<14} {'transformers':>12} {'llama.cpp':>10}  ratio")
    worst = 0.0
    for arch in ["llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]:
        model = _tiny(arch)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.mul_(8.0)  # sharper predictions: layout mistakes then change the perplexity a lot
        model = hfcompress.compress(model.float(), hfcompress.HfCompressConfig.for_export("gguf-q8_0"))
        out = work / f"{arch}.gguf"
        export(model, out, to="gguf", tokenizer=tok, dense_type="F32")
        ours = hf_ppl(model, ids, args.n_ctx, args.chunks)
        # the running estimate after chunk k is printed as "[k]ppl,"; this build sometimes exits before printing its last
        # line, so one more chunk is asked for than is read (retried if still missing)
        m = None
        for _ in range(3):
            r = subprocess.run([str(args.llama_bin / "llama-perplexity"), "-m", str(out), "-f", str(text_file), "-c", str(args.n_ctx),
                                "--chunks", str(args.chunks + 1), "-b", str(args.n_ctx), "-t", "2"], capture_output=True, text=True)  # fmt: skip
            m = re.search(rf"\[{args.chunks}\]([0-9.]+),", r.stdout + r.stderr)
            if m:
                break
        if not m:
            print(f"{arch:<14} llama.cpp failed:\n{(r.stdout + r.stderr)[-1500:]}")
            worst = math.inf
            continue
        theirs = float(m.group(1))
        worst = max(worst, abs(theirs / ours - 1))
        print(f"{arch:<14} {ours:12.4f} {theirs:10.4f}  {theirs / ours:.4f}", flush=True)
    print(f"largest relative difference: {worst:.2e}")


if __name__ == "__main__":
    main()
