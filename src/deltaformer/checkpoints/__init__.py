"""Reading and writing weights: HF name maps, safetensors / weights-only ``.bin``, sharded indexes, GGUF."""

from .io import load_state_dict, save_state_dict
from .names import NameMap

__all__ = ["NameMap", "load_state_dict", "save_state_dict"]
