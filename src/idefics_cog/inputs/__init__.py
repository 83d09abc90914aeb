"""A request's inputs made ready for the model: images decoded and checked (images.py), the prompt built and encoded
(prompt.py)."""
