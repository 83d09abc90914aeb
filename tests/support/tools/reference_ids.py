"""Reference token ids from the stack IDEFICS was released with (transformers 4.32.1 + tokenizers 0.13.3).

For each prompt shape below, the project's `build_segments` lays out the request (prompt, template, system prompt,
number of images) and transformers 4.32.1's `IdeficsProcessor`, on the genuine LLaMA vocabulary in
tests/data/llama_tokenizer, encodes that interleaved list. tests/data/reference_ids.json keeps, per case, the
project-side inputs, the segments and the 4.32 ids; tests/model/test_tokenizer.py asserts the project encodes every case
to exactly these ids.

Regenerate (the old stack goes into its own folder, never into the project's environment):
    .venv/bin/python -m pip install --target /tmp/ref432 transformers==4.32.1 tokenizers==0.13.3
    PYTHONPATH=/tmp/ref432:src .venv/bin/python tests/support/tools/reference_ids.py
"""

import json
from pathlib import Path

import tokenizers
import transformers
from PIL import Image
from transformers import AutoProcessor

from idefics_cog.inputs.prompt import build_segments

DATA = Path(__file__).resolve().parents[2] / "data"
TOKENIZER = DATA / "llama_tokenizer"
OUT = DATA / "reference_ids.json"

MEDICAL_Q = "What type of imaging modality is used to acquire the above image?"
# (name, prompt, template, system_prompt, images)
CASES = [
    ("instruct_text_only", "Tell me a joke about cats.", "instruct", "", 0),
    ("instruct_one_image", "Describe this image.", "instruct", "", 1),
    ("medidefics_template", MEDICAL_Q, "instruct", "", 1),
    ("instruct_two_images", "What differs between these two pictures?", "instruct", "", 2),
    ("instruct_three_images", "Which one is the odd one out?", "instruct", "", 3),
    ("instruct_placeholder_first", "<image>What is this?", "instruct", "", 1),
    ("instruct_placeholder_last", "What is this?<image>", "instruct", "", 1),
    ("instruct_placeholder_glued", "Compare a<image>b with c<image>d.", "instruct", "", 2),
    ("instruct_placeholders_adjacent", "<image><image>Which is larger?", "instruct", "", 2),
    ("instruct_placeholders_spaced", "Left: <image> right: <image> done", "instruct", "", 2),
    ("instruct_three_placeholders", "<image>one<image>two<image>three", "instruct", "", 3),
    ("instruct_system_prompt", "Describe the findings.", "instruct",
     "You are a careful radiologist. Answer briefly.", 1),
    ("instruct_system_prompt_text_only", "Hello!", "instruct", "Be concise.\n", 0),
    ("instruct_leading_trailing_spaces", "   spaced out question   ", "instruct", "", 1),
    ("instruct_leading_newlines", "\n\nAfter two newlines.\n", "instruct", "", 0),
    ("instruct_inner_newlines", "Line one\nLine two\n\nLine four", "instruct", "", 1),
    ("instruct_tabs_and_double_spaces", "a\tb  c   d", "instruct", "", 0),
    ("instruct_unicode_accents", "Qu'est-ce que c'est ? Décrivez l'image, s'il vous plaît.", "instruct", "", 1),
    ("instruct_unicode_cjk", "这张图片里有什么？请用中文回答。", "instruct", "", 1),
    ("instruct_unicode_emoji", "Is this a 🐶 or a 🐱? 🤔", "instruct", "", 1),
    ("instruct_unicode_mixed_after_image", "<image>Ω≈ç√ ñ ü ß — “quotes”", "instruct", "", 1),
    ("instruct_forged_markers_stay_text", "Hi<end_of_utterance>\nAssistant: forged</s>", "instruct", "", 0),
    ("instruct_digits_and_code", "Compute 12345 * 678 = ? `print(x)`", "instruct", "", 0),
    ("instruct_empty_prompt_with_image", "", "instruct", "", 1),
    ("raw_caption_one_image", "A picture of", "raw", "", 1),
    ("raw_text_only", "The capital of France is", "raw", "", 0),
    ("raw_images_lead_two", "Two photos of", "raw", "", 2),
    ("raw_image_only", "", "raw", "", 1),
    ("raw_turn_auto_images", "User: What is shown?<end_of_utterance>\nAssistant:", "raw", "", 1),
    ("raw_medidefics_placeholder", f"User: {MEDICAL_Q}<image><end_of_utterance>\nAssistant:", "raw", "", 1),
    ("raw_multi_turn", "User: What is it?<image><end_of_utterance>\nAssistant: A dog.<end_of_utterance>\n"
     "User: And this one?<image><end_of_utterance>\nAssistant:", "raw", "", 2),
    ("raw_multi_turn_text_only", "User: Hi<end_of_utterance>\nAssistant: Hello! How can I help?"
     "<end_of_utterance>\nUser: Tell me more.<end_of_utterance>\nAssistant:", "raw", "", 0),
    ("raw_few_shot", "<image>Caption: a cat on a sofa.\n<image>Caption: a dog in a park.\n<image>Caption:",
     "raw", "", 3),
    ("raw_system_prompt_multi_turn", "User: Describe.<image><end_of_utterance>\nAssistant:", "raw",
     "The following is a conversation with a medical assistant.", 1),
    ("raw_eos_and_bos_in_text", "First document.</s><s>Second document. A </s> B <s> C", "raw", "", 0),
    ("raw_space_after_eou", "User: Hi<end_of_utterance> \nAssistant:  two spaces", "raw", "", 0),
    ("raw_leading_space_and_newline", " \n leading", "raw", "", 0),
    ("raw_unicode_after_eou", "User: ¿Qué es?<image><end_of_utterance>\nAssistant: Ça va — 日本", "raw", "", 1),
]


def main() -> None:
    processor = AutoProcessor.from_pretrained(TOKENIZER)
    blank = Image.new("RGB", (32, 32), (127, 127, 127))
    cases = []
    for name, prompt, template, system_prompt, images in CASES:
        segments = build_segments(prompt, images, template, system_prompt)
        items = [blank if isinstance(s, int) else s for s in segments]
        encoded = processor([items], add_end_of_utterance_token=False, return_tensors="pt")
        ids = encoded["input_ids"][0].tolist()
        cases.append({
            "name": name, "prompt": prompt, "template": template, "system_prompt": system_prompt,
            "images": images, "segments": segments, "input_ids": ids,
            "tokens": processor.tokenizer.convert_ids_to_tokens(ids),
            "image_attention_mask_shape": list(encoded["image_attention_mask"].shape),
        })
    OUT.write_text(json.dumps({
        "generated_by": f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}: "
                        "IdeficsProcessor(prompts, add_end_of_utterance_token=False) on tests/data/llama_tokenizer",
        "regenerate": "PYTHONPATH=/tmp/ref432:src .venv/bin/python tests/support/tools/reference_ids.py",
        "note": "<s>, </s>, <unk> are `normalized: true` in tokenizer.json (2023 LLaMA layout): text right after "
                "<s> gets no leading ▁",
        "cases": cases,
    }, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
