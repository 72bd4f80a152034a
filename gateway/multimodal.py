"""Images in chat requests: fetching and decoding them, and turning them into what an
engine runs (placeholder tokens plus preprocessed pixels).

Both APIs give images as references (:class:`ImageRef`): OpenAI ``image_url`` parts (a
``data:`` URL, or an http(s) URL when ``enable_media_url_fetch`` is on) and Anthropic
``image`` blocks (base64 source, or a URL source under the same rule). The chat template
renders one placeholder token per image where the message placed it; then
:meth:`VisionProcessor.expand` runs the checkpoint's own image processor and expands each
placeholder to the number of embeddings the model's encoder gives that image::

    template   [ ... USER: <image> What is this? ... ]
    expanded   [ ... USER: <image> x 576 What is this? ... ]   + ImageInput(pixels, offset, 576)

Every failure is an :class:`~gateway.errors.ApiError` (400, naming the part) that each API
answers in its own format. Decoding and preprocessing run on a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from gateway.errors import ApiError
from switchyard.block_hash import MediaSpan, image_hash
from switchyard.settings import GatewaySettings
from switchyard.v1 import engine_pb2

_IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")


def image_error(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_image")


@dataclass(slots=True)
class ImageRef:
    """One image of a request as the client gave it: a URL (``data:`` or http(s)), or raw
    base64 with its media type (Anthropic); ``param`` names it in errors."""

    param: str
    url: str = ""
    base64_data: str = ""
    media_type: str = ""


@dataclass(slots=True)
class PreparedPrompt:
    """A prompt with its images expanded: token ids, the images for the engine, and their
    placeholder spans (the block keys prefix routing hashes with)."""

    token_ids: list[int]
    images: list[engine_pb2.ImageInput]
    media: list[MediaSpan]


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_images: int
    max_bytes: int
    max_pixels: int
    fetch_urls: bool
    allowed_domains: tuple[str, ...]
    fetch_timeout_s: float

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> ImageLimits:
        return cls(
            max_images=settings.limit_mm_per_prompt.get("image", 0),
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            fetch_urls=settings.enable_media_url_fetch,
            allowed_domains=tuple(d.lower().lstrip(".") for d in settings.allowed_media_domains),
            fetch_timeout_s=settings.media_fetch_timeout_s,
        )


class ImageLoader:
    """Gets a request's images as RGB pictures, within the deployment's limits."""

    def __init__(self, limits: ImageLimits, executor: ThreadPoolExecutor) -> None:
        self.limits = limits
        self._executor = executor

    def check_count(self, refs: list[ImageRef]) -> None:
        if len(refs) > self.limits.max_images:
            raise image_error(
                f"the request has {len(refs)} images; at most {self.limits.max_images} are "
                "allowed per prompt",
                refs[self.limits.max_images].param,
            )

    async def load(self, refs: list[ImageRef]) -> list[Any]:
        self.check_count(refs)
        raw = [await self._bytes(ref) for ref in refs]
        loop = asyncio.get_running_loop()
        return [
            await loop.run_in_executor(self._executor, self._decode, data, ref.param)
            for data, ref in zip(raw, refs)
        ]

    async def _bytes(self, ref: ImageRef) -> bytes:
        if ref.base64_data or not ref.url:
            if ref.media_type and ref.media_type not in _IMAGE_TYPES:
                raise image_error(
                    f"media_type {ref.media_type!r} is not supported; use one of "
                    f"{', '.join(_IMAGE_TYPES)}",
                    ref.param,
                )
            return self._b64decode(ref.base64_data, ref.param)
        if ref.url.startswith("data:"):
            header, sep, payload = ref.url[5:].partition(",")
            if not sep or not header.endswith(";base64"):
                raise image_error("a data: URL must be data:<media type>;base64,<data>", ref.param)
            return self._b64decode(payload, ref.param)
        scheme = urlparse(ref.url).scheme
        if scheme not in ("http", "https"):
            raise image_error(
                f"image URLs must be data: or http(s) URLs, not {scheme or 'relative'} ones",
                ref.param,
            )
        if not self.limits.fetch_urls:
            raise image_error(
                "this server does not fetch image URLs; send the image as a data: URL "
                "(base64) instead",
                ref.param,
            )
        return await self._fetch(ref.url, ref.param)

    def _b64decode(self, payload: str, param: str) -> bytes:
        # A base64 string of n characters holds about 3n/4 bytes: refuse before decoding.
        if len(payload) * 3 // 4 > self.limits.max_bytes + 3:
            raise image_error(self._too_large(len(payload) * 3 // 4), param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise image_error("the image is not valid base64", param) from None
        if len(data) > self.limits.max_bytes:
            raise image_error(self._too_large(len(data)), param)
        return data

    def _too_large(self, size: int) -> str:
        return f"the image has {size} bytes; at most {self.limits.max_bytes} are allowed"

    async def _fetch(self, url: str, param: str) -> bytes:
        import httpx

        host = (urlparse(url).hostname or "").lower()
        allowed = self.limits.allowed_domains
        if allowed and not any(host == d or host.endswith("." + d) for d in allowed):
            raise image_error(f"fetching images from {host!r} is not allowed", param)
        try:
            async with (
                httpx.AsyncClient(timeout=self.limits.fetch_timeout_s) as client,
                client.stream("GET", url, follow_redirects=False) as response,
            ):
                if response.status_code != 200:
                    raise image_error(
                        f"fetching the image failed: HTTP {response.status_code}", param
                    )
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.limits.max_bytes:
                        raise image_error(self._too_large(size), param)
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TimeoutException:
            raise image_error(
                f"fetching the image took longer than {self.limits.fetch_timeout_s:g} s", param
            ) from None
        except httpx.HTTPError as exc:
            raise image_error(f"fetching the image failed: {exc}", param) from None

    def _decode(self, data: bytes, param: str) -> Any:
        from PIL import Image, UnidentifiedImageError

        try:
            picture = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError, ValueError):
            raise image_error("the data is not an image in a supported format", param) from None
        width, height = picture.size
        if width * height > self.limits.max_pixels:
            raise image_error(
                f"the image is {width}x{height} pixels; at most {self.limits.max_pixels} "
                "pixels are allowed",
                param,
            )
        try:
            return picture.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError):
            raise image_error("the image data is truncated or corrupt", param) from None


class VisionProcessor:
    """The served model's image side, from its checkpoint: its image processor, its
    placeholder token, and how many embeddings its encoder gives an image."""

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        from transformers import AutoImageProcessor

        self.model_type: str = config["model_type"]
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        if self.model_type == "llava":
            vision = config.get("vision_config", {})
            side = vision.get("image_size", 336) // vision.get("patch_size", 14)
            full = config.get("vision_feature_select_strategy", "default") == "full"
            self.tokens_per_image = side * side + full
            self.image_token_id = int(config.get("image_token_index", config.get("image_token_id")))
            self.merge = 1
        else:
            self.tokens_per_image = 0  # per image, from its grid
            self.image_token_id = int(config["image_token_id"])
            self.merge = int(config.get("vision_config", {}).get("spatial_merge_size", 2))

    @classmethod
    def from_checkpoint(cls, path: Path) -> VisionProcessor | None:
        """The processor of a vision-language checkpoint; None for a text-only model."""
        config_file = path / "config.json"
        if not config_file.is_file():
            return None
        config = json.loads(config_file.read_text())
        if config.get("model_type") not in ("llava", "qwen2_vl", "qwen2_5_vl"):
            return None
        return cls(path, config)

    def expand(self, token_ids: list[int], pictures: list[Any]) -> PreparedPrompt:
        """Preprocess ``pictures`` and expand their placeholders (one per picture, in
        order, as the chat template wrote them) in ``token_ids``."""
        found = token_ids.count(self.image_token_id)
        if found != len(pictures):
            raise image_error(
                f"the chat template placed {found} image placeholders for {len(pictures)} images",
                "messages",
            )
        processed = self.image_processor(images=pictures, return_tensors="np")
        values = np.asarray(processed["pixel_values"], dtype=np.float32)
        if self.model_type == "llava":
            per_image = [np.ascontiguousarray(v) for v in values]
            grids: list[tuple[int, ...] | None] = [None] * len(pictures)
            counts = [self.tokens_per_image] * len(pictures)
        else:
            grids = [tuple(int(x) for x in g) for g in processed["image_grid_thw"]]
            sizes = [t * h * w for t, h, w in grids]  # type: ignore[misc]
            per_image = np.split(values, np.cumsum(sizes)[:-1])
            counts = [size // self.merge**2 for size in sizes]
        expanded: list[int] = []
        images: list[engine_pb2.ImageInput] = []
        media: list[MediaSpan] = []
        for token in token_ids:
            if token != self.image_token_id:
                expanded.append(token)
                continue
            k = len(images)
            pixels = np.ascontiguousarray(per_image[k])
            data = pixels.tobytes()
            grid = grids[k]
            images.append(
                engine_pb2.ImageInput(
                    pixel_values=data,
                    shape=list(pixels.shape),
                    dtype="float32",
                    grid_thw=list(grid or ()),
                    offset=len(expanded),
                    length=counts[k],
                )
            )
            media.append(
                MediaSpan(len(expanded), counts[k], image_hash(data, pixels.shape, "float32", grid))
            )
            expanded += [self.image_token_id] * counts[k]
        return PreparedPrompt(expanded, images, media)


class ImageSupport:
    """What the chat endpoints use: load a request's images and expand its prompt, or
    refuse images when the served model takes none."""

    def __init__(self, limits: ImageLimits, processor: VisionProcessor | None) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="images")
        self.loader = ImageLoader(limits, self._executor)
        self.processor = processor

    @classmethod
    def from_settings(cls, settings: GatewaySettings, model_path: Path) -> ImageSupport:
        return cls(ImageLimits.from_settings(settings), VisionProcessor.from_checkpoint(model_path))

    @classmethod
    def text_only(cls) -> ImageSupport:
        return cls(ImageLimits(0, 0, 0, False, (), 1.0), None)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def check(self, refs: list[ImageRef]) -> None:
        """Refuse images at once when the model takes none, or too many."""
        if refs and self.processor is None:
            raise image_error("this model does not accept images", refs[0].param)
        self.loader.check_count(refs)

    async def prepare(self, token_ids: list[int], refs: list[ImageRef]) -> PreparedPrompt:
        self.check(refs)
        pictures = await self.loader.load(refs)
        assert self.processor is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self.processor.expand, token_ids, pictures
        )
