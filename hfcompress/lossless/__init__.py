"""Lossless, bit-exact entropy coding of weight tensors (the ``lossless=True`` stage of hfcompress).

Float weights (bfloat16, float16, float32) keep sign and mantissa raw and entropy-code the exponent byte;
1-byte tensors (bit-packed integer codes, masks, float8) entropy-code their bytes. Payloads are chunked
(chunks decode in parallel threads), checksummed (damage raises :class:`LosslessFormatError`, never wrong
values) and self-describing (dtype and shape are in the header). Checkpoints decode on load or, with
``HfCompressConfig(lossless_decode="lazy" | "first_forward")``, at forward time
(:mod:`hfcompress.storage.lazy`). See :mod:`hfcompress.lossless.codec` for the byte layout and
:mod:`hfcompress.formats.lossless` for how payloads are stored in checkpoints.
"""

from .codec import (
    DEFAULT_CHUNK_ELEMS,
    LosslessFormatError,
    PayloadInfo,
    decode_tensor,
    default_threads,
    encode_tensor,
    read_info,
)
from .coder import DECODER
from .planes import supported

__all__ = [
    "DECODER",
    "DEFAULT_CHUNK_ELEMS",
    "LosslessFormatError",
    "PayloadInfo",
    "decode_tensor",
    "default_threads",
    "encode_tensor",
    "read_info",
    "supported",
]
