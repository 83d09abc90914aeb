"""A server runs all its torch work on one thread (engine.TorchThread): a second thread's OpenMP team would make
every operation of the first wait for sleeping workers (BENCHMARKS.md, issue 13)."""

import threading

from idefics_cog.config import Settings
from idefics_cog.serving import engine as engine_module
from idefics_cog.serving.decoder import FastDecoder
from idefics_cog.serving.engine import TorchThread
from idefics_cog.serving.service import Service
from idefics_cog.serving.adapters import Adapters
from tests.conftest import tiny_env
from tests.support.helpers import noise_image


def test_loading_the_adapter_the_warm_up_and_predictions_share_the_generation_thread(tiny_dir, tmp_path,
                                                                                     monkeypatch):
    seen: dict[str, set[int]] = {}  # what ran -> the threads it ran on

    def on_record(owner, name: str) -> None:
        function = getattr(owner, name)

        def recorded(*args, **kwargs):
            seen.setdefault(name, set()).add(threading.get_ident())
            return function(*args, **kwargs)

        monkeypatch.setattr(owner, name, recorded)

    on_record(engine_module, "load_model")
    on_record(engine_module, "Scheduler")  # allocates the key/value cache
    on_record(Adapters, "_load")
    on_record(Adapters, "select")
    for name in ("prefill", "decode"):
        on_record(FastDecoder, name)
    env = {**tiny_env(tiny_dir), "IDEFICS_CACHE_DIR": str(tmp_path), "IDEFICS_WARMUP": "1"}
    service = Service.from_settings(Settings.from_env(env))
    picture = tmp_path / "xray.png"
    noise_image(1).save(picture)
    for adapter in ("medical", "none"):
        assert "".join(service.answer(prompt="What does this X-ray show?", image=picture, max_new_tokens=4,
                                      adapter=adapter))
    torch_thread = service.engine.run(threading.get_ident)
    assert seen == {name: {torch_thread} for name in
                    ("load_model", "Scheduler", "_load", "select", "prefill", "decode")}
    assert torch_thread != threading.get_ident()


def test_work_sent_to_the_torch_thread_from_itself_runs_there_at_once():
    thread = TorchThread()  # waiting on itself would never end
    assert thread.run(lambda: thread.run(threading.get_ident)) == thread.ident != threading.get_ident()
    thread.shutdown()
