"""Requests with different adapters through the real Cog server (coglet) share a batch, and each answer equals the
same request sent alone."""

import re

import pytest

from idefics_dev.cogrunner import CogServer
from idefics_cog.weights.url_guard import ALLOW_PRIVATE
from tests.conftest import tiny_env
from tests.support.fileserver import FileServer
from tests.support.helpers import answer, data_uri, negated_adapter, noise_image, tar_bytes
from tests.support.server import succeeded, together

BATCH_LOG = re.compile(r"decoding (\d+) requests together \(the most so far\), with (\d+) different adapter settings")


@pytest.fixture(scope="module")
def fresh_server(tiny_dir):
    """A server of its own: its log's largest batch is this module's."""
    with CogServer(env={**tiny_env(tiny_dir), ALLOW_PRIVATE: "1"}) as running:
        yield running


@pytest.fixture(scope="module")
def custom_adapter(tiny_dir, tmp_path_factory):
    folder = negated_adapter(tiny_dir / "adapter", tmp_path_factory.mktemp("negated") / "adapter")
    with FileServer() as files:
        yield files.add("/negated.tgz", tar_bytes(folder))


def test_medical_none_and_custom_requests_share_a_batch_and_each_equal_their_answer_alone(fresh_server,
                                                                                          custom_adapter):
    story = {"prompt": "chest normal", "template": "raw", "max_new_tokens": 160}
    xray = {"prompt": "Describe <image> in detail.", "image": data_uri(noise_image(21)), "max_new_tokens": 160}
    calls = [{**story, "adapter": "medical"}, {**story, "adapter": "none"}, {**story, "lora_weights": custom_adapter},
             {**xray, "adapter": "medical"}, {**xray, "adapter": "none"},
             {**xray, "lora_weights": custom_adapter, "lora_scale": 0.5}, {**xray, "adapter": "medical",
                                                                           "lora_scale": 0.5}]
    alone = [answer(fresh_server, inputs) for inputs in calls]  # the custom adapter fetched and loaded here too
    assert len(set(alone)) == len(alone)  # every adapter setting answers differently
    results = together(fresh_server, [(inputs, i % 2 == 0) for i, inputs in enumerate(calls)])
    assert [succeeded(result) for result in results] == alone
    batches = [(int(n), int(settings)) for n, settings in BATCH_LOG.findall(fresh_server.log_path.read_text())]
    assert batches, "the scheduler logged no batch"
    largest, settings = batches[-1]
    assert largest >= 4 and settings >= 3, batches  # they decoded together, with their different adapters
