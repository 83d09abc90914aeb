"""Cog predictor for IDEFICS: interleaved images and text in, streamed text out. Every `Input(...)` argument is a
literal: `cog build` reads this file statically. `run` returns a plain generator: coglet 0.23.1 streams only that."""

import sys
from pathlib import Path as _Path
from typing import Optional

sys.path.insert(0, str(_Path(__file__).resolve().parent / "src"))

import cog  # noqa: E402
from cog import BaseRunner, ConcatenateIterator, Input, Path  # noqa: E402

from idefics_cog.serving.live import install_cancel_hook, live  # noqa: E402


class Predictor(BaseRunner):
    def setup(self, weights: Optional[str] = None) -> None:
        """`weights`: COG_WEIGHTS, a training's output .tar in a version made by `cog train` (cog 0.23.1 passes it
        only to a setup that takes it); its adapter then replaces IDEFICS_ADAPTER_WEIGHTS as `medical`."""
        # Imported here: reading this file's inputs (`cog build`, the local runner) then takes 1 s, not 10.
        from idefics_cog.serving.service import Service

        self.service = Service.from_env(weights)
        self.service.receive_cog_files()
        install_cancel_hook()

    @cog.streaming
    @cog.concurrent(max=16)  # newer Cog reads it; cog 0.23.1 takes concurrency.max from cog.yaml (keep them equal)
    async def run(
        self,
        prompt: str = Input(
            description="Your message. Put <image> where each image goes (image first, then images); "
            "without placeholders the images follow your text. Empty: 'What does this image show?' "
            "(unless messages is given).",
            default="",
        ),
        image: Optional[Path] = Input(description="An image (bound to the first <image>).", default=None),
        images: Optional[list[Path]] = Input(
            description="More images, in order, after `image`. At most 8 images in all by default.", default=None
        ),
        template: str = Input(
            description="instruct: wrap the prompt in the IDEFICS-instruct chat turn. raw: use the prompt as "
            "written (base models, few-shot prompts, multi-turn transcripts with <end_of_utterance>).",
            choices=["instruct", "raw"],
            default="instruct",
        ),
        system_prompt: str = Input(description="Text placed before the conversation.", default=""),
        messages: str = Input(
            description='A conversation as a JSON list, instead of prompt, template and system_prompt: '
            '[{"role": "system"|"user"|"assistant", "content": "..." or parts}], parts {"type": "text", "text": ...}, '
            '{"type": "image"} (the next file of image, then images) or {"type": "image_url", "image_url": '
            '{"url": "data:..."}} (data: URLs only). It ends with a user message.',
            default="",
        ),
        max_new_tokens: int = Input(
            description="Maximum number of tokens to generate (lowered to fit the context).", ge=1, le=2048,
            default=256,
        ),
        temperature: float = Input(
            description="Sampling temperature; 0 is greedy decoding.", ge=0.0, le=5.0, default=0.0
        ),
        top_p: float = Input(
            description="Nucleus sampling: keep the smallest set of tokens whose probability adds up to top_p "
            "(when temperature > 0).", ge=0.0, le=1.0, default=1.0,
        ),
        top_k: int = Input(
            description="Sample from the k most likely tokens (when temperature > 0); 0 disables it.", ge=0,
            le=1000, default=0,
        ),
        repetition_penalty: float = Input(
            description="Penalty for repeating tokens; 1 means none.", ge=1.0, le=2.0, default=1.0
        ),
        seed: Optional[int] = Input(
            description="Random seed for sampling; the same seed gives the same answer. Empty: a random one.",
            ge=0, le=4294967295, default=None,
        ),
        stop_sequences: str = Input(
            description="Comma-separated texts that end the answer (not included in it), e.g. 'Question:,###'.",
            default="",
        ),
        adapter: str = Input(
            description="medical: the default LoRA adapter loaded at setup (MedIDEFICS, or in a version made by "
            "`cog train` the adapter it trained); none: the base model alone.",
            choices=["medical", "none"],
            default="medical",
        ),
        lora_weights: str = Input(
            description="A custom LoRA adapter in the standard PEFT layout: an https URL of a .tar/.zip, or a "
            "Hugging Face repo id (owner/name[@revision]). Used instead of `adapter`; cached after the first use.",
            default="",
        ),
        lora_scale: float = Input(
            description="Strength of the adapter in use: 0 turns it off, 1 is as trained.", ge=0.0, le=4.0,
            default=1.0,
        ),
        choices: str = Input(
            description='Candidate answers to score instead of generating: a JSON list (["yes", "no"]) or '
            "comma-separated (yes,no). The output is the most probable one; output_format=json adds each "
            "candidate's probability. At most 32 candidates of 256 characters by default.",
            default="",
        ),
        output_format: str = Input(
            description="text: the answer, streamed. json: one JSON document with the text, why it ended, the token "
            "counts, the choices table and the log-probabilities (docs/inputs.md).",
            choices=["text", "json"],
            default="text",
        ),
        logprobs: int = Input(
            description="Report each generated token's log-probability and this many likeliest alternatives (in "
            "output_format=json), from the model's distribution before sampling settings; 0: none.", ge=0, le=20,
            default=0,
        ),
    ) -> ConcatenateIterator[str]:
        """Bad inputs fail the prediction before its first text piece."""
        # Taken here, where coglet has set it; coglet keeps it open until the generator has been read to its end.
        scope = cog.current_scope()
        pieces = self.service.astream(
            record_metric=scope.record_metric,
            prompt=prompt, image=image, images=images, template=template, system_prompt=system_prompt,
            messages=messages, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            repetition_penalty=repetition_penalty, seed=seed, stop_sequences=stop_sequences, adapter=adapter,
            lora_weights=lora_weights, lora_scale=lora_scale, choices=choices, output_format=output_format,
            logprobs=logprobs,
        )
        return live(pieces, await anext(pieces, None))
