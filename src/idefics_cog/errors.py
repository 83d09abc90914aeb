"""The error types more than one part raises or catches. Each message names the input or the source, and the limit."""


class InputError(ValueError):
    """A request the model cannot serve as given; the message names the input and the limit."""


class WeightsError(RuntimeError):
    """A weight source that cannot be used; the message names the source."""


class UnreachableError(WeightsError):
    """Weights in no cache, from a hub that cannot be used now (offline, unreachable): another source would do."""


class AdapterError(ValueError):
    """An adapter that does not fit the base model or is not in the standard PEFT layout."""
