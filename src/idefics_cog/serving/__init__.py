"""Predictions: from a request's inputs to its streamed answer."""
