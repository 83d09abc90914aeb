"""predict.py's Predictor with a fault a request can trigger, for tests only: a prompt containing DEVICE_FAULT
fails on the torch thread with the error CUDA raises after a device-side assert (the device is then unusable)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from predict import Predictor as Served  # noqa: E402

MARKER = "DEVICE_FAULT"


class Predictor(Served):
    def setup(self, weights=None) -> None:
        super().setup(weights)
        prepare = self.service.prepare

        def job(request, fetched):
            made = prepare(request, fetched)
            if any(MARKER in segment for segment in request.segments if isinstance(segment, str)):
                made.encoded = fault  # run by the scheduler, where the prompt would be encoded
            return made

        self.service.prepare = job


def fault():
    raise torch.AcceleratorError("CUDA error: device-side assert triggered (injected by a test)")
