"""Hydra launcher plugin of the DiT harness (see launchers.py)."""
