"""A request's file inputs (serving/files.py): only what Cog converted for a request, each once; image URLs fetched
later, under the address rules, the byte cap and the deadline. The hook through the real server:
tests/server/test_predict_hostile.py."""

import time
from pathlib import Path

import cog.types
import pytest

from idefics_cog.config import ImageLimits
from idefics_cog.errors import InputError
from idefics_cog.serving import files
from idefics_cog.weights.url_guard import ALLOW_PRIVATE
from tests.support.fileserver import FileServer


@pytest.fixture
def hooked(monkeypatch):
    """The hook installed for one test (Cog's own methods come back afterwards)."""
    for name in ("convert", "unlink"):
        monkeypatch.setattr(cog.types.URLPath, name, getattr(cog.types.URLPath, name))
    files.install(max_images=8)
    return files.Files(ImageLimits(max_bytes=1000), download_seconds=30)


def test_only_files_cog_converted_are_claimed_each_once(hooked, tmp_path):
    written = cog.types.Path.validate("data:text/plain;base64,aGVsbG8=").convert()
    assert Path(written).read_bytes() == b"hello"
    assert hooked.claim([("image", written)]) == [("image", Path(written), None)]
    with pytest.raises(InputError, match=r"^images\[1\]: must be a file sent with the request"):
        hooked.claim([("images[1]", written)])  # not twice
    messages = set()
    for path in (tmp_path, tmp_path / "missing.png", Path(__file__), "/etc/passwd"):
        with pytest.raises(InputError) as refused:
            hooked.claim([("image", path)])
        messages.add(str(refused.value))
    assert messages == {f"image: {files.NOT_RECEIVED}"}  # whatever the path is
    Path(written).unlink()


def test_a_url_is_not_fetched_by_cog_and_its_file_is_forgotten_when_removed(hooked):
    with FileServer() as server:
        converted = cog.types.Path.validate(server.add("/x.png", b"png"))
        path = converted.convert()
        assert Path(path).read_bytes() == b"" and server.requests == []  # fetched later, by the request
        converted.unlink()  # coglet, once the prediction has ended
        assert not Path(path).exists()
        with pytest.raises(InputError, match="must be a file sent with the request"):
            hooked.claim([("image", path)])


def test_past_the_image_limit_a_prediction_s_files_are_refused_unwritten(hooked):
    """coglet converts a prediction's files on a pool of its own (threads ThreadPoolExecutor-<pool>_<n>)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # named like coglet's
        results = [pool.submit(cog.types.Path.validate(f"data:,{i}").convert) for i in range(20)]
    written = [r.result() for r in results if r.exception() is None]
    refused = [r.exception() for r in results if r.exception() is not None]
    assert len(written) == 9 and len(refused) == 11
    assert str(refused[0]) == "image, images: more than 9 files given; the limit is 8 per request (IDEFICS_MAX_IMAGES)"
    assert not any(Path(path).exists() for path in written)  # coglet would leave them: the prediction failed


def test_in_a_list_that_mixes_urls_and_paths_the_path_is_named(hooked):
    """coglet 0.23.1 converts no item of such a list: the URL stays a URLPath, the path a plain string."""
    data = cog.types.Path.validate("data:,a")
    with pytest.raises(InputError, match=r"^images\[1\]: must be a file sent with the request"):
        hooked.claim([("images[0]", data), ("images[1]", "/etc/passwd")])


def test_image_urls_are_fetched_under_the_rules_and_the_cap(hooked, tmp_path, monkeypatch):
    """Public https only (here no connection is even made: the loopback address is refused first); with
    IDEFICS_ALLOW_PRIVATE_URLS the cap holds on the bytes received."""
    with FileServer() as server:
        target = tmp_path / "image.png"
        deadline = time.monotonic() + 30
        url = server.add("/big.png", b"x" * 5000)
        monkeypatch.delenv(ALLOW_PRIVATE, raising=False)
        with pytest.raises(InputError, match=r"^image: http://127\.0\.0\.1:\d+/big\.png: only https URLs"):
            hooked.fetch("image", target, url, deadline)
        https = url.replace("http://", "https://")
        with pytest.raises(InputError, match=r"resolves to a loopback, private or link-local address \(127\.0\.0\.1\)"):
            hooked.fetch("images[2]", target, https, deadline)
        assert server.requests == []
        monkeypatch.setenv(ALLOW_PRIVATE, "1")
        with pytest.raises(InputError, match=r"more than the limit of 1000 bytes received; stopped "
                                             r"\(IDEFICS_MAX_IMAGE_BYTES\)"):
            hooked.fetch("image", target, url, deadline)
        hooked.fetch("image", target, server.add("/small.png", b"y" * 1000), deadline)
        assert target.read_bytes() == b"y" * 1000
