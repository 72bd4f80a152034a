"""Attention backends over the paged KV cache, found by name through a registry.

``sdpa`` is the reference: it runs wherever torch runs and is the oracle the fast backends
are tested against. ``triton`` (CUDA) reads K/V in place through block tables with Triton
kernels and can be captured in CUDA graphs. The contract every backend implements is
:mod:`engine_service.layers.paged_attention`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from engine_service.layers.paged_attention import AttentionBackend, AttentionMetadata

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "available_backends",
    "get_attention_backend",
    "register_backend",
]

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, Callable[[], type[AttentionBackend]]] = {}


def register_backend(name: str, load: Callable[[], type[AttentionBackend]]) -> None:
    """Make ``name`` choosable; ``load`` imports the class only when it is chosen, so a
    backend's kernels (Triton) are not imported on machines that cannot run them."""
    _REGISTRY[name] = load


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def get_attention_backend(
    name: str, device: torch.device, needs: Iterable[str] = ()
) -> AttentionBackend:
    """The backend called ``name`` for a model that needs the capability flags ``needs``
    (such as ``supports_sinks``).

    ``auto`` is the Triton backend on a CUDA device with Triton installed, else SDPA; when
    that pick lacks something the model needs, the next backend that has it all is taken,
    with a warning. A backend named explicitly is returned as it is, so that the model
    refuses it at load with its own message rather than running on something else.
    """
    needs = set(needs)
    if name == "auto":
        order = _auto_order(device)
        fits = [n for n in order if all(getattr(_REGISTRY[n](), f) for f in needs)]
        name = fits[0] if fits else order[0]
        if name != order[0]:
            lacking = sorted(f for f in needs if not getattr(_REGISTRY[order[0]](), f))
            logger.warning(
                "attention backend auto: %s lacks %s that the model needs; using %s",
                order[0],
                ", ".join(lacking),
                name,
            )
    if name not in _REGISTRY:
        raise ValueError(
            f"unknown attention backend {name!r}; choose auto, {', '.join(available_backends())}"
        )
    if name == "triton" and device.type != "cuda":
        raise ValueError("the triton attention backend needs a CUDA device")
    return _REGISTRY[name]()()


def _auto_order(device: torch.device) -> list[str]:
    """Backends ``auto`` may take on ``device``, best first; SDPA, the reference that
    implements the whole contract, last."""
    if device.type == "cuda" and _triton_available():
        return ["triton", "sdpa"]
    return ["sdpa"]


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _load_sdpa() -> type[AttentionBackend]:
    from engine_service.engine.attention.sdpa import SdpaBackend

    return SdpaBackend


def _load_triton() -> type[AttentionBackend]:
    from engine_service.engine.attention.triton_backend import TritonBackend

    return TritonBackend


register_backend("sdpa", _load_sdpa)
register_backend("triton", _load_triton)
