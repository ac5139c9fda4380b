"""Images a request brings (uploads, chat ``image_url`` parts): counted and sized from their headers against the
request's budget before any is decoded, decoded in a small pool of threads of their own (a burst of large images
waits there instead of taking every thread and gigabytes at once), and stored only once every image of the request
has been accepted: a refused request stores nothing."""

from __future__ import annotations

import asyncio
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mgmflow.models.errors import InvalidImageError
from mgmflow.models.images import check_header, load_image
from mgmflow.orchestrator.api.errors import ApiError


@dataclass(frozen=True)
class DecodedImage:
    png: bytes  # re-encoded: EXIF (location, camera) stripped after applying its rotation; one format for workers
    width: int
    height: int


class ImageIntake:
    """Budget checks and the decoding pool of one app."""

    def __init__(self, settings):
        self.settings = settings
        self.pool = ThreadPoolExecutor(settings.image_decode_threads, thread_name_prefix="image-decode")

    def check_count(self, count: int) -> None:
        limit = self.settings.max_images_per_request
        if count > limit:
            raise ApiError(413, f"the request has {count} images; the limit is {limit}", code="too_many_images")

    def check_budget(self, images: list[tuple[str, bytes]]) -> None:
        """Each image within the pixel and decoded-size limits, the request's sum within its budget: from the
        headers, before any pixel is decoded."""
        total = 0
        for where, data in images:
            try:
                total += check_header(data, max_pixels=self.settings.max_image_pixels,
                                      max_bytes=self.settings.max_image_bytes)
            except InvalidImageError as error:
                raise ApiError(400, f"{where}: {error}", code="invalid_image") from None
        if total > self.settings.max_request_image_bytes:
            raise ApiError(413, f"decoding the request's images takes {total:,} bytes; the limit is "
                                f"{self.settings.max_request_image_bytes:,} (MGMFLOW_MAX_REQUEST_IMAGE_BYTES)",
                           code="images_too_large")

    async def decode(self, images: list[tuple[str, bytes]]) -> list[DecodedImage]:
        """Every image of a request, checked then decoded in the pool; the first bad one refuses them all."""
        self.check_count(len(images))
        self.check_budget(images)
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.pool, self._decode, where, data) for where, data in images]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    def _decode(self, where: str, data: bytes) -> DecodedImage:
        try:
            image = load_image(data, max_pixels=self.settings.max_image_pixels, max_bytes=self.settings.max_image_bytes)
        except InvalidImageError as error:
            raise ApiError(400, f"{where}: {error}", code="invalid_image") from None
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return DecodedImage(buffer.getvalue(), image.width, image.height)


def store_decoded(store, image: DecodedImage, *, scope: str, metadata: dict):
    """Store a decoded image as a PNG artifact of ``scope``."""
    metadata = {**metadata, "width": image.width, "height": image.height}
    return store.put(image.png, scope=scope, media_type="image/png", metadata=metadata)
