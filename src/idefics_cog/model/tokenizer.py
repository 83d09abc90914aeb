"""IDEFICS's tokenizer and processor, giving the tokens the model was trained with (as transformers 4.32 did)."""

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
    """tokenizer.json verbatim: transformers 5's `LlamaTokenizer` adds "▁" only at the start of the text."""

    def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
        # Recent `tokenizers` name a normalized special token "▁</s>" and then fail to skip it.
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [token_ids] if isinstance(token_ids, int) else token_ids
            token_ids = [i for i in ids if i not in special]
        return super()._decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def piece(self, token_id: int) -> str:
        """Special tokens by their own text (not "▁<s>")."""
        added = self.added_tokens_decoder.get(token_id)
        return added.content if added is not None else self.convert_ids_to_tokens(token_id)


def load_tokenizer(path):
    path = _check_dir(path, ("tokenizer.json",))
    tokenizer = ReleaseTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # right padding corrupts the shorter rows of a batch
    return tokenizer


def load_processor(path):
    """Reads only the tokenizer and preprocessor files, never the weights."""
    path = _check_dir(path, ("tokenizer.json", "preprocessor_config.json"))
    return IdeficsProcessor(image_processor=AutoImageProcessor.from_pretrained(path), tokenizer=load_tokenizer(path))
