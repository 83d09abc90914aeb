"""Training batches and the loss (transformers 5.23's IDEFICS loss leaves out the additional tokens and fails)."""

import torch

from idefics_cog.training.examples import IGNORE


class Collator:
    """Right-pads tokens, and images with blank ones that no token attends to."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        length = max(f["input_ids"].shape[0] for f in features)
        images = max(f["pixel_values"].shape[0] for f in features)
        channels, height, width = features[0]["pixel_values"].shape[1:]
        size = len(features)
        batch = {
            "input_ids": torch.full((size, length), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros(size, length, dtype=torch.long),
            "labels": torch.full((size, length), IGNORE, dtype=torch.long),
            "pixel_values": torch.zeros(size, images, channels, height, width,
                                        dtype=features[0]["pixel_values"].dtype),
            "image_attention_mask": torch.zeros(size, length, images, dtype=torch.long),
        }
        for row, f in enumerate(features):
            n, k = f["input_ids"].shape[0], f["pixel_values"].shape[0]
            batch["input_ids"][row, :n] = f["input_ids"]
            batch["attention_mask"][row, :n] = f["attention_mask"]
            batch["labels"][row, :n] = f["labels"]
            batch["pixel_values"][row, :k] = f["pixel_values"]
            batch["image_attention_mask"][row, :n, :k] = f["image_attention_mask"].long()
        return batch


def causal_lm_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy over the whole output vocabulary, per labelled token of the whole accumulated batch when the
    Trainer gives that count (so gradient accumulation weighs every token alike)."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    logits = logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    if num_items_in_batch is None:
        return loss / (targets != IGNORE).sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch
