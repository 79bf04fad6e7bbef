"""Export presets: the settings whose grids a serving format holds bit for bit (see ``HfCompressConfig.for_export``).

Each preset names a target layout and the weight settings that map onto it exactly; calibrated methods
(``method="gptq"``, ``"quantease"``, ``"blocktune"``) keep the grid, so their result exports without re-rounding.
Every preset searches each group's scale (``clip="mse"``; GPTQ weights that search by the inputs' second moments):
on SmolLM2 Q4_0 it takes GPTQ's added perplexity from 0.238 to 0.170 (eval/bench_export.py). ``clip`` may be
overridden; it changes only which grid is chosen, never whether it exports.
"""

from __future__ import annotations

from typing import Any

#: preset name -> (what it targets, HfCompressConfig settings)
EXPORT_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "gguf-q4_0": ("GGUF Q4_0 (llama.cpp)", {"bits": 4, "group_size": 32, "symmetric": True, "scale_dtype": "float16", "clip": "mse"}),
    "gguf-q5_0": ("GGUF Q5_0 (llama.cpp)", {"bits": 5, "group_size": 32, "symmetric": True, "scale_dtype": "float16", "clip": "mse"}),
    "gguf-q8_0": ("GGUF Q8_0 (llama.cpp)", {"bits": 8, "group_size": 32, "symmetric": True, "scale_dtype": "float16", "clip": "mse"}),
    "compressed-tensors-w4a16": (
        "compressed-tensors pack-quantized int4, group 128 (vLLM W4A16)",
        {"bits": 4, "group_size": 128, "symmetric": True, "scale_dtype": "bfloat16", "clip": "mse"},
    ),
    "compressed-tensors-w8a16": (
        "compressed-tensors pack-quantized int8 per channel (vLLM W8A16)",
        {"bits": 8, "group_size": None, "symmetric": True, "scale_dtype": "bfloat16", "clip": "mse"},
    ),
    "compressed-tensors-w8a8": (
        "compressed-tensors int-quantized int8 per channel, dynamic int8 activations (vLLM W8A8)",
        {"bits": 8, "group_size": None, "symmetric": True, "scale_dtype": "bfloat16", "clip": "mse"},
    ),
}
