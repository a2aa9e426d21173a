"""HDF5 attributes as plain Python values, both ways: one home for the descriptor store and the feature banks."""
from __future__ import annotations

import json
from typing import Any, Dict, Mapping

import numpy as np


def to_attr(value: Any) -> Any:
    """A Python value as HDF5 can store it: None → ``"none"``, number lists → float64 arrays, dicts → JSON."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        return np.asarray(value, dtype=np.float64 if numeric else object)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def from_attr(value: Any) -> Any:
    """An attribute read back as plain Python: bytes → str, arrays → lists, numpy scalars → Python scalars."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [from_attr(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_attrs(handle: Any, attrs: Mapping[str, Any]) -> None:
    """Set every attribute of ``attrs`` on an open h5py file or dataset."""
    for key, value in attrs.items():
        handle.attrs[key] = to_attr(value)


def read_attrs_of(handle: Any) -> Dict[str, Any]:
    """Every attribute of an open h5py file or dataset, as plain Python values."""
    return {key: from_attr(value) for key, value in handle.attrs.items()}
