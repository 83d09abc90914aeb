"""Medical VQA metrics over a dataset in the training format."""
