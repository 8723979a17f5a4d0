"""Training and held-out data: formats, tokenization, packing, the tokenized cache, batches."""
