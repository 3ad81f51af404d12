"""Quantized weights: GGUF block formats (``gguf_blocks``)."""
