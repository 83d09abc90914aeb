"""Setup's warm-up: it runs (logged), leaves no trace in the answers, and a failing one fails setup clearly."""

import logging
import re
from dataclasses import replace

import pytest

from idefics_cog.config import Settings
from idefics_cog.serving.service import Service, WarmUpError
from tests.conftest import tiny_env
from tests.support.helpers import noise_image


def settings(tiny_dir, cache, warmup: str) -> Settings:
    return Settings.from_env({**tiny_env(tiny_dir), "IDEFICS_CACHE_DIR": str(cache), "IDEFICS_WARMUP": warmup})


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "xray.png"
    noise_image(1).save(path)
    return path


def first_answers(service: Service, picture) -> list:
    """The first requests a fresh server answers: greedy, then sampled with a seed; text and token ids."""
    found = []
    for sampling in (dict(), dict(temperature=0.8, top_p=0.9, seed=7)):
        text = "".join(service.answer(prompt="What does this X-ray show?", image=picture, max_new_tokens=24,
                                      **sampling))
        found.append((text, service.engine.last_stats.ids))
    return found


@pytest.mark.slow
def test_setup_ends_with_a_warm_up_that_leaves_no_trace_in_the_answers(tiny_dir, tmp_path, picture, caplog):
    with caplog.at_level(logging.INFO):
        warm = Service.from_settings(settings(tiny_dir, tmp_path, "1"))
    assert re.search(r"warm-up: a 4-token prediction and a yes/no scoring in \d+\.\d\d s", caplog.text)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        cold = Service.from_settings(settings(tiny_dir, tmp_path, "0"))
    assert "warm-up" not in caplog.text
    expected = first_answers(cold, picture)
    assert all(len(ids) > 0 for _, ids in expected)
    assert first_answers(warm, picture) == expected


def test_a_failing_warm_up_fails_setup_naming_the_warm_up_and_the_cause(tiny_dir, tmp_path):
    # A server that refuses every image (a real limit, set below what the warm-up sends) fails its warm-up.
    broken = replace(settings(tiny_dir, tmp_path, "1"), max_images=0)
    with pytest.raises(WarmUpError, match=r"setup's warm-up prediction failed \(IDEFICS_WARMUP=0 skips it\): "
                                          r"InputError: .*the limit is 0"):
        Service.from_settings(broken)
