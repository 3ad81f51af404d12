"""What every delta method's config shares: a dataclass of plain JSON values, read back field by field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import DeltaError


@dataclass
class DeltaConfig:
    """Base of every method's config. ``method`` names the method; fields are plain JSON values.

    ``modules_to_save``: head modules trained and saved with the delta (peft's name); None = the model's
    task head (``classifier``) when it has one.

    Every fact about a method's options sits on its fields' metadata: ``help`` (what it does), ``cli`` (the
    ``deltaformer finetune`` option, ``--name-with-dashes``, for the options the command line offers),
    ``finetune`` (the default fine-tuning uses when it differs from the library's, which is peft's) and
    ``aliases`` (other names accepted for it, e.g. peft's ``lora_alpha``). :mod:`deltaformer.train.methods`
    builds the options and flags from them.
    """

    method: ClassVar[str] = ""
    #: Peak learning rate of ``deltaformer finetune`` for this method (few parameters want a larger one).
    finetune_lr: ClassVar[float] = 1e-3

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DeltaError(f"{cls.__name__} has no field(s) {', '.join(unknown)}: fields are {', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
