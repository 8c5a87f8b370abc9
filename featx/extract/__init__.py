"""Decoded batches -> one forward pass -> the requested layers, on CPU or GPU, written to the cache."""
