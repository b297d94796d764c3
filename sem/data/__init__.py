"""Bytes to batches: the byte tokenizer, corpora (sources, the train/val split, the memory-mapped token
cache, the compressor anchors) and the datamodule (batches as a pure function of the step)."""
