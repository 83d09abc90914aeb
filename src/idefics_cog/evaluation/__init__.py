"""`python -m idefics_cog.evaluation.run`: medical VQA metrics over a dataset in the training format."""
