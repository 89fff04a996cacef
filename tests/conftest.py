"""The tests import the stage files from the repository root and their helpers (tiny.py) from this folder,
so `pytest` works from anywhere, not only as `python -m pytest` from the root."""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(here), here):
    if path not in sys.path:
        sys.path.insert(0, path)
