"""IDEFICS served with Cog: interleaved image+text prompts, LoRA adapters, streamed answers."""
