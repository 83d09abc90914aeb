"""Known harmless third-party messages kept out of the logs, each filter naming one, so anything new still shows."""

import logging
import warnings


def silence_known_noise() -> None:
    """Imports nothing: runs when the package is imported, before peft imports bitsandbytes."""
    # bitsandbytes on AVX512-BF16 CPUs warns that the optional `kernels` package is missing; its fallback works.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft reads transformers' deprecated alias on every adapter load (transformers 5.23, peft 0.21.2).
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def no_loading_bars() -> None:
    """In a server log each redraw of transformers' loading bar is a line of its own."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
