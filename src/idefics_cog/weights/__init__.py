"""Weights to local directories: `resolve` (resolve.py) over a local folder, a hub id (hub.py) or an archive URL
(archive.py); LoRA adapters (adapters.py, lora.py); what a request may name (sources.py); `python -m
idefics_cog.weights`."""
