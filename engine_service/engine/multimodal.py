"""Images inside the engine: a request's preprocessed images, the encoder-output cache, and
which embedding rows each step splices in.

A prompt holds each image as a run of placeholder tokens; the vision encoder (and projector)
turns the image into exactly that many embedding rows, which replace the placeholders'
token embeddings in the decoder's input::

    prompt        [ text | <img> x length | text ]
    cache index           offset ...... offset + length
    embeddings            encoder_output[0 .. length)

A step that computes a chunk ``[start, start + num_tokens)`` of the prompt carries, per
image overlapping the chunk, an :class:`MMSpan` of the rows it needs, so a chunk boundary
may fall anywhere inside an image. The encoder runs once per image for all the step's
sequences together (:class:`EncoderRunner`), and its outputs stay in an LRU keyed by the
image's content hash, so a repeated image, or the next chunk of a split one, is not
encoded again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from switchyard.block_hash import MediaSpan

if TYPE_CHECKING:
    from engine_service.engine.batch import ScheduledBatch


@dataclass(slots=True, eq=False)
class ImageInput:
    """One preprocessed image of a prompt: its placeholder span (with its content hash),
    the pixel data its model's image processor produced, and (Qwen2-VL) its patch grid."""

    span: MediaSpan
    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int] | None = None

    @property
    def mm_hash(self) -> str:
        return self.span.mm_hash

    @property
    def offset(self) -> int:
        return self.span.offset

    @property
    def length(self) -> int:
        return self.span.length


@dataclass(slots=True)
class MMSpan:
    """Rows ``[lo, hi)`` of ``image``'s embeddings, for cache indices
    ``[image.offset + lo, image.offset + hi)`` of a step's sequence."""

    image: ImageInput
    lo: int
    hi: int


def spans_in_chunk(images: list[ImageInput], start: int, end: int) -> list[MMSpan]:
    """The parts of ``images`` whose placeholders fall in cache indices ``[start, end)``."""
    spans = []
    for image in images:
        lo = max(start, image.offset)
        hi = min(end, image.offset + image.length)
        if lo < hi:
            spans.append(MMSpan(image, lo - image.offset, hi - image.offset))
    return spans


class VisionLanguageModel(Protocol):
    """What a model that takes images offers besides a :class:`CausalLM`'s interface."""

    image_token_id: int

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """Each image's embeddings ``[image.length, hidden]``, computed in one batch."""
        ...

    def check_image(self, image: ImageInput) -> None:
        """Raise ``ValueError`` when the image's pixel data or placeholder count does not
        fit this model."""
        ...


class EncoderCache:
    """Encoder outputs by image content hash, least recently used evicted first, holding at
    most ``capacity_bytes`` of embeddings (0: nothing is kept)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, mm_hash: str) -> torch.Tensor | None:
        embeddings = self._entries.get(mm_hash)
        if embeddings is not None:
            self._entries.move_to_end(mm_hash)
        return embeddings

    def put(self, mm_hash: str, embeddings: torch.Tensor) -> None:
        size = embeddings.numel() * embeddings.element_size()
        if size > self.capacity_bytes or mm_hash in self._entries:
            return
        while self.used_bytes + size > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.used_bytes -= evicted.numel() * evicted.element_size()
        self._entries[mm_hash] = embeddings
        self.used_bytes += size


class EncoderRunner:
    """Gives a step the encoder outputs of every image it touches: from the cache, or
    encoded now, all missing images of the step in one batched call."""

    def __init__(self, model: VisionLanguageModel, cache: EncoderCache) -> None:
        self.model = model
        self.cache = cache
        # Images looked up (once per request and image) and found in the cache; and
        # images the encoder ran on.
        self.queries = 0
        self.hits = 0
        self.images_encoded = 0
        self.encoder_runs = 0

    @torch.inference_mode()
    def outputs_for(self, batch: ScheduledBatch) -> dict[str, torch.Tensor]:
        """Embeddings by image hash for every image a sequence of ``batch`` splices in."""
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, ImageInput] = {}
        for seq in batch.sequences:
            request = seq.request
            for span in seq.mm_spans:
                image = span.image
                key = image.mm_hash
                # A lookup counts once per request and image: the first chunk that needs it.
                index = next(i for i, x in enumerate(request.mm_inputs) if x is image)
                first_use = index >= request.num_mm_looked_up
                if first_use:
                    request.num_mm_looked_up = index + 1
                if key in found or key in missing:
                    self.queries += first_use
                    self.hits += first_use and key in found
                    continue
                cached = self.cache.get(key)
                self.queries += first_use
                if cached is not None:
                    self.hits += first_use
                    found[key] = cached
                else:
                    missing[key] = image
        if missing:
            images = list(missing.values())
            for image, embeddings in zip(images, self.model.encode_images(images), strict=True):
                found[image.mm_hash] = embeddings
                self.cache.put(image.mm_hash, embeddings)
            self.images_encoded += len(images)
            self.encoder_runs += 1
        return found
