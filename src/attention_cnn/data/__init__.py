"""Data: the built-in sample (sample.py), the prepare stage (prepare.py) and the prepared-split format (prepared.py)."""
