"""Export presets: the settings whose grids a serving format holds bit for bit (see ``HfCompressConfig.for_export``).

Each preset names a target layout and the weight settings that map onto it exactly; calibrated methods
(``method="gptq"``, ``"quantease"``, ``"blocktune"``) keep the grid, so their result exports without re-rounding.
"""

from __future__ import annotations

from typing import Any

#: preset name -> (what it targets, HfCompressConfig settings)
EXPORT_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "gguf-q4_0": ("GGUF Q4_0 (llama.cpp)", {"bits": 4, "group_size": 32, "symmetric": True, "scale_dtype": "float16"}),
    "gguf-q5_0": ("GGUF Q5_0 (llama.cpp)", {"bits": 5, "group_size": 32, "symmetric": True, "scale_dtype": "float16"}),
    "gguf-q8_0": ("GGUF Q8_0 (llama.cpp)", {"bits": 8, "group_size": 32, "symmetric": True, "scale_dtype": "float16"}),
    "compressed-tensors-w4a16": (
        "compressed-tensors pack-quantized int4, group 128 (vLLM W4A16)",
        {"bits": 4, "group_size": 128, "symmetric": True, "scale_dtype": "bfloat16"},
    ),
    "compressed-tensors-w8a16": (
        "compressed-tensors pack-quantized int8 per channel (vLLM W8A16)",
        {"bits": 8, "group_size": None, "symmetric": True, "scale_dtype": "bfloat16"},
    ),
    "compressed-tensors-w8a8": (
        "compressed-tensors int-quantized int8 per channel, dynamic int8 activations (vLLM W8A8)",
        {"bits": 8, "group_size": None, "symmetric": True, "scale_dtype": "bfloat16"},
    ),
}
