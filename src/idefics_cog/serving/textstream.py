"""Turn generated token ids into streamed text: whole words only, and stop sequences cut without leaking."""

from collections.abc import Sequence

# A tokenizer decodes an incomplete multi-byte character to this; wait for the rest before emitting.
_INCOMPLETE = "\ufffd"


def parse_stop_sequences(value: str) -> list[str]:
    """`stop_sequences` input: comma-separated; empty items are ignored."""
    return [s for s in value.split(",") if s]


class TextStream:
    """Feed token ids with `push`, get the text that is safe to show; `finish` returns the rest.

    The text is always `tokenizer.decode(all ids so far)`, so the joined stream equals the non-streamed decode.
    Three kinds of tail are held back until the next token settles them: trailing whitespace (tokenization-space
    cleanup may remove it before punctuation), an incomplete character, and any text that could be the start of
    a stop sequence.
    Once a stop sequence appears, `stopped` is set and the text before it is all that is ever released.
    """

    def __init__(self, tokenizer, stop_sequences: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_sequences = [s for s in stop_sequences if s]
        self.ids: list[int] = []
        self.released = 0  # characters of the decoded text already returned
        self.stopped = False

    def push(self, ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self._text()
        if self.stopped:
            return self._release(text)
        safe = len(text.rstrip(_INCOMPLETE).rstrip())
        safe = min(safe, len(text) - self._stop_prefix_length(text))
        return self._release(text[:safe])

    def finish(self) -> str:
        """The remaining text once generation has ended."""
        return self._release(self._text())

    def _text(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop_sequences) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        return text

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop sequence."""
        return max((n for s in self.stop_sequences for n in range(1, len(s)) if text.endswith(s[:n])), default=0)

    def _release(self, text: str) -> str:
        if len(text) <= self.released:
            return ""
        piece, self.released = text[self.released:], len(text)
        return piece
