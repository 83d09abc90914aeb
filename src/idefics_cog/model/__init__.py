"""The model itself: loading (loading.py, for serving and training), placement on GPUs (placement.py), the tokenizer
and processor (tokenizer.py)."""
