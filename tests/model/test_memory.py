"""The key/value cache sized from the memory left after loading (model/memory.py): the rule with given numbers,
the decoder and placement that follow it, and README's table computed from it."""

import re
from pathlib import Path

import pytest
import torch

from idefics_cog.model.memory import (
    ACTIVATIONS, GiB, MIN_CONTEXT, kv_cache_budget, kv_cache_bytes, minimum_kv_cache_bytes, plan_kv_cache, slot_bytes)
from idefics_cog.model.placement import decide
from idefics_cog.serving.decoder import FastDecoder
from idefics_dev import memory_table
from idefics_dev.tiny import idefics_9b_config
from idefics_cog.serving.jobs import Sampling
from tests.support.engine import CASES, encoded, generate

ROOT = Path(__file__).resolve().parents[2]

NINE_B = idefics_9b_config()
BF16 = 2


def test_a_9b_slot_of_the_full_context_is_its_published_size():
    # 32 layers x 2048 tokens x 4096 wide x keys and values x 2 bytes = 1 GiB; 8 images x 64 latents x 8 blocks;
    # the spare column (32 layers x 4096 x 2 x 2 bytes).
    assert slot_bytes(NINE_B, 2048, 8, BF16) == GiB + 64 * 2**20 + 512 * 2**10


def test_the_budget_is_the_fraction_of_the_total_less_what_is_in_use_and_the_activations():
    assert kv_cache_budget(free=60 * GiB, total=80 * GiB, fraction=0.9) == 72 * GiB - 20 * GiB - ACTIVATIONS
    assert kv_cache_budget(free=60 * GiB, total=80 * GiB, fraction=0.25) < 0  # more in use than the fraction allows


def test_room_for_every_slot_keeps_the_full_context():
    plan = plan_kv_cache(NINE_B, 16, 8, BF16, budget=40 * GiB)
    assert (plan.slots, plan.context_tokens) == (16, 2048) and plan.bytes == kv_cache_bytes(NINE_B, 16, 8, BF16)
    assert plan.bytes <= 40 * GiB


def test_less_room_shortens_the_context_of_every_slot_to_a_multiple_of_256():
    plan = plan_kv_cache(NINE_B, 16, 8, BF16, budget=12 * GiB)
    assert plan.slots == 16 and MIN_CONTEXT <= plan.context_tokens < 2048 and plan.context_tokens % 256 == 0
    assert plan.bytes <= 12 * GiB < kv_cache_bytes(NINE_B, 16, 8, BF16, plan.context_tokens + 256)
    assert "shortened from 2048" in plan.reason


def test_still_less_room_gives_fewer_slots_of_the_shortest_context():
    plan = plan_kv_cache(NINE_B, 16, 8, BF16, budget=3 * GiB)
    assert plan.context_tokens == MIN_CONTEXT and plan.slots == 3 * GiB // slot_bytes(NINE_B, MIN_CONTEXT, 8, BF16) == 5
    assert "5 of IDEFICS_MAX_BATCH=16" in plan.reason and "wait" in plan.reason


def test_no_room_for_one_slot_fails_naming_the_numbers_and_the_settings():
    with pytest.raises(ValueError, match=r"0\.30 GiB for the cache .* needs 0\.56 GiB; quantize "
                                         r"\(IDEFICS_QUANTIZATION\), raise IDEFICS_CACHE_MEMORY_FRACTION"):
        plan_kv_cache(NINE_B, 16, 8, BF16, budget=int(0.3 * GiB))
    with pytest.raises(ValueError, match="not enough GPU memory"):
        plan_kv_cache(NINE_B, 16, 8, BF16, budget=-GiB)


def test_without_a_budget_it_is_max_batch_slots_of_the_full_context():
    plan = plan_kv_cache(NINE_B, 4, 8, BF16, budget=None)
    assert (plan.slots, plan.context_tokens) == (4, 2048)


def test_a_model_context_below_the_minimum_is_kept_and_fewer_slots_taken():
    small = idefics_9b_config(smoke=True)
    small.max_position_embeddings = 512
    budget = 5 * slot_bytes(small, 512, 8, BF16)
    plan = plan_kv_cache(small, 16, 8, BF16, budget)
    assert (plan.slots, plan.context_tokens) == (5, 512)


@pytest.mark.slow
@pytest.mark.parametrize("gb", memory_table.GPUS_GB)
@pytest.mark.parametrize("precision", memory_table.PRECISIONS.values())
def test_placement_keeps_a_model_on_one_gpu_exactly_when_the_cache_rule_finds_a_slot_there(gb, precision, sizes):
    """placement.py's "fits one GPU" (weights + activations + the smallest cache within the fraction) and
    plan_kv_cache's budget after loading are the same inequality."""
    config, counts = sizes
    weights = memory_table.weight_bytes(*counts, precision)
    total = gb * 10**9
    usable = int(0.9 * total) - memory_table.CUDA_RESERVED  # memory.usable_memory before loading
    placement = decide(weights, ACTIVATIONS + minimum_kv_cache_bytes(config, 8, BF16), {0: usable, 1: usable})
    budget = kv_cache_budget(total - memory_table.CUDA_RESERVED - weights, total)
    try:
        plan_kv_cache(config, 16, 8, BF16, budget)
        fits = True
    except ValueError:
        fits = False
    assert (not placement.spread) == fits, (placement.reason, budget)


@pytest.fixture(scope="module")
def sizes():
    return NINE_B, memory_table.parameters(NINE_B)


def readme_table() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("| checkpoint | precision | weights |")
    return text[start:text.index("\n\n", start)]


@pytest.mark.slow
def test_readme_memory_table_is_what_the_rule_computes():
    assert readme_table() == memory_table.table(), "run `python -m idefics_dev.memory_table` and paste it"


def test_readme_no_longer_offers_the_9b_on_16gb_in_bf16():
    row = next(line for line in readme_table().splitlines() if "idefics-9b | bf16" in line)
    assert row.split(" | ")[3] == "no"


def test_the_decoder_allocates_what_the_plan_says(engine):
    decoder = FastDecoder(engine.model, max_batch=3, max_images=2, compile=False, context_tokens=128)
    allocated = sum(t.nbytes for t in (decoder.keys, decoder.values, decoder.image_keys, decoder.image_values))
    assert decoder.max_len == 128 and allocated == kv_cache_bytes(engine.model.config, 3, 2, 4, context_tokens=128)


def test_on_cpu_the_engine_keeps_max_batch_slots_of_the_full_context(engine, caplog):
    assert engine.scheduler.decoder.max_batch == 16
    assert engine.context_tokens == engine.model.config.max_position_embeddings
    with caplog.at_level("INFO", logger="idefics_cog.serving.decoder"):
        decoder = FastDecoder.sized(engine.model, 4, 8, fraction=0.9)
    assert (decoder.max_batch, decoder.max_len) == (4, engine.model.config.max_position_embeddings)
    assert re.search(r"key/value cache: 4 slots of 512 tokens .*no memory budget", caplog.text)


@pytest.mark.slow
def test_a_shortened_context_gives_the_tokens_of_model_generate(engine):
    """A request that fits a 128-token slot decodes, in float32, exactly as `model.generate` alone."""
    text, images = CASES["one image"]
    enc = encoded(engine, text, images)
    new = 128 - enc.num_tokens
    decoder = FastDecoder(engine.model, max_batch=2, max_images=2, compile=False, context_tokens=128)
    tokens = []
    with torch.inference_mode():
        logits = decoder.prefill(engine.model, 1, enc)
        for step in range(new):
            logits[:, engine.banned_ids] = -float("inf")
            tokens.append(int(logits.argmax()))
            if step + 1 < new:
                # slot 1 is decoded as row 1 of a batch of 2 (slot 0 is free: its row is ignored)
                logits = decoder.decode(engine.model, [0, tokens[-1]], [0, enc.num_tokens + step]).logits[1:]
    assert tokens == generate(engine, enc, Sampling(max_new_tokens=new, ignore_eos=True))


def test_a_prompt_over_a_shortened_context_is_refused_naming_the_setting(engine):
    from idefics_cog.errors import InputError
    from idefics_cog.serving.engine import Engine

    shortened = Engine(engine.model, engine.processor, engine.device, max_batch=1)
    shortened.context_tokens = 128  # what a GPU with little memory left gives
    assert shortened.fit_to_context(100, 256) == 28
    with pytest.raises(InputError, match=r"prompt: 130 tokens .* do not fit the context per request that this "
                                         r"server's GPU memory allows \(IDEFICS_CACHE_MEMORY_FRACTION\) of 128"):
        shortened.fit_to_context(130, 10)
