"""An embedded tiny IDEFICS: deterministic random weights, a trained tiny BPE tokenizer and a LoRA adapter.

`python -m idefics_dev.tiny --out DIR` writes `DIR/base` (laid out like a hub snapshot) and `DIR/adapter` (PEFT).
"""

import argparse
import hashlib
import json
import os
import random
import shutil
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from idefics_cog.inputs.prompt import END_OF_UTTERANCE, FAKE_IMAGE_TOKEN, IMAGE_TOKEN

SEED = 1234
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
SPACE = "▁"  # sentencepiece's word start
IDEFICS_TOKENS = [FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE]  # ids right after the base vocabulary


@dataclass(frozen=True)
class Preset:
    """Sizes of a random IDEFICS. Every Linear width is a multiple of 64 (bitsandbytes 4-bit on CPU needs it)."""

    vocab: int = 448  # base vocabulary; the three IDEFICS special tokens come on top, as in the real checkpoints
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 2
    cross_layer_interval: int = 1
    context_tokens: int = 512
    image_size: int = 30
    patch_size: int = 15
    vision_hidden: int = 64
    vision_intermediate: int = 128
    vision_layers: int = 2
    vision_heads: int = 2
    latents: int = 4
    perceiver_depth: int = 1
    perceiver_heads: int = 2
    perceiver_head_dim: int = 32


PRESETS = {
    "tiny": Preset(),
    # For speed benchmarks on CPU: one plain `model.generate` decode step costs a few ms on 2 cores, with real
    # matrix work in it (not only Python overhead), and a 224 px image as in the real model.
    "bench-small": Preset(
        hidden=384, intermediate=1024, layers=4, heads=6, cross_layer_interval=4,
        image_size=224, patch_size=14, vision_hidden=128, vision_intermediate=256, vision_layers=2, vision_heads=2,
        latents=64, perceiver_depth=1, perceiver_heads=2, perceiver_head_dim=64,
    ),
}

# Words for the tokenizer's training corpus: enough variety for a few hundred BPE merges.
WORDS = """
the a an this that image picture photo scan radiograph x-ray chest lung lungs heart bone bones fracture left right
upper lower lobe opacity normal abnormal finding findings shows show showing there is are no yes not seen visible
patient with without mild moderate severe small large mass nodule lesion skin mole dermoscopy melanoma benign
malignant wrist hand elbow shoulder knee hip spine rib ribs pneumonia effusion edema cardiomegaly consolidation
what which where how why does do can could would describe question answer assistant user describe story dog cat
two one three first second image-left image-right compare between both and or of in on at to from for by as it its
be been being was were has have had red green blue white black grey gray dark bright round oval irregular border
""".split()


def _corpus(lines: int = 4000) -> list[str]:
    rng = random.Random(SEED)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + rng.choice(".?!,")
                 for _ in range(lines)]
    # Conversations in the IDEFICS-instruct shape, so its markers are whole tokens.
    return sentences + [f"User: {a.capitalize()}\nAssistant: {b.capitalize()}" for a, b in zip(sentences, sentences[1:])]


def _added_token(token_id: int, content: str, normalized: bool) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": normalized, "special": True}


def llama_tokenizer_json(vocab: dict[str, int], merges: list[str]) -> dict:
    """A tokenizer.json in the layout of 2023 LLaMA/IDEFICS checkpoints (transformers 4.32's LLaMA conversion):
    normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, BPE with byte fallback, decoder
    Replace/ByteFallback/Fuse/Strip, and IDEFICS's tokens right after the base vocabulary. Written in the
    serialization tokenizers 0.13 reads. `<unk>`/`<s>`/`</s>` are `normalized: true` as in LLaMA hub files of
    2023 (it only decides whether the text right after `<s>` starts with "▁"); the IDEFICS tokens were added as
    special tokens (`normalized: false`)."""
    base = len(vocab)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, t, True) for i, t in enumerate([UNK, BOS, EOS])]
        + [_added_token(base + i, t, False) for i, t in enumerate(IDEFICS_TOKENS)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPACE},
            {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
        ]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [vocab[BOS]], "tokens": [BOS]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": UNK, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "vocab": vocab, "merges": merges,
        },
    }


# tokenizer_config.json / special_tokens_map.json of an IDEFICS checkpoint (LLaMA's, before `added_tokens_decoder`).
TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
    "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": UNK, "padding_side": "left",
    "clean_up_tokenization_spaces": False, "model_max_length": 2048, "additional_special_tokens": IDEFICS_TOKENS,
}
SPECIAL_TOKENS_MAP = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": UNK,
                      "additional_special_tokens": IDEFICS_TOKENS}


def preprocessor_config(image_size: int) -> dict:
    """IDEFICS's image processor (CLIP normalisation) for `image_size` px images."""
    return {
        "image_processor_type": "IdeficsImageProcessor", "processor_class": "IdeficsProcessor",
        "image_size": image_size, "image_num_channels": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_processor_files(out: Path, vocab: dict[str, int], merges: list[str], image_size: int) -> None:
    """The tokenizer and preprocessor files of an IDEFICS checkpoint, in the released layout."""
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "tokenizer.json", llama_tokenizer_json(vocab, merges))
    _write_json(out / "tokenizer_config.json", TOKENIZER_CONFIG)
    _write_json(out / "special_tokens_map.json", SPECIAL_TOKENS_MAP)
    _write_json(out / "preprocessor_config.json", preprocessor_config(image_size))


def train_bpe(vocab: int) -> tuple[dict[str, int], list[str]]:
    """A small BPE trained on "▁"-prefixed words, as sentencepiece trained LLaMA's; `<unk>`, `<s>`, `</s>` are ids
    0-2. Its pieces decode to readable words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(unk_token=UNK))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[UNK, BOS, EOS], show_progress=False,
                                  initial_alphabet=list(string.printable))
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    if bpe.get_vocab_size() != vocab:
        raise RuntimeError(f"tokenizer corpus too small: {bpe.get_vocab_size()} tokens, wanted {vocab}")
    model = json.loads(bpe.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return dict(sorted(model["vocab"].items(), key=lambda item: item[1])), merges


def build_config(p: Preset):
    from transformers import IdeficsConfig

    return IdeficsConfig(
        vocab_size=p.vocab,
        additional_vocab_size=3,
        hidden_size=p.hidden,
        intermediate_size=p.intermediate,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        cross_layer_interval=p.cross_layer_interval,
        max_position_embeddings=p.context_tokens,
        qk_layer_norms=True,
        # "zeros" (the default) makes the gated cross-attention a no-op: images would change nothing.
        # ("normal" crashes in transformers 5.23 with alpha_type="float").
        alpha_initializer="ones",
        use_resampler=True,
        freeze_text_layers=False,
        freeze_vision_layers=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        vision_config=dict(
            embed_dim=p.vision_hidden, image_size=p.image_size, patch_size=p.patch_size,
            intermediate_size=p.vision_intermediate, num_hidden_layers=p.vision_layers,
            num_attention_heads=p.vision_heads,
        ),
        perceiver_config=dict(
            use_resampler=True, resampler_n_latents=p.latents, resampler_depth=p.perceiver_depth,
            resampler_n_heads=p.perceiver_heads, resampler_head_dim=p.perceiver_head_dim,
            qk_layer_norms_perceiver=True,
        ),
    )


def build_processor(image_size: int, vocab: int = Preset.vocab):
    """The tiny tokenizer with an IDEFICS image processor for `image_size` px images, loaded as the real one is."""
    from idefics_cog.model.tokenizer import load_processor

    with tempfile.TemporaryDirectory() as tmp:
        write_processor_files(Path(tmp), *train_bpe(vocab), image_size=image_size)
        return load_processor(tmp)


def build_base(out: Path, p: Preset) -> None:
    import torch
    from transformers import IdeficsForVisionText2Text

    write_processor_files(out, *train_bpe(p.vocab), image_size=p.image_size)

    torch.manual_seed(SEED)
    model = IdeficsForVisionText2Text(build_config(p))
    with torch.no_grad():  # random init is tiny; widen it so that tokens, images and adapters move the logits
        for name, param in model.named_parameters():
            if "norm" not in name and "alpha" not in name:
                param.normal_(0.0, 0.2)
    model.generation_config.pad_token_id = 0  # <unk>, the pad token of TOKENIZER_CONFIG
    model.save_pretrained(out, safe_serialization=True)


def idefics_9b_config(smoke: bool = False):
    """The idefics-9b architecture (models-and-anchors.md), for random-weight benchmarks on a GPU. `smoke`: the
    same shape of model scaled down, so that the code path runs on a CPU. With the tiny tokenizer (ids < 451) the
    vocabulary stays the real 32000 + 2: embedding and output layer have their real size."""
    from transformers import IdeficsConfig

    if smoke:
        text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
        vision = dict(embed_dim=64, image_size=28, patch_size=14, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2)
        perceiver = dict(resampler_depth=1, resampler_n_heads=2, resampler_head_dim=32, resampler_n_latents=8)
    else:
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
        vision = dict(embed_dim=1280, image_size=224, patch_size=14, intermediate_size=5120, num_hidden_layers=32,
                      num_attention_heads=16)
        perceiver = dict(resampler_depth=6, resampler_n_heads=16, resampler_head_dim=96, resampler_n_latents=64)
    return IdeficsConfig(
        vocab_size=32000, additional_vocab_size=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
        cross_layer_interval=4, qk_layer_norms=True, use_resampler=True, alpha_initializer="ones",
        freeze_text_layers=False, freeze_vision_layers=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **text, vision_config=vision,
        perceiver_config=dict(use_resampler=True, qk_layer_norms_perceiver=True, **perceiver),
    )


def random_model(config, device: str, dtype, seed: int = 0):
    """An IdeficsForVisionText2Text with random weights, made directly on `device` in `dtype` (an idefics-9b is
    never materialized in float32 on the CPU)."""
    import torch
    from transformers import IdeficsForVisionText2Text

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return IdeficsForVisionText2Text(config).eval()
    finally:
        torch.set_default_dtype(default)


def build_adapter(base: Path, out: Path) -> None:
    """A LoRA like MedIDEFICS (r=16, alpha=32, q/k/v) whose B matrices are non-zero, so it changes the output."""
    from transformers import IdeficsForVisionText2Text

    random_lora(IdeficsForVisionText2Text.from_pretrained(base), out, seed=SEED + 1, dropout=0.05)


def random_lora(model, out: Path, seed: int, r: int = 16, alpha: int = 32,
                targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj"), std: float = 0.2,
                dropout: float = 0.0) -> Path:
    """A LoRA of `model` with random B matrices (normal, `std`, from `seed`), saved in PEFT's layout to `out`;
    `model`'s own layers are left as they were. Used for the tiny adapter, tests and benchmarks."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=list(targets))
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(out, safe_serialization=True)
    peft_model.unload()  # the base model's layers back as they were
    # PEFT records the absolute path of the base; keep the adapter relocatable.
    config_path = Path(out) / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = "idefics-cog/tiny-idefics"
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    return Path(out)


def build(out: Path, preset: str = "tiny") -> Path:
    """Build DIR/base and DIR/adapter once; an existing complete build is reused. Returns `out`."""
    out = Path(out)
    marker = out / "COMPLETE"
    # The marker records what built it, so a change to this file or the preset rebuilds instead of reusing.
    fingerprint = f"{preset} {hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}\n"
    if marker.exists() and marker.read_text() == fingerprint:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out.parent / f".{out.name}.lock"):  # test workers (pytest -n) build it once between them
        if marker.exists() and marker.read_text() == fingerprint:
            return out
        # Build aside and rename, so an interrupted build never leaves a half model where the loader looks.
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            build_base(staging / "base", PRESETS[preset])
            build_adapter(staging / "base", staging / "adapter")
            (staging / "COMPLETE").write_text(fingerprint)
            if out.exists():
                shutil.rmtree(out)
            os.replace(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write base/ and adapter/ into")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    args = parser.parse_args()
    out = build(args.out, args.preset)
    print(f"tiny IDEFICS ({args.preset}) in {out}/base, LoRA adapter in {out}/adapter")


if __name__ == "__main__":
    main()
