"""One generation module for every model with a decoder: greedy, sampled and beam search, streaming, and the
step-level :class:`DecodeState` that continuous batching builds on."""

from .config import GenerationConfig
from .search import beam_search, generate, routed, stream_text
from .state import DecodeState, Event
from .text import IncrementalText

__all__ = ["DecodeState", "Event", "GenerationConfig", "IncrementalText", "beam_search", "generate", "routed",
           "stream_text"]
