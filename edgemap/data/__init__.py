"""Folder datasets: scanning/validation (scan.py) and the bundled demo dataset (digits.py)."""
