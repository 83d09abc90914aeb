"""Fixtures of the adapter tests: a fresh engine, and the answers of the base and of the tiny adapter alone."""

import pytest
from peft import PeftModel
from transformers import IdeficsForVisionText2Text

from idefics_cog.serving.engine import Engine
from tests.support.engine import answer

@pytest.fixture
def fresh(tiny_dir):
    """A newly loaded tiny engine (adapters change the model in place)."""
    return Engine.load(tiny_dir / "base", "cpu")


@pytest.fixture(scope="module")
def alone(tiny_dir):
    """Reference answers: the base alone, and the tiny adapter loaded alone with plain PEFT."""
    base = Engine.load(tiny_dir / "base", "cpu")
    plain = answer(base)
    model = IdeficsForVisionText2Text.from_pretrained(tiny_dir / "base")
    medical = Engine(PeftModel.from_pretrained(model, tiny_dir / "adapter").eval(), base.processor, base.device)
    return {"none": plain, "medical": answer(medical)}
