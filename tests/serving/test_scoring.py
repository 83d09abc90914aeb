"""`choices` and `logprobs` on the tiny model in float32: each candidate's scores equal a plain transformers forward
of the whole transcript, with any adapter; reported log-probabilities equal the plain forward's on both decode paths
and do not change with the batch; a scoring job fails alone; why an answer ended."""

import math

import pytest
import torch

from idefics_cog.inputs.choices import answered, candidate_ids
from idefics_cog.inputs.prompt import build_segments, encode, tokenize
from idefics_cog.serving.adapters import Adapters
from idefics_cog.serving.engine import Engine
from idefics_cog.serving.jobs import Job, Sampling
from idefics_cog.serving.scoring import choice_table
from tests.support.engine import CASES, other_adapter, selecting, submit_together, tokens_of

CANDIDATES = ["yes", "no", "a pleural effusion on the left"]


def plain_logprobs(engine, segments, images, answer_ids: list[int]) -> list[float]:
    """The answer's tokens' log-probabilities from one plain forward of prompt + answer, the image tokens banned
    (as the server never writes them)."""
    enc = encode(segments, images, engine.processor)
    ids = torch.cat([enc.input_ids, torch.tensor([answer_ids])], 1)
    mask = enc.image_attention_mask
    mask = torch.cat([mask, mask[:, -1:].expand(-1, len(answer_ids), -1)], 1)
    with torch.inference_mode():
        logits = engine.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=enc.pixel_values,
                              image_attention_mask=mask).logits[0].float()
        logits[:, engine.banned_ids] = -math.inf
        logprobs = torch.log_softmax(logits, -1)
    start = enc.num_tokens
    return [logprobs[start - 1 + i, token].item() for i, token in enumerate(answer_ids)]


def reference_table(engine, segments, images, texts):
    """Each candidate as its whole transcript, forwarded alone."""
    prompt = tokenize(segments, engine.tokenizer)
    scores = []
    for text in texts:
        ids = tokenize(answered(segments, text), engine.tokenizer)
        scores.append(plain_logprobs(engine, segments, images, ids[len(prompt):]))
    return choice_table(texts, scores)


def assert_tables_close(got, expected):
    assert [row["text"] for row in got] == [row["text"] for row in expected]
    assert [row["tokens"] for row in got] == [row["tokens"] for row in expected]
    for ours, theirs in zip(got, expected):
        for key in ("probability", "logprob", "mean_logprob"):
            assert ours[key] == pytest.approx(theirs[key], abs=1e-4), key
    assert math.fsum(row["probability"] for row in got) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_choices_equal_a_plain_forward_of_each_transcript(engine, case):
    text, images = CASES[case]
    segments = build_segments(text, len(images))
    assert_tables_close(engine.choose(segments, list(images), CANDIDATES),
                        reference_table(engine, segments, list(images), CANDIDATES))


def test_the_prompt_and_its_images_are_computed_once_and_the_candidates_in_one_forward(engine):
    text, images = CASES["two images with placeholders"]
    calls = {"vision": 0, "model": 0}
    model = engine.model

    def count(name):
        def hook(*args):
            calls[name] += 1
        return hook

    hooks = [model.model.vision_model.register_forward_hook(count("vision")),
             model.register_forward_hook(count("model"))]
    try:
        engine.choose(build_segments(text, len(images)), list(images), CANDIDATES)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"vision": 1, "model": 2}


def test_choices_with_an_adapter_selected_equal_the_plain_forward_of_that_adapter(fresh, tiny_dir, tmp_path):
    adapters = Adapters(fresh, tmp_path)
    adapters.load_default(str(tiny_dir / "adapter"))
    other = str(other_adapter(tiny_dir / "base", tmp_path / "other", seed=5))
    text, images = CASES["one image"]
    segments = build_segments(text, len(images))
    tables = []
    for choice in [("medical", "", 1.0), ("none", "", 1.0), ("medical", other, 0.5)]:
        fresh.run(selecting(adapters, *choice))
        got = fresh.choose(segments, list(images), CANDIDATES)
        assert_tables_close(got, reference_table(fresh, segments, list(images), CANDIDATES))
        tables.append([row["logprob"] for row in got])
    assert len({tuple(table) for table in tables}) == 3  # each adapter scores differently


def scoring_job(engine, text, images, texts):
    segments = build_segments(text, len(images))
    ids = tokenize(segments, engine.tokenizer)
    return Job(encode(segments, list(images), engine.processor, ids), Sampling(),
               choices=candidate_ids(segments, texts, ids, engine.tokenizer))


def generating_job(engine, text, images, **sampling):
    enc = encode(build_segments(text, len(images)), list(images), engine.processor)
    return Job(enc, Sampling(**sampling))


def test_a_scoring_job_beside_generating_ones_changes_no_answer(engine):
    text, images = CASES["one image"]
    generating = [generating_job(engine, "Tell me about lungs.", [], max_new_tokens=20),
                  generating_job(engine, *CASES["two images with placeholders"], max_new_tokens=20)]
    alone = [tokens_of(submit_together(engine, [job])[0]) for job in generating]
    again = [generating_job(engine, "Tell me about lungs.", [], max_new_tokens=20),
             generating_job(engine, *CASES["two images with placeholders"], max_new_tokens=20)]
    scoring = scoring_job(engine, text, images, CANDIDATES)
    received = submit_together(engine, [again[0], scoring, again[1]])
    assert [tokens_of(received[0]), tokens_of(received[2])] == alone
    assert_tables_close(choice_table(CANDIDATES, scoring.scores),
                        reference_table(engine, build_segments(text, 1), list(images), CANDIDATES))


def test_a_scoring_job_that_fails_ends_alone(engine, monkeypatch):
    from idefics_cog.serving import alone

    def broken(*args):
        raise RuntimeError("scoring broke")

    monkeypatch.setattr(alone, "candidate_logprobs", broken)
    neighbour = generating_job(engine, "Tell me about lungs.", [], max_new_tokens=12)
    expected = tokens_of(submit_together(engine, [generating_job(engine, "Tell me about lungs.", [],
                                                                 max_new_tokens=12)])[0])
    received = submit_together(engine, [scoring_job(engine, *CASES["one image"], CANDIDATES), neighbour])
    assert str(received[0][-1]) == "scoring the choices failed: RuntimeError: scoring broke"
    assert tokens_of(received[1]) == expected


def logprob_job(engine, text, images, logprobs=3, **sampling):
    job = generating_job(engine, text, images, **{"max_new_tokens": 12, **sampling})
    job.logprobs = logprobs
    return job


def check_against_the_plain_forward(engine, text, images, job, received):
    tokens = tokens_of(received)
    assert [report["id"] for report in job.token_logprobs] == tokens
    expected = plain_logprobs(engine, build_segments(text, len(images)), list(images), tokens)
    assert [report["logprob"] for report in job.token_logprobs] == pytest.approx(expected, abs=1e-4)
    for report in job.token_logprobs:
        assert len(report["top"]) == job.logprobs
        values = [value for _, value in report["top"]]
        assert values == sorted(values, reverse=True) and report["logprob"] <= values[0] + 1e-6


@pytest.mark.parametrize("path", ["fast", "transformers"])
def test_reported_logprobs_equal_the_plain_forward_on_each_decode_path(tiny_dir, path):
    engine = Engine.load(tiny_dir / "base", "cpu", decode_path=path)
    for case, (text, images) in CASES.items():
        job = logprob_job(engine, text, images)
        check_against_the_plain_forward(engine, text, images, job, submit_together(engine, [job])[0])


def test_reported_logprobs_do_not_change_with_the_batch(engine):
    text, images = CASES["one image"]
    alone = logprob_job(engine, text, images, logprobs=5, temperature=0.7, seed=3)
    submit_together(engine, [alone])
    together = logprob_job(engine, text, images, logprobs=5, temperature=0.7, seed=3)
    neighbours = [generating_job(engine, "Tell me about lungs.", [], max_new_tokens=30),
                  logprob_job(engine, *CASES["two images with placeholders"], logprobs=2, repetition_penalty=1.3)]
    received = submit_together(engine, [neighbours[0], together, neighbours[1]])
    assert engine.scheduler.largest_batch >= 3
    assert [r["id"] for r in together.token_logprobs] == [r["id"] for r in alone.token_logprobs]
    for ours, theirs in zip(together.token_logprobs, alone.token_logprobs):
        assert ours["logprob"] == pytest.approx(theirs["logprob"], abs=1e-5)
        assert [i for i, _ in ours["top"]] == [i for i, _ in theirs["top"]]
    # Sampling settings and penalties change the pick, never the reported distribution.
    check_against_the_plain_forward(engine, *CASES["two images with placeholders"], neighbours[1], received[2])


def test_why_an_answer_ended(engine):
    text, images = CASES["one image"]
    first = "".join(engine.stream(generating_job(engine, text, images, max_new_tokens=8)))
    cases = [(dict(max_new_tokens=8), "length"), (dict(max_new_tokens=8, stop_sequences=[first[2:5]]),
                                                   "stop_sequence")]
    for sampling, reason in cases:
        job = generating_job(engine, text, images, **sampling)
        "".join(engine.stream(job))
        assert job.stats.finish_reason == reason
    eos = engine.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    job = generating_job(engine, text, images, max_new_tokens=8)
    job.stats.ids = []
    from idefics_cog.serving.engine import _Reader
    from idefics_cog.serving.jobs import END

    reader = _Reader(engine.tokenizer, job, engine.eos_token_ids)
    reader.take([5, eos])
    reader.take(END)
    assert job.stats.finish_reason == "end_of_turn"


def test_candidates_that_do_not_fit_the_context_with_the_prompt_are_refused(engine):
    from idefics_cog.errors import InputError

    context = engine.model_context_tokens
    segments = build_segments("lungs " * (context - 40), 0)
    prompt = len(tokenize(segments, engine.tokenizer))
    assert prompt < context
    with pytest.raises(InputError, match=rf"choices: the prompt \({prompt} tokens, 3 per image\) and the candidates "
                                         rf"\(\d+ tokens in all\) do not fit the model's context of {context} tokens"):
        engine.choose(segments, [], [f"finding number {i}" for i in range(16)])


def test_a_stream_closed_before_its_end_was_cancelled(engine):
    text, images = CASES["one image"]
    job = generating_job(engine, text, images, max_new_tokens=200, ignore_eos=True)
    stream = engine.stream(job)
    next(stream)
    stream.close()
    assert job.stats.finish_reason == "cancel" and len(job.stats.ids) < 200


@pytest.mark.parametrize("path", ["fast", "transformers"])
def test_the_json_result_holds_every_tokens_logprobs_when_a_stop_sequence_ends_it(tiny_dir, tmp_path, path):
    """model.generate reports them when it returns, after the reader has stopped at the stop sequence."""
    import asyncio
    import json

    from idefics_cog.config import Settings
    from idefics_cog.serving.service import Service
    from tests.conftest import tiny_env

    env = {**tiny_env(tiny_dir), "IDEFICS_CACHE_DIR": str(tmp_path), "IDEFICS_WARMUP": "0", "IDEFICS_ENGINE": path}
    service = Service.from_settings(Settings.from_env(env))
    request = dict(prompt="Tell me about lungs.", max_new_tokens=40, adapter="none")
    plain = "".join(service.answer(**request))
    stop = plain.split()[2]

    async def result() -> dict:
        pieces = [piece async for piece in service.astream(**request, stop_sequences=stop, logprobs=2,
                                                           output_format="json")]
        return json.loads("".join(pieces))

    document = asyncio.run(result())
    assert document["finish_reason"] == "stop_sequence" and document["text"] == plain[:plain.index(stop)]
    assert len(document["logprobs"]) == document["usage"]["completion_tokens"] > 0


def test_a_scoring_job_is_not_held_behind_a_full_batch(tiny_dir):
    engine = Engine.load(tiny_dir / "base", "cpu", max_batch=2)
    long = [generating_job(engine, "Tell me about lungs.", [], max_new_tokens=400, ignore_eos=True)
            for _ in range(2)]
    for job in long:
        engine.submit(job, lambda item: None)
    scoring = scoring_job(engine, *CASES["one image"], CANDIDATES)
    received = submit_together(engine, [scoring])
    assert scoring.scores is not None and not isinstance(received[0][-1], BaseException)
    assert not any(job.finished.is_set() for job in long)  # scored while both slots were still decoding
    for job in long:
        job.cancel()
        assert job.finished.wait(60)


def test_choose_checks_the_candidates_as_a_request_does(engine):
    from idefics_cog.errors import InputError

    text, images = CASES["one image"]
    segments = build_segments(text, len(images))
    table = engine.choose(segments, list(images), [" yes ", "no"])
    assert [row["text"] for row in table] == ["yes", "no"]
    assert table == engine.choose(segments, list(images), ["yes", "no"])
    for texts, message in ([["yes", "yes "], "given twice"], [["yes"], "at least 2"], [["yes", ""], "is empty"],
                           [[f"c{i}" for i in range(33)], "the limit is 32"]):
        with pytest.raises(InputError, match=message):
            engine.choose(segments, list(images), texts)
