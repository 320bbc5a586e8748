"""tests/nn: spae_fast.nn against vector-quantize-pytorch. Makes the shared helpers (_parity.py) importable."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
