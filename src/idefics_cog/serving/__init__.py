"""Predictions: the service behind predict.py (service.py), the engine (engine.py), requests (jobs.py), the scheduler
that batches them (scheduler.py), the fast decoder (decoder.py), streamed text (textstream.py), cancellation
(live.py)."""
