"""Placement on GPUs, decided without one: sizes from checkpoint headers and real IDEFICS configs, then the choice."""

import logging
import math
import warnings

import pytest
import torch
from accelerate import init_empty_weights
from transformers import IdeficsConfig, IdeficsForVisionText2Text

from idefics_cog.model.loading import quantization_config
from idefics_cog.model.memory import kv_cache_bytes, minimum_kv_cache_bytes
from idefics_cog.serving.decoder import FastDecoder
from idefics_cog.model.placement import ACTIVATIONS, checkpoint_shapes, decide, parameter_counts, place, weight_bytes

GB = 10**9


def idefics_config(size: str) -> IdeficsConfig:
    """The published idefics-9b / idefics-80b architecture (shared notes, models-and-anchors)."""
    text = {"9b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
            "80b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64)}
    return IdeficsConfig(
        vocab_size=32000, additional_vocab_size=2, max_position_embeddings=2048, cross_layer_interval=4,
        qk_layer_norms=True, use_resampler=True, **text[size],
        vision_config=dict(embed_dim=1280, image_size=224, patch_size=14, intermediate_size=5120,
                           num_hidden_layers=32, num_attention_heads=16),
        perceiver_config=dict(resampler_depth=6, resampler_n_heads=16, resampler_head_dim=96,
                              resampler_n_latents=64))


@pytest.fixture(scope="module")
def sizes():
    """(weights in bf16, weights in 4-bit, fast-path working bytes: activations and its smallest cache) of the
    real architectures,
    counted on models built on the meta device (no memory, no download)."""
    found = {}
    for size in ("9b", "80b"):
        config = idefics_config(size)
        with init_empty_weights():
            model = IdeficsForVisionText2Text(config)
        counts = parameter_counts({key: tuple(t.shape) for key, t in model.state_dict().items()})
        found[size] = dict(bf16=weight_bytes(*counts, "none"), nf4=weight_bytes(*counts, "4bit"),
                           working=ACTIVATIONS + minimum_kv_cache_bytes(config, 8, 2), parameters=sum(counts))
    return found


@pytest.mark.slow
def test_the_real_architectures_have_their_published_sizes(sizes):
    assert 8.9e9 < sizes["9b"]["parameters"] < 9.0e9  # idefics-9b: 8.93 B parameters
    assert 79e9 < sizes["80b"]["parameters"] < 81e9
    assert 17 * GB < sizes["9b"]["bf16"] < 18 * GB and 4.5 * GB < sizes["9b"]["nf4"] < 5.5 * GB


def test_9b_in_bf16_on_two_80gb_gpus_goes_on_one(sizes):
    placement = decide(sizes["9b"]["bf16"], sizes["9b"]["working"], {0: 80 * GB, 1: 80 * GB})
    assert placement.device_map == {"": 0} and placement.max_memory is None and not placement.spread
    assert "alone" in placement.reason


def test_one_gpu_is_the_one_with_the_most_free_memory(sizes):
    placement = decide(sizes["9b"]["bf16"], sizes["9b"]["working"], {0: 30 * GB, 1: 79 * GB, 2: 60 * GB})
    assert placement.device_map == {"": 1}


def test_80b_in_bf16_on_two_80gb_gpus_is_spread_and_says_what_it_costs(sizes):
    free = {0: 80 * GB, 1: 80 * GB}
    placement = decide(sizes["80b"]["bf16"], sizes["80b"]["working"], free, cpu=400 * GB)
    assert placement.spread and placement.device_map == "auto"
    assert placement.max_memory == {0: 80 * GB - ACTIVATIONS, 1: 80 * GB - ACTIVATIONS, "cpu": 400 * GB}
    assert "fast path is off" in placement.reason and "model.generate" in placement.reason
    assert "CPU memory" in placement.reason  # 160 GB of weights do not fit 2 x 80 GB with room to run


@pytest.mark.filterwarnings("ignore:Current model requires")  # accelerate: the empty GPUs hold no buffers
def test_what_the_gpus_cannot_hold_goes_to_cpu_memory_not_to_disk(tiny_dir):
    """accelerate sends what its max_memory leaves over to "disk" (which needs an offload folder) unless the CPU
    is listed: the spread placement lists it."""
    from accelerate import infer_auto_device_map

    with init_empty_weights():
        model = IdeficsForVisionText2Text(IdeficsConfig.from_pretrained(tiny_dir / "base"))
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    placement = decide(size, 0, {0: size // 4, 1: size // 4}, cpu=10 * size)  # GPUs with no room left
    assert placement.spread
    devices = set(infer_auto_device_map(model, max_memory=placement.max_memory).values())
    assert "cpu" in devices and "disk" not in devices, devices


def test_9b_on_two_16gb_gpus_is_spread(sizes):
    placement = decide(sizes["9b"]["bf16"], sizes["9b"]["working"], {0: 16 * GB, 1: 16 * GB})
    assert placement.spread and "CPU memory" not in placement.reason


def test_4bit_9b_on_one_16gb_gpu_goes_on_it(sizes):
    placement = decide(sizes["9b"]["nf4"], sizes["9b"]["working"], {0: 14 * GB})  # 0.9 x 16 GB, less CUDA's
    assert placement.device_map == {"": 0} and not placement.spread and "more than it has" not in placement.reason


def test_a_lone_gpu_too_small_says_what_to_change(sizes):
    placement = decide(sizes["9b"]["bf16"], sizes["9b"]["working"], {0: 14 * GB})
    assert placement.device_map == {"": 0}
    assert "IDEFICS_QUANTIZATION" in placement.reason and "IDEFICS_CACHE_MEMORY_FRACTION" in placement.reason


def test_without_a_gpu_it_is_the_cpu(sizes):
    assert decide(sizes["9b"]["bf16"], sizes["9b"]["working"], {}).device_map == {"": "cpu"}


def test_place_takes_an_explicit_device_as_given_and_logs_it(tiny_dir, caplog):
    with caplog.at_level(logging.INFO, logger="idefics_cog.model.placement"):
        assert place(tiny_dir / "base", torch.device("cpu"), "none", 0).device_map == {"": "cpu"}
        assert place(tiny_dir / "base", torch.device("cuda", 1), "none", 0).device_map == {"": 1}
    assert "placement: on cpu" in caplog.text and "placement: on GPU 1" in caplog.text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_without_a_gpu_is_refused_by_name(tiny_dir):
    with pytest.raises(ValueError, match="IDEFICS_DEVICE=cuda, but no GPU is visible"):
        place(tiny_dir / "base", torch.device("cuda"), "none", 0)


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
def test_sizes_from_the_checkpoint_headers_match_the_loaded_model(tiny_dir, quantization):
    quantizable, other = parameter_counts(checkpoint_shapes(tiny_dir / "base"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = IdeficsForVisionText2Text.from_pretrained(
            tiny_dir / "base", dtype=torch.float32, device_map={"": "cpu"},
            quantization_config=quantization_config(quantization, torch.float32))
    if quantization == "none":
        assert quantizable + other == sum(p.numel() for p in model.parameters())
    else:  # exactly the layers bitsandbytes quantized
        assert quantizable == sum(math.prod(getattr(m.weight, "quant_state", None).shape) if quantization == "4bit"
                                  else m.weight.numel() for m in model.modules() if "bit" in type(m).__name__)
    estimate, actual = weight_bytes(quantizable, other, quantization, dtype_bytes=4), model.get_memory_footprint()
    assert abs(estimate - actual) < 0.02 * actual, (estimate, actual)


def test_cache_bytes_is_what_the_fast_decoder_allocates(engine):
    decoder = FastDecoder(engine.model, max_batch=3, max_images=2, compile=False)
    allocated = sum(t.nbytes for t in (decoder.keys, decoder.values, decoder.image_keys, decoder.image_values))
    assert kv_cache_bytes(engine.model.config, 3, 2, 4) == allocated
