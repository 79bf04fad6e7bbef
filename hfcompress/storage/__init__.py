"""transformers glue of the lossless codec: decoding payloads while a checkpoint loads (:mod:`.loader`), and
modules whose weights decode at forward time (:mod:`.lazy`). The codec itself is :mod:`hfcompress.lossless`."""
