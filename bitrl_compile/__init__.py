"""bitrl-compile: trained RL policies in, ternary (1.58-bit) TVM programs out.

This module stays import-light (no torch, no tvm) so that the runtime can live on a device.
"""

__version__ = "0.1.0"
