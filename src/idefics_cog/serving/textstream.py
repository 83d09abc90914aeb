"""Generated token ids to streamed text pieces: whole words only, stop sequences cut without leaking."""

from collections.abc import Sequence

from tokenizers.decoders import DecodeStream

from idefics_cog.config import RequestLimits
from idefics_cog.errors import InputError, shorten

# An incomplete multi-byte character decodes to this: wait for the rest.
_INCOMPLETE = "\ufffd"


def parse_stop_sequences(value: str, limits: RequestLimits = RequestLimits()) -> list[str]:
    """Comma-separated; sizes checked before the text is split, so each token's check costs at most their length."""
    count, longest = limits.stop_sequences, limits.stop_sequence_chars
    if len(value) > count * (longest + 1):
        raise InputError(f"stop_sequences: {len(value)} characters; the limit is {count} sequences of at most "
                         f"{longest} characters (IDEFICS_MAX_STOP_SEQUENCES, IDEFICS_MAX_STOP_SEQUENCE_CHARS)")
    found = [s for s in value.split(",") if s]
    if len(found) > count:
        raise InputError(f"stop_sequences: {len(found)} sequences; the limit is {count} (IDEFICS_MAX_STOP_SEQUENCES)")
    for stop in found:
        if len(stop) > longest:
            raise InputError(f"stop_sequences: {shorten(repr(stop), 40)} is {len(stop)} characters; the limit is "
                             f"{longest} (IDEFICS_MAX_STOP_SEQUENCE_CHARS)")
    return found


class _Incremental:
    """`tokenizers`' `DecodeStream` (a window of a few tokens per step). A run of byte-fallback tokens (`<0xE2>`...)
    goes to it only with the token that ends the run: a later byte can change how the earlier ones read."""

    def __init__(self, tokenizer, redecode: bool = False):
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.special = set(tokenizer.all_special_ids)
        self.stream = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []  # `finish` may have to decode them all once
        self.run: list[int] = []  # the byte-fallback tokens not yet given to the stream
        self.pending = False  # the stream waits on an incomplete character
        self.text, self.start = "", 0  # the decoded text from character `start` on
        # Decode the whole answer at each push: when spaces are cleaned up, or once the stream refused a step.
        self.redecode = redecode

    def push(self, ids: Sequence[int]) -> None:
        for i in ids:
            if i in self.special:
                continue
            self.ids.append(i)
            self.run.append(i)
            if not self._is_byte(i):
                self._step()

    def _step(self) -> None:
        if not self.redecode:
            try:
                piece = self.stream.step(self.backend, self.run)
            except Exception:  # correct text wins over speed for the rest of this answer
                self.redecode = True
            else:
                self.pending = piece is None
                self.text += piece or ""
        self.run = []

    def _is_byte(self, token_id: int) -> bool:
        piece = self.backend.id_to_token(token_id) or ""
        return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")

    def finish(self) -> None:
        if self.pending or self.run or self.redecode:
            self.run = []
            self.text = self._decoded()

    def text_from(self, start: int) -> str:
        if self.redecode:
            self.text = self._decoded()
        self.text, self.start = self.text[start - self.start:], start
        return self.text

    def _decoded(self) -> str:
        """Without an open byte run (a later byte can change it)."""
        ids = self.ids[:len(self.ids) - len(self.run)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)[self.start:]


class _Redecoded:
    """A tokenizer without a fast backend: the whole answer decoded again at each push."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []

    def push(self, ids: Sequence[int]) -> None:
        self.ids.extend(ids)

    def finish(self) -> None:
        pass

    def text_from(self, start: int) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)[start:]


def _source(tokenizer):
    if hasattr(tokenizer, "backend_tokenizer"):
        # DecodeStream does not clean up spaces over the whole text afterwards, as such a decode does.
        return _Incremental(tokenizer, redecode=getattr(tokenizer, "clean_up_tokenization_spaces", False))
    return _Redecoded(tokenizer)


class TextStream:
    """`push` token ids, get the text safe to show; `finish` returns the rest. Held back until the next token:
    trailing whitespace, an incomplete character, a possible start of a stop sequence."""

    def __init__(self, tokenizer, stop_sequences: Sequence[str] = ()):
        self.stop_sequences = [s for s in stop_sequences if s]
        self.source = _source(tokenizer)
        self.released = 0  # characters of the decoded text already returned
        self.stopped = False

    def push(self, ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.source.push(ids)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self.source.finish()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self.source.text_from(self.released)
        cut = min((i for i in (text.find(s) for s in self.stop_sequences) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            safe = cut
        elif final:
            safe = len(text)
        else:
            safe = min(len(text.rstrip(_INCOMPLETE).rstrip()), len(text) - self._stop_prefix_length(text))
        self.released += safe
        return text[:safe]

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop sequence."""
        longest = 0
        for stop in self.stop_sequences:
            tail = text[max(0, len(text) - len(stop) + 1):] if len(stop) > 1 else ""
            start = tail.find(stop[0])
            while start >= 0 and len(tail) - start > longest:
                if stop.startswith(tail[start:]):
                    longest = len(tail) - start
                    break
                start = tail.find(stop[0], start + 1)
        return longest
