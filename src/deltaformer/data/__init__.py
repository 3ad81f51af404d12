"""Data: the registry of pinned models and corpora (``assets``) and the loaders built on it."""
