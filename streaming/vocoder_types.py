"""Vocoder-level types shared by the torch vocoder, its ONNX export and the streaming synthesizer.

They live here, not in `streaming/vocoder.py`, because that module imports torch at load time while the
synthesizer and the ONNX runtime must import without it (a process serving the ONNX export has no torch).
numpy only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ReceptiveField:
    """Context needed for exact chunked synthesis (docs/speechgpt-format.md, Vocoder receptive field)."""

    left_frames: int  # expanded frames before a frame that its audio depends on
    right_frames: int  # expanded frames after it
    duration_left_units: int  # units before a unit that its duration depends on
    duration_right_units: int

    def to_dict(self) -> dict[str, int]:
        """The JSON form (`vocoder_onnx.json` stores it under "receptive_field")."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "receptive_field") -> "ReceptiveField":
        """Parse the JSON form; a ValueError names `source`, the field and what was found."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: receptive_field must be an object, got {type(data).__name__}")
        values = {}
        for name in cls.__dataclass_fields__:
            if name not in data:
                raise ValueError(f"{source}: receptive_field has no field {name!r}")
            value = data[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{source}: receptive_field.{name} must be an int >= 0, got {value!r}")
            values[name] = value
        return cls(**values)


def validate_units(units: Any, num_embeddings: int, *, allow_empty: bool = False, offset: int = 0) -> np.ndarray:
    """Unit ids -> 1-D int64 array; a clear ValueError for anything that is not a valid id, naming value and position.

    `offset` is added to positions in messages (the position in the whole reply when validating a burst).
    """
    array = np.asarray(units)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim == 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 1:
        raise ValueError(f"unit ids must be a 1-D sequence, got shape {list(array.shape)}")
    if array.size == 0:
        if allow_empty:
            return np.zeros(0, dtype=np.int64)
        raise ValueError("empty unit sequence: at least one unit id is needed")
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        position = 0
        if np.issubdtype(array.dtype, np.floating):
            fractional = np.flatnonzero(~np.isfinite(array) | (array != np.floor(array)))
            position = int(fractional[0]) if fractional.size else 0
        raise ValueError(
            f"unit id {array[position].item()!r} at position {position + offset} is not an integer "
            f"(unit ids must be ints, got dtype {array.dtype})"
        )
    bad = np.flatnonzero((array < 0) | (array >= num_embeddings))
    if bad.size:
        position = int(bad[0])
        raise ValueError(
            f"unit id {int(array[position])} at position {position + offset} is out of range [0, {num_embeddings})"
            + (f" ({bad.size} bad ids in all)" if bad.size > 1 else "")
        )
    return array.astype(np.int64, copy=False)
