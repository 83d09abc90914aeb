"""Load IDEFICS's tokenizer and processor so that prompts get the tokens the model was trained with.

IDEFICS was released with transformers 4.32, whose LLaMA fast tokenizer runs the checkpoint's tokenizer.json as
written: its normalizer prepends "▁" to every text piece, also to the text that follows `<image>`,
`<fake_token_around_image>` and `<end_of_utterance>`. transformers 5 maps the checkpoint to `LlamaTokenizer`,
which rebuilds the pipeline from the vocabulary alone (a Metaspace pre-tokenizer that adds "▁" only at the start
of the text), so text after an image or an end of turn becomes word pieces the model rarely saw.

Here the tokenizer is the generic fast tokenizer over tokenizer.json's own pipeline, exactly as the file has it:
the release-era tokens (tests/model/test_tokens.py checks them against transformers 4.32.1). Everything that encodes
prompts for the model (engine, training, evaluation, benchmarks, the `tokens` command) loads through here.
"""

from pathlib import Path

from transformers import AutoImageProcessor, IdeficsProcessor, PreTrainedTokenizerFast

from idefics_cog.errors import InputError


def _check_dir(path: Path, required: tuple[str, ...]) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"base: {path} is not a directory with IDEFICS tokenizer files")
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        raise InputError(f"base: {path} lacks {', '.join(missing)} (an IDEFICS checkpoint has them)")
    return path


class ReleaseTokenizer(PreTrainedTokenizerFast):
    """The generic fast tokenizer: it loads tokenizer.json verbatim (`LlamaTokenizer`, which the checkpoint's
    config names, would rebuild the pipeline)."""

    def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
        # Recent `tokenizers` name a `normalized` special token by its normalized text ("▁</s>") and then fail to
        # skip it; drop special ids here, as the release-era stack did.
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [token_ids] if isinstance(token_ids, int) else token_ids
            token_ids = [i for i in ids if i not in special]
        return super()._decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def piece(self, token_id: int) -> str:
        """The vocabulary piece of `token_id`; special tokens by their own text (not "▁<s>")."""
        added = self.added_tokens_decoder.get(token_id)
        return added.content if added is not None else self.convert_ids_to_tokens(token_id)


def load_tokenizer(path):
    """The checkpoint's tokenizer.json pipeline as written (release-era tokens), left padding for batches."""
    path = _check_dir(path, ("tokenizer.json",))
    tokenizer = ReleaseTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # right padding corrupts the shorter rows of a batch
    return tokenizer


def load_processor(path):
    """An `IdeficsProcessor` holding `load_tokenizer(path)`: the model-card call `processor(text=...)` also gets
    the release-era tokens. Reads only the tokenizer and preprocessor files, never the weights."""
    path = _check_dir(path, ("tokenizer.json", "preprocessor_config.json"))
    return IdeficsProcessor(image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=load_tokenizer(path))
