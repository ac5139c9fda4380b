"""Helpers of the diffusion tests."""

import io

import numpy as np
from PIL import Image


def pixels(png: bytes) -> np.ndarray:
    """A PNG's RGB pixels as int16, so differences of two images don't wrap around."""
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
