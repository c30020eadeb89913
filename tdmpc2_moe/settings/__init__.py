"""
Settings and checks, the bottom layer: the options record (`MoESettings`, every setting once: its
default, check, doc line and checkpoint kind; `BlockOptions`, MoEBlock's options derived from it), the
argument checks every layer uses (`checks`), and the record as TD-MPC2 config keys and checkpoint
entry (`config_keys`).

Imports nothing of the package outside this folder.
"""
from .record import BlockOptions, MoESettings

__all__ = ["BlockOptions", "MoESettings"]
