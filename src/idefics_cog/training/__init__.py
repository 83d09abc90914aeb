"""`cog train`: a new LoRA adapter from a dataset of images and answers."""
