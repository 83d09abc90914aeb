"""The model-card recipe in plain transformers: the reference every path of ours is checked and timed against.

processor(interleaved list) -> model.generate -> decode the new tokens, with the IDEFICS-instruct stop and bans.
"""

import torch


def model_card_generate(model, processor, items: list, max_new_tokens: int, **sampling) -> tuple[str, list[int]]:
    """Returns the decoded answer and its token ids (the answer only, not the prompt)."""
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    device = next(model.parameters()).device
    inputs = processor(text=[items], add_end_of_utterance_token=False, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=[ids("<end_of_utterance>"), tokenizer.eos_token_id],
            bad_words_ids=[[ids("<image>")], [ids("<fake_token_around_image>")]], **sampling,
        )
    new = output[0, inputs["input_ids"].shape[1]:].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new
