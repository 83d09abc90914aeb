class InputError(ValueError):
    """A request the model cannot serve as given; the message names the input and the limit."""
