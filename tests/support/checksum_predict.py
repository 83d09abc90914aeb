"""predict.py's Predictor, for the hostile-request tests: the prompt CHECKSUM answers with a digest of every tensor
that all requests share (the base model's parameters and buffers; the LoRA layers left out), computed on the torch
thread, so that a test can see whether any request changed them."""

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from predict import Predictor as Served  # noqa: E402
from tests.support.hostile import shared_digest  # noqa: E402

MARKER = "CHECKSUM"


class Predictor(Served):
    def setup(self, weights=None) -> None:
        super().setup(weights)
        service, astream = self.service, self.service.astream

        async def answer(record_metric=None, **inputs):
            if inputs.get("prompt") == MARKER:
                yield await asyncio.to_thread(service.engine.run, shared_digest, service.engine.model)
                return
            async for piece in astream(record_metric, **inputs):
                yield piece

        service.astream = answer
