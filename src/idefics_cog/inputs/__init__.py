"""A request's images and prompt made ready for the model."""
