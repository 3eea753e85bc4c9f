"""The input rows of gcl's served models (embedding and search): columns are field names, images
bytes, base64 strings or paths; an unknown column is an error, not a silently ignored field."""

from __future__ import annotations

import base64
import binascii
import os

import pandas as pd


def decode_image_value(value):
    """bytes stay bytes; a base64 string becomes bytes; any other string is a path."""
    if value is None or isinstance(value, bytes | bytearray | dict):
        return value
    text = str(value)
    if os.path.exists(text):
        return text
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return text  # a path that does not exist: reading it reports the error


def field_frame(model_input, accepted: dict[str, str]) -> pd.DataFrame:
    """`model_input` as a DataFrame with a column for every `accepted` field (name -> modality;
    missing ones all None), images decoded, NaN as None; ValueError naming unknown columns."""
    frame = pd.DataFrame(model_input).copy()
    unknown = set(frame.columns) - set(accepted)
    if unknown:
        raise ValueError(f"unknown input columns {sorted(unknown)}; this model takes {sorted(accepted)}")
    for name, modality in accepted.items():
        if name not in frame.columns:
            frame[name] = None
        elif modality == "image":
            frame[name] = frame[name].map(decode_image_value)
    return frame.astype(object).where(frame.notna(), None)
