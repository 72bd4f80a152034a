"""API keys as the gateway keeps them: hashed, with per-key limits and a token budget.

A key is never stored or logged in clear: it is identified by the SHA-256 of its text
(:func:`hash_key`) and shown to people by its id (``key_...``). Keys come from three places:

- the settings (``api_keys``) and the key file (``api_key_file``), one key per line,
  optionally followed by ``name=... rpm=N tpm=N concurrent=N budget=N``; their id is derived
  from the hash, so every gateway gives the same key the same id;
- the admin API (:mod:`gateway.admin_routes`), which creates random keys and shows each
  once.

A limit left unset takes the deployment's default (``rate_limit_rpm``, ``rate_limit_tpm``,
``rate_limit_concurrent``); 0 means unlimited. ``budget`` is a number of tokens (prompt
plus completion) the key may spend in all; unset means no budget.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

LIMIT_FIELDS = ("rpm", "tpm", "concurrent", "budget")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def config_key_id(key_hash: str) -> str:
    return "key_" + key_hash[:16]


def new_key() -> str:
    return "sk-sy-" + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


@dataclass(slots=True)
class KeyLimits:
    """Per-key limits; None takes the deployment's default (budget: none)."""

    rpm: int | None = None
    tpm: int | None = None
    concurrent: int | None = None
    budget: int | None = None

    def to_dict(self) -> dict[str, int | None]:
        return asdict(self)


@dataclass(slots=True)
class KeyRecord:
    """A key as stored: its hash, public id, name, limits and whether it is revoked."""

    id: str
    key_hash: str
    name: str = ""
    limits: KeyLimits = field(default_factory=KeyLimits)
    created: int = field(default_factory=lambda: int(time.time()))
    revoked: bool = False
    source: str = "admin"  # "config": from the settings or the key file

    def public(self, spent_tokens: int | None = None) -> dict[str, Any]:
        """What the admin API shows (never the key or its hash)."""
        shown: dict[str, Any] = {
            "id": self.id,
            "object": "api_key",
            "name": self.name,
            "created": self.created,
            "revoked": self.revoked,
            "source": self.source,
            **self.limits.to_dict(),
        }
        if spent_tokens is not None:
            shown["spent_tokens"] = spent_tokens
        return shown


def parse_limit(name: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {text!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def parse_key_line(line: str, where: str) -> tuple[str, str, KeyLimits]:
    """``KEY [name=NAME] [rpm=N] [tpm=N] [concurrent=N] [budget=N]``."""
    key, *options = line.split()
    name = ""
    limits = KeyLimits()
    for option in options:
        option_name, sep, value = option.partition("=")
        if not sep:
            raise ValueError(f"{where}: expected NAME=VALUE after the key, got {option!r}")
        if option_name == "name":
            name = value
        elif option_name in LIMIT_FIELDS:
            setattr(limits, option_name, parse_limit(f"{where}: {option_name}", value))
        else:
            raise ValueError(
                f"{where}: unknown option {option_name!r} (name, rpm, tpm, concurrent, budget)"
            )
    return key, name, limits


def load_config_keys(keys: Iterable[str], key_file: Path | None) -> list[KeyRecord]:
    """The keys of the settings and of the key file, hashed.

    A key file that holds no key raises ``ValueError``: asking for one means asking for
    authentication, and an empty file (a secret that was not mounted) must not open the
    gateway to everyone."""
    entries: list[tuple[str, str, KeyLimits]] = [
        (key.strip(), "", KeyLimits()) for key in keys if key.strip()
    ]
    if key_file is not None:
        from_file = [
            parse_key_line(line.strip(), f"{key_file}:{number}")
            for number, line in enumerate(key_file.read_text().splitlines(), start=1)
            if line.strip() and not line.strip().startswith("#")
        ]
        if not from_file:
            raise ValueError(f"the API key file {key_file} holds no API key")
        entries += from_file
    records: dict[str, KeyRecord] = {}
    for key, name, limits in entries:
        key_hash = hash_key(key)
        records[key_hash] = KeyRecord(
            id=config_key_id(key_hash), key_hash=key_hash, name=name, limits=limits, source="config"
        )
    return list(records.values())
