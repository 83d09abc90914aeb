"""Custom adapters made safe to load: a stranger's files checked against the base model (checks.py), and a request's
adapter fetched, checked and kept within a disk budget (downloads.py)."""
