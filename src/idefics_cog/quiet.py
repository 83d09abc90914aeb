"""Keep known, harmless third-party messages out of the logs: they appeared on every start and asked nothing of
the user. Each filter names one message, so anything new still shows."""

import logging
import warnings


def silence_known_noise() -> None:
    """Cheap (imports nothing); run when the package is imported, before peft imports bitsandbytes."""
    # bitsandbytes on CPUs with AVX512-BF16 looks for an optional faster 4-bit kernel (the `kernels` package, from
    # the hub) at import, and logs a warning when it is not installed; its fallback kernel works.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # peft reads transformers' deprecated alias on every adapter load (transformers 5.23, peft 0.21.2).
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def no_loading_bars() -> None:
    """transformers' "Loading weights: 100%|████|" bar: in a server log each redraw is a line of its own. (The hub's
    bars show on a terminal only: hub.py.)"""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
