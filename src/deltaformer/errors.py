"""Errors deltaformer raises on bad input.

Every message is one line that names the problem and says what to do, so a CLI can print it as is.
"""


class DeltaformerError(Exception):
    """Base of every deltaformer error; messages say what went wrong and what to do."""


class ConfigError(DeltaformerError, ValueError):
    """A configuration names an unknown key, an unknown model type, or an impossible value."""


class CheckpointError(DeltaformerError):
    """A checkpoint is missing, truncated, unsafe, or does not fit the model."""


class InputError(DeltaformerError, ValueError):
    """Model inputs are malformed (too long, wrong shape, out-of-range ids)."""


class PromptError(DeltaformerError, ValueError):
    """A prompt template, verbalizer, demonstration set or instruction file cannot be used as given."""


class DeltaError(DeltaformerError):
    """A delta cannot be attached, routed, merged, saved or loaded; the message says what to do."""


class QuantError(DeltaformerError, ValueError):
    """A weight or model cannot be quantized, or a quantized file cannot be read, as asked."""
