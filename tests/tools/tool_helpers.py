"""Helpers of the tool tests."""

from __future__ import annotations

import io

from PIL import Image


def png(size=(32, 32), color="red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()
