"""Training examples to model inputs: the instruct transcript's tokens and their labels (the assistant's answers
only), and a torch Dataset that makes the pixel values when an item is read."""

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from idefics_cog.inputs.prompt import encode, render
from idefics_cog.training.data import DATA_FILE, DatasetError, Example

IGNORE = -100  # the label of a token the loss leaves out


def answer_labels(text: str, spans: list[tuple[int, int]], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of `text` (tokenized exactly as `prompt.encode` does) and their labels: the id where the token
    overlaps one of the character `spans`, IGNORE elsewhere."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = encoded["input_ids"], []
    for token_id, (start, end) in zip(ids, encoded["offset_mapping"]):
        inside = end > start and any(start < span_end and end > span_start for span_start, span_end in spans)
        labels.append(token_id if inside else IGNORE)
    return ids, labels


@dataclass
class Prepared:
    example: Example
    segments: list
    input_ids: torch.Tensor  # (tokens,)
    labels: torch.Tensor  # (tokens,)


def prepare(example: Example, processor, context_tokens: int) -> Prepared:
    """Tokens and labels of one example; its images are decoded once here, so a bad file fails before training."""
    tokenizer = processor.tokenizer
    segments, spans = example.transcript()
    bos = tokenizer.bos_token
    ids, labels = answer_labels(bos + render(segments), [(s + len(bos), e + len(bos)) for s, e in spans], tokenizer)
    example.load_images()  # raises InputError naming data.jsonl and the line
    where = f"{DATA_FILE} line {example.line}"
    if len(ids) > context_tokens:
        raise DatasetError(f"{where}: {len(ids)} tokens (text plus 3 per image) do not fit the model's context "
                           f"of {context_tokens} tokens")
    if all(label == IGNORE for label in labels):
        raise DatasetError(f"{where}: no answer tokens to learn from")
    return Prepared(example, segments, torch.tensor(ids), torch.tensor(labels))


class ExampleDataset(Dataset):
    """Prepared examples; pixel values are made when an item is read (they are large)."""

    def __init__(self, items: list[Prepared], processor):
        self.items, self.processor = items, processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        encoded = encode(item.segments, item.example.load_images(), self.processor)
        if not torch.equal(encoded.input_ids[0], item.input_ids):  # the labels were made for these very tokens
            raise RuntimeError(f"{DATA_FILE} line {item.example.line}: tokenization changed between two reads")
        return {"input_ids": item.input_ids, "attention_mask": encoded.attention_mask[0], "labels": item.labels,
                "pixel_values": encoded.pixel_values[0], "image_attention_mask": encoded.image_attention_mask[0]}
