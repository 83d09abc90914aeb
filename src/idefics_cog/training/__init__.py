"""`cog train`: the dataset format (data.py), examples to labelled tokens (examples.py), batches and loss
(collator.py), log lines (callbacks.py), the adapter's .tar (packing.py), the run (run.py)."""
