"""Weights to local folders: the operator's downloads (download.py) from a hub (hub.py) or an archive URL (archive.py),
streamed under a cap (stream.py), extracted safely (safe_extract.py), from sources url_guard.py allows."""
