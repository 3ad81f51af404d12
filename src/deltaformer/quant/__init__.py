"""Quantized number formats: how packed blocks of low-bit integers and scales become tensors again."""
