"""The model: loading, placement on GPUs, KV cache sizes, tokenizer."""
