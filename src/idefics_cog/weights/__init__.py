"""Weights to local folders: the operator's downloads (download.py) from a hub (hub.py) or an archive URL (archive.py),
a request's adapter (adapter_downloads.py), and the checks their files pass before anything loads them."""
