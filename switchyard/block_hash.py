"""The chained hash of a KV block's tokens, shared by engines, the KV service and gateways.

An engine keys every full block of ``block_size`` tokens by a hash chained over all tokens
before it, so a block hash names a whole prefix. Gateways compute the same hashes from a
prompt to ask "which replica holds the longest prefix of this?", so the function lives here,
where every part may import it::

    tokens  [t0 .. t15][t16 .. t31][t32 .. t40]
    hashes  h0 = H(None, t0..t15, extra)
            h1 = H(h0, t16..t31, extra)   the partial block at the end has no hash

``extra`` is :func:`block_extra_keys` of the request: what besides the tokens decides a
block's KV (a LoRA adapter, a cache salt, the images it shows). Every part builds it with
that one function, so a gateway and an engine agree on the hashes of any request.

Images enter per block: a block's keys carry the content hash (:func:`image_hash`) of every
image whose placeholder tokens it covers, and the blocks after it inherit the image through
the chain. Blocks before an image hold plain text KV and are shared whatever image follows::

    tokens   [ text ......][ text <img><img>][<img><img> text ][ text ...... ]
    keys        base           base + h(img)    base + h(img)      base
                shared         differ by image, and so does every hash after them
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

BLOCK_HASH_BYTES = 16


@dataclass(frozen=True, slots=True)
class MediaSpan:
    """An image's placeholder tokens in a prompt: ``length`` tokens from ``offset``, whose
    KV depends on the image with content hash ``mm_hash``."""

    offset: int
    length: int
    mm_hash: str


def image_hash(
    pixel_bytes: bytes,
    shape: Sequence[int],
    dtype: str,
    grid_thw: Sequence[int] | None = None,
) -> str:
    """The content hash of a preprocessed image: its pixel bytes (``dtype``, a numpy dtype
    name, in ``shape``) and its patch grid if the model has one. The gateway hashes the
    bytes it sends and the engine those it receives, so the two agree."""
    digest = hashlib.blake2b(digest_size=BLOCK_HASH_BYTES)
    layout = (tuple(int(x) for x in shape), dtype, tuple(int(x) for x in grid_thw or ()))
    digest.update(repr(layout).encode())
    digest.update(pixel_bytes)
    return "img:" + digest.hexdigest()


def block_media_hashes(media: Sequence[MediaSpan], start: int, end: int) -> tuple[str, ...]:
    """The hashes of the images whose placeholders overlap tokens ``[start, end)``."""
    return tuple(
        span.mm_hash for span in media if span.offset < end and start < span.offset + span.length
    )


def with_media(extra_keys: tuple[str, ...], mm_hashes: Sequence[str]) -> tuple[str, ...]:
    """``extra_keys`` (of :func:`block_extra_keys`, without images) with images added: the
    same as :func:`block_extra_keys` given the images too."""
    if not mm_hashes:
        return extra_keys
    return (*(extra_keys or ("", "")), *mm_hashes)


def block_extra_keys(
    adapter: str | None = None, cache_salt: str | None = None, mm_hashes: Sequence[str] = ()
) -> tuple[str, ...]:
    """The extra keys every block of a request is hashed with: ``()`` for a plain request
    (so its hashes are the tokens' alone), else ``(adapter, cache_salt, *mm_hashes)`` with
    ``""`` standing for an absent adapter or salt (``None`` and ``""`` mean the same, as in
    protobuf). Requests differing in any of these never share a block."""
    if not (adapter or cache_salt or mm_hashes):
        return ()
    return (adapter or "", cache_salt or "", *mm_hashes)


def lora_adapter_key(fingerprint: str) -> str:
    """The adapter key of :func:`block_extra_keys` for a LoRA adapter: its content
    fingerprint (a digest of its weights and config), never its name or path, so that KV
    computed with other weights under the same name is never served."""
    return f"lora:{fingerprint}"


def hash_block(
    parent_hash: bytes | None, token_ids: Sequence[int], extra_keys: tuple[str, ...] = ()
) -> bytes:
    """A block's identity (``BLOCK_HASH_BYTES`` bytes): stable across processes, so replicas
    and the KV store agree. ``extra_keys`` comes from :func:`block_extra_keys`."""
    digest = hashlib.blake2b(digest_size=BLOCK_HASH_BYTES)
    digest.update(parent_hash or b"\x00")
    digest.update(array("q", token_ids).tobytes())
    if extra_keys:
        digest.update(repr(extra_keys).encode())
    return digest.digest()


def chained_block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: tuple[str, ...] = (),
    media: Sequence[MediaSpan] = (),
) -> list[bytes]:
    """The hashes of every full block of ``token_ids``, first block first; ``media`` are
    the prompt's images, keyed into the blocks they cover."""
    return extend_block_hashes([], token_ids, block_size, extra_keys, media)


def extend_block_hashes(
    hashes: list[bytes],
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: tuple[str, ...] = (),
    media: Sequence[MediaSpan] = (),
) -> list[bytes]:
    """Append to ``hashes`` (those of the first blocks of ``token_ids``) the hashes of the
    remaining full blocks; returns ``hashes``."""
    for i in range(len(hashes), len(token_ids) // block_size):
        start = i * block_size
        keys = extra_keys
        if media:
            keys = with_media(extra_keys, block_media_hashes(media, start, start + block_size))
        parent = hashes[i - 1] if i > 0 else None
        hashes.append(hash_block(parent, token_ids[start : start + block_size], keys))
    return hashes
