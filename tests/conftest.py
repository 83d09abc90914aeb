import os
from collections import Counter
from pathlib import Path

# One OpenMP thread per process, set before torch is imported and inherited by every server and script the tests
# start: test workers and their servers share the cores, and oversubscribed OpenMP threads spin (on 2 cores the suite
# took 10:17 with torch's default threads, 6:27 with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from idefics_dev import tiny  # noqa: E402
from idefics_cog.config import ROOT  # noqa: E402
from idefics_cog.weights.url_guard import ALLOW_PRIVATE  # noqa: E402


SERVER_TESTS = Path(__file__).parent / "server"
ADAPTER_LIMIT = 3_000_000  # above the tiny base model archive (refused as "not an adapter"), below a padded one


def tiny_env(tiny_dir) -> dict:
    """Settings for a server on the tiny model, with the tiny adapter as `medical`."""
    return {"IDEFICS_BASE_WEIGHTS": str(tiny_dir / "base"), "IDEFICS_ADAPTER_WEIGHTS": str(tiny_dir / "adapter")}


@pytest.fixture(scope="session")
def tiny_dir():
    """The embedded tiny IDEFICS, built once under weights/ (the same place `make predict` uses)."""
    return tiny.build(ROOT / "weights" / "tiny")


@pytest.fixture(scope="session")
def engine(tiny_dir):
    from idefics_cog.serving.engine import Engine

    return Engine.load(tiny_dir / "base", "cpu")


@pytest.fixture
def fresh(tiny_dir):
    """A newly loaded tiny engine (adapters change the model in place)."""
    from idefics_cog.serving.engine import Engine

    return Engine.load(tiny_dir / "base", "cpu")


@pytest.fixture(scope="module")
def alone(tiny_dir):
    """Reference answers: the base alone, and the tiny adapter loaded alone with plain PEFT."""
    from peft import PeftModel
    from transformers import IdeficsForVisionText2Text

    from idefics_cog.serving.engine import Engine
    from tests.support.engine import answer

    base = Engine.load(tiny_dir / "base", "cpu")
    plain = answer(base)
    model = IdeficsForVisionText2Text.from_pretrained(tiny_dir / "base")
    medical = Engine(PeftModel.from_pretrained(model, tiny_dir / "adapter").eval(), base.processor, base.device)
    return {"none": plain, "medical": answer(medical)}


@pytest.fixture(scope="session")
def server(tiny_dir):
    """The real Cog server (coglet) serving predict.py on the tiny model."""
    from idefics_dev.cogrunner import CogServer

    # A small per-adapter limit, so that tests can send a larger lora_weights; lora_weights URLs on the tests'
    # loopback servers allowed (a request's URL must otherwise be https to a public address).
    env = {**tiny_env(tiny_dir), "IDEFICS_MAX_ADAPTER_BYTES": str(ADAPTER_LIMIT), ALLOW_PRIVATE: "1"}
    with CogServer(env=env) as running:
        yield running


def pytest_collection_modifyitems(items):
    """`server`: the test starts the real Cog server (tests/server/, the `server` fixture, or marked by hand);
    `make test-fast` leaves those and the `slow` ones out. Files with such tests run first: the test workers take
    files in this order (most such tests first), and the long ones last would leave the others idle at the end."""
    for item in items:
        if SERVER_TESTS in item.path.parents or "server" in item.fixturenames:
            item.add_marker(pytest.mark.server)
    long = Counter(item.path for item in items
                   if item.get_closest_marker("server") or item.get_closest_marker("slow"))
    items.sort(key=lambda item: -long[item.path])  # stable: each file's tests keep their order
