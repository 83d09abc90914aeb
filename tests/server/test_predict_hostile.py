"""Requests built to harm, through the real Cog server, each with neighbours in flight whose answers must not change:
adapters that would rewrite the shared weights or reach every row of a batch, inputs that would stall or swell the
server, server paths as files, slow sources. After each, the tensors every request shares are unchanged (a digest
computed inside the server: tests/support/checksum_predict.py)."""

import gzip
import io
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from idefics_dev.cogrunner import CogServer
from idefics_cog.weights.url_guard import ALLOW_PRIVATE
from tests.support.fileserver import Fault, FileServer
from tests.support.helpers import adapter_copy, data_uri, noise_image, tar_bytes
from tests.support.hostile import not_finite, settings_beyond_plain_lora, with_layer, worker_rss
from tests.support.images import deflated, dicom_bytes
from tests.support.server import send, succeeded, together

PROMPT, IMAGE = "What does this X-ray show?", noise_image(3)
NEIGHBOURS = [  # greedy requests in flight beside each hostile one: base, default adapter, a custom one (below)
    {"prompt": PROMPT, "image": data_uri(IMAGE), "max_new_tokens": 24, "adapter": "none"},
    {"prompt": "Describe the picture.", "image": data_uri(noise_image(4)), "max_new_tokens": 24},
    {"prompt": PROMPT, "image": data_uri(IMAGE), "max_new_tokens": 24, "lora_weights": "GOOD"},
]
THREADS = 2  # the adapter fetch pool of this server: the slow-source test sends more sources than this
TRICKLE_S = 20.0


class Hostile:
    def __init__(self, server: CogServer, files: FileServer, cache: str, temp: Path):
        self.server, self.files, self.cache, self.temp = server, files, cache, temp
        self.good = files.url("/good.tgz")
        self.baseline = [succeeded(send(server, self.neighbour(i))) for i in range(len(NEIGHBOURS))]
        self.digest = self.checksum()

    def neighbour(self, index: int) -> dict:
        inputs = dict(NEIGHBOURS[index])
        if inputs.get("lora_weights") == "GOOD":
            inputs["lora_weights"] = self.good
        return inputs

    def checksum(self) -> str:
        return succeeded(send(self.server, {"prompt": "CHECKSUM"}))

    def beside_neighbours(self, hostile: list[dict]) -> list[dict]:
        """The hostile requests and the neighbours, all at once; every neighbour answers as it did alone, and the
        shared tensors are unchanged afterwards. Returns the hostile requests' results. (Not streamed: the schema
        tool reads @cog.streaming from the test predictor's own file, which does not define `run`.)"""
        calls = [(inputs, False) for inputs in hostile] + [(self.neighbour(i), False) for i in range(len(NEIGHBOURS))]
        results = together(self.server, calls)
        for result, expected in zip(results[len(hostile):], self.baseline):
            assert succeeded(result) == expected
        assert self.checksum() == self.digest, "a hostile request changed the weights every request shares"
        return results[:len(hostile)]


def error_of(result: dict) -> str:
    assert result["code"] == 200 and result["result"]["status"] == "failed", result
    error = result["result"]["error"]
    assert len(error) < 1000, f"an error echoes too much: {len(error)} characters"
    return error


@pytest.fixture(scope="module")
def hostile(tiny_dir, tmp_path_factory):
    made, cache = tmp_path_factory.mktemp("hostile"), tmp_path_factory.mktemp("cache")
    temp = tmp_path_factory.mktemp("server-temp")  # the server's own TMPDIR: other test workers write to /tmp
    env = {"TMPDIR": str(temp), "IDEFICS_BASE_WEIGHTS": str(tiny_dir / "base"),
           "IDEFICS_ADAPTER_WEIGHTS": str(tiny_dir / "adapter"), "COG_PREDICT_TYPE_STUB": "tests/support/checksum_predict.py:Predictor", ALLOW_PRIVATE: "1",
           "IDEFICS_CACHE_DIR": str(cache), "IDEFICS_ADAPTER_FETCH_THREADS": str(THREADS),
           "IDEFICS_MAX_IMAGE_BYTES": "3000000"}
    with FileServer() as files, CogServer(env=env) as server:
        files.add("/good.tgz", tar_bytes(adapter_copy(tiny_dir / "adapter", made / "good")))
        yield Hostile(server, files, str(cache), temp)


def adapter_url(hostile, tiny_dir, tmp_path, name, config=None, tensors=None) -> str:
    folder = adapter_copy(tiny_dir / "adapter", tmp_path / name, config, tensors)
    return hostile.files.add(f"/{name}.tgz", tar_bytes(folder))


def test_configs_beyond_plain_lora_are_refused_by_name_and_change_nothing(hostile, tiny_dir, tmp_path):
    """KaSA truncated the shared weights by SVD in PEFT 0.21; every setting beyond plain LoRA matrices is refused by
    its name before anything is loaded, generated from PEFT's own list of fields."""
    settings = list(settings_beyond_plain_lora().items())
    for start in range(0, len(settings), 10):
        batch = settings[start:start + 10]
        urls = [adapter_url(hostile, tiny_dir, tmp_path, f"cfg-{key}", {key: value}) for key, value in batch]
        results = hostile.beside_neighbours([{"prompt": PROMPT, "lora_weights": url} for url in urls])
        for (key, _), result in zip(batch, results):
            assert f"adapter_config.json sets {key}, which is not supported" in error_of(result)


def test_adapters_on_layers_every_row_shares_are_refused(hostile, tiny_dir, tmp_path):
    """lm_head, the embeddings and the vision embeddings are called directly by the decode step: a LoRA there would
    reach every row of the batch (a request's lm_head adapter made its neighbours fail)."""
    cases = {
        "lm-head-config": ({"target_modules": ["q_proj", "k_proj", "v_proj", "lm_head"]}, None),
        "lm-head-matrices": ({"target_modules": ["q_proj", "k_proj", "v_proj", "lm_head"]},
                             with_layer("lm_head", 64, 448)),
        "additional-fc": ({"target_modules": ["q_proj", "k_proj", "v_proj", "additional_fc"]},
                          with_layer("lm_head.additional_fc", 64, 3)),
        "embeddings": ({"target_modules": ["q_proj", "k_proj", "v_proj", "embed_tokens"]}, None),
        "regex": ({"target_modules": ".*"}, None),
        "rank-too-high": ({"rank_pattern": {"q_proj": 4_000_000}}, None),
        "rank-pattern-regex": ({"rank_pattern": {"(a+)+$": 8}}, None),
        "not-finite": (None, not_finite),
    }
    urls = [adapter_url(hostile, tiny_dir, tmp_path, name, config, tensors)
            for name, (config, tensors) in cases.items()]
    before = worker_rss(hostile.server)
    errors = dict(zip(cases, map(error_of, hostile.beside_neighbours(
        [{"prompt": PROMPT, "lora_weights": url} for url in urls]))))
    assert worker_rss(hostile.server) - before < 300e6  # a rank of 4,000,000 was never allocated
    assert "target_modules names lm_head, which an adapter may not adapt here" in errors["lm-head-config"]
    assert "targets lm_head, which an adapter may not adapt here" in errors["lm-head-matrices"]
    assert "lm_head.additional_fc, which an adapter may not adapt here" in errors["additional-fc"]
    assert "model.embed_tokens, which an adapter may not adapt here" in errors["embeddings"]
    assert "target_modules as a regular expression is not supported" in errors["regex"]
    assert "rank_pattern['q_proj']=4000000 is over the limit of 64" in errors["rank-too-high"]
    assert "rank_pattern key '(a+)+$' is not a module name" in errors["rank-pattern-regex"]
    assert "holds values that are not finite" in errors["not-finite"]


def test_archive_headers_cannot_swell_the_server(hostile, tmp_path):
    """A pax header declaring a gigabyte, and a 40 MB GNU long name (40 kB gzipped), as a stranger's lora_weights."""
    bombs = {"/pax.tar": tar_header(b"././@PaxHeader", 1 << 30, b"x") + b"a" * 400_000,
             "/long.tgz": gzip.compress(tar_header(b"././@LongLink", 40 << 20, b"L") + b"a" * (40 << 20))}
    urls = [hostile.files.add(path, data) for path, data in bombs.items()]
    before = worker_rss(hostile.server)
    errors = [error_of(r) for r in hostile.beside_neighbours([{"prompt": PROMPT, "lora_weights": u} for u in urls])]
    assert worker_rss(hostile.server) - before < 300e6
    assert "the archive has a pax extended header of 1073741824 bytes; the limit is 65536 bytes" in errors[0]
    assert "the archive has a GNU long name header of 41943040 bytes; the limit is 65536 bytes" in errors[1]


def tar_header(name: bytes, size: int, kind: bytes) -> bytes:
    """One ustar header block declaring `size` bytes of body."""
    header = bytearray(512)
    header[:len(name)] = name
    for start, field in ((100, b"0000644\0"), (108, b"0000000\0"), (116, b"0000000\0"), (124, b"%011o\0" % size),
                         (136, b"00000000000\0"), (148, b" " * 8), (156, kind), (257, b"ustar\0"), (263, b"00")):
        header[start:start + len(field)] = field
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def test_a_deflated_dicom_bomb_is_refused_before_it_inflates(hostile):
    """60 MB of pixels deflate to 60 kB; pydicom inflated a whole dataset at once (a 584 kB file took 1.5 GB)."""
    bomb = deflated(dicom_bytes(np.zeros((60, 1000, 500), np.uint16)))
    before = worker_rss(hostile.server)
    (result,) = hostile.beside_neighbours([{"prompt": PROMPT, "image": data_uri(bomb, "application/dicom")}])
    assert worker_rss(hostile.server) - before < 50e6
    assert ("image: the file is a deflated DICOM that inflates to more than 3000000 bytes; the limit is 3000000 "
            "bytes per image (IDEFICS_MAX_IMAGE_BYTES)") in error_of(result)


def test_inputs_over_their_limits_are_refused_before_any_work(hostile):
    """A 5 MB prompt was tokenized on the torch thread, a 400 kB stop sequence checked quadratically on the event
    loop, a 300 kB lora_weights remembered and echoed: each is now refused first, with a short message."""
    cases = [({"prompt": "a" * 5_000_000}, "prompt, system_prompt: 5000000 characters; the limit is 100000"),
             ({"system_prompt": "b" * 100_001}, "characters; the limit is 100000 (IDEFICS_MAX_PROMPT_CHARS)"),
             ({"stop_sequences": "c" * 400_000}, "stop_sequences: 400000 characters; the limit is 16 sequences"),
             ({"stop_sequences": ",".join("d" * 3 for _ in range(17))}, "17 sequences; the limit is 16"),
             ({"stop_sequences": "e" * 257}, "is 257 characters; the limit is 256 (IDEFICS_MAX_STOP_SEQUENCE_CHARS)"),
             ({"lora_weights": "https://example.com/" + "f" * 300_000},
              "lora_weights: 300020 characters; the limit is 2048 (IDEFICS_MAX_LORA_WEIGHTS_CHARS)")]
    results = hostile.beside_neighbours([{"prompt": PROMPT, **inputs} for inputs, _ in cases])
    for (_, expected), result in zip(cases, results):
        assert expected in error_of(result)


def test_paths_on_the_server_are_refused_with_one_message(hostile, tiny_dir):
    """coglet hands a string that is no URL to predict as a path: an existing file answered, and errors told
    whether a path existed, was a directory or how large it was."""
    paths = [str(tiny_dir.parents[1] / "examples" / "xray.png"), "/nonexistent/secret.png", "/etc",
             "/proc/self/environ", tempfile.gettempdir(), str(hostile.temp)]
    results = hostile.beside_neighbours([{"prompt": PROMPT, "image": path} for path in paths] +
                                        [{"prompt": PROMPT, "images": [data_uri(IMAGE), paths[0]]}])
    errors = {error_of(result).rpartition("InputError: ")[2] for result in results[:-1]}
    assert errors == {"image: must be a file sent with the request (an upload, an http(s) URL or a data: URI); "
                      "paths on the server are not read"}
    assert error_of(results[-1]).endswith("images[1]: must be a file sent with the request (an upload, an http(s) "
                                          "URL or a data: URI); paths on the server are not read")


def coglet_temp_files(hostile) -> set[str]:
    """The temporary files the server writes file inputs to (`tempfile.NamedTemporaryFile`: tmp<random><file name>),
    in its own TMPDIR."""
    return {name for name in os.listdir(hostile.temp) if name.startswith("tmp")}


def test_image_urls_are_fetched_under_rules_and_leave_nothing_behind(hostile):
    """An image URL is fetched by the server from the request (loopback allowed here by IDEFICS_ALLOW_PRIVATE_URLS),
    capped at IDEFICS_MAX_IMAGE_BYTES on the bytes received; a failed one leaves no temporary file."""
    png = io.BytesIO()
    IMAGE.save(png, "PNG")
    url = hostile.files.add("/x.png", png.getvalue())
    huge = hostile.files.add("/huge.png", b"\x89PNG" + b"\0" * 50_000_000)
    missing = hostile.files.url("/missing.png")
    before = coglet_temp_files(hostile)
    ok, too_big, not_found = hostile.beside_neighbours([{**NEIGHBOURS[0], "image": u} for u in (url, huge, missing)])
    assert succeeded(ok) == hostile.baseline[0]  # the same answer as the same picture sent as a data URI
    assert (f"image: {huge}: more than the limit of 3000000 bytes received; stopped (IDEFICS_MAX_IMAGE_BYTES)"
            in error_of(too_big))
    assert hostile.files.bytes_served("/huge.png") == 0  # cut off, not read to its end
    assert f"image: {missing}: HTTP 404 Not Found" in error_of(not_found)
    time.sleep(0.5)  # coglet removes a prediction's files just after its response
    assert coglet_temp_files(hostile) - before == set()


def test_thousands_of_tiny_files_are_refused_before_they_are_written(hostile):
    before = coglet_temp_files(hostile)
    (result,) = hostile.beside_neighbours([{"prompt": PROMPT, "images": ["data:,x"] * 2000}])
    assert "image, images: more than 9 files given; the limit is 8 per request (IDEFICS_MAX_IMAGES)" in error_of(result)
    time.sleep(0.5)
    assert coglet_temp_files(hostile) - before == set()


def test_slow_adapter_sources_hold_no_other_request_and_a_cancel_frees_their_threads(hostile, tiny_dir, tmp_path):
    """More trickling sources than fetch threads: requests without them answer meanwhile as fast as ever, and
    cancelling the slow requests stops their downloads, so a new adapter is fetched at once."""
    slow = [hostile.files.add(f"/slow-{i}.tgz", tar_bytes(adapter_copy(tiny_dir / "adapter", tmp_path / f"s{i}")),
                              Fault(trickle=TRICKLE_S)) for i in range(THREADS + 3)]
    ids = {url: f"slow-{number}-{time.monotonic_ns()}" for number, url in enumerate(slow)}
    threads = [threading.Thread(target=requests.post, daemon=True, args=(f"{hostile.server.url}/predictions",),
                                kwargs={"json": {"id": ids[url], "input": {"prompt": PROMPT, "lora_weights": url}},
                                        "timeout": 60})
               for url in slow]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # the slow fetches hold every fetch thread now
    started = time.monotonic()
    for i in range(len(NEIGHBOURS)):  # the custom neighbour's adapter was fetched before: it needs no thread
        assert succeeded(send(hostile.server, hostile.neighbour(i))) == hostile.baseline[i]
    assert time.monotonic() - started < TRICKLE_S / 2
    for url in slow:
        requests.post(f"{hostile.server.url}/predictions/{ids[url]}/cancel", timeout=10)
    for thread in threads:
        thread.join(10)
    fresh = adapter_url(hostile, tiny_dir, tmp_path, "fresh")
    started = time.monotonic()
    assert succeeded(send(hostile.server, {**NEIGHBOURS[0], "adapter": "medical", "lora_weights": fresh}))
    assert time.monotonic() - started < TRICKLE_S / 2  # not queued behind the cancelled fetches
    started = [f"/slow-{i}.tgz" for i in range(len(slow)) if hostile.files.count(f"/slow-{i}.tgz", "GET")]
    deadline = time.monotonic() + 5  # the trickle writes every TRICKLE_S / 100 s: the next write meets the close
    while sum(hostile.files.abandoned[path] for path in started) < len(started) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(started) >= THREADS and [hostile.files.abandoned[path] for path in started] == [1] * len(started)
    assert all(hostile.files.bytes_served(f"/slow-{i}.tgz") == 0 for i in range(len(slow)))


def test_a_failed_adapter_leaves_nothing_in_the_cache(hostile):
    adapters = os.path.join(hostile.cache, "adapters")
    before = set(os.listdir(adapters)) if os.path.isdir(adapters) else set()
    (result,) = hostile.beside_neighbours([{"prompt": PROMPT, "lora_weights": hostile.files.url("/absent.tgz")}])
    assert "HTTP 404" in error_of(result)
    assert set(os.listdir(adapters)) - before == set()


def test_the_smallest_temperatures_sample(hostile):
    """temperature 1e-40 overflowed the logits and failed with a NaN message; it now samples at 0.01."""
    tiny, floor = hostile.beside_neighbours([{**NEIGHBOURS[0], "temperature": 1e-40, "seed": 7},
                                             {**NEIGHBOURS[0], "temperature": 0.01, "seed": 7}])
    assert succeeded(tiny) == succeeded(floor)


def test_an_image_placeholder_in_the_system_prompt_stays_text(hostile):
    """`<image>` typed in system_prompt became a real image token under `instruct`; it is now the visible text
    `<\u200bimage>` (as a control token typed in the prompt), and the request's image binds where it should."""
    typed, plain = hostile.beside_neighbours([{**NEIGHBOURS[0], "system_prompt": "Look: <image>"},
                                              {**NEIGHBOURS[0], "system_prompt": "Look: <\u200bimage>"}])
    assert succeeded(typed) == succeeded(plain)
