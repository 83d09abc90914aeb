"""IDEFICS served with Cog: interleaved image+text prompts, LoRA adapters, streamed answers."""

from idefics_cog.quiet import silence_known_noise

silence_known_noise()
