"""``--lora-modules`` values, in vLLM's two forms, parsed once for every part that reads them.

``NAME=PATH`` or the JSON object ``{"name": ..., "path": ..., "base_model_name": ...}``
(``base_model_name`` optional). In YAML a module may also be a mapping with those keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class LoRAModule:
    name: str
    path: str
    base_model_name: str = ""


def parse_lora_module(value: Any) -> LoRAModule:
    """One module from ``NAME=PATH``, its JSON form, or a mapping; ``ValueError`` if bad."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--lora-modules: {value!r} is not valid JSON: {exc}") from None
    if isinstance(value, dict):
        unknown = set(value) - {"name", "path", "base_model_name"}
        if unknown:
            raise ValueError(f"--lora-modules: unknown keys {sorted(unknown)} in {value!r}")
        name, path = value.get("name"), value.get("path")
        base = value.get("base_model_name") or ""
        if not isinstance(name, str) or not isinstance(path, str) or not isinstance(base, str):
            raise ValueError(f"--lora-modules: {value!r} needs string name and path")
    elif isinstance(value, str) and "=" in value:
        name, path = value.split("=", 1)
        base = ""
    else:
        raise ValueError(f"--lora-modules: expected NAME=PATH or a JSON object, got {value!r}")
    name, path = name.strip(), path.strip()
    if not name or not path:
        raise ValueError(f"--lora-modules: {value!r} needs a name and a path")
    if ":" in name:
        raise ValueError(f"--lora-modules: adapter name {name!r} may not contain ':'")
    return LoRAModule(name, path, base)


def parse_lora_modules(values: list[Any]) -> list[LoRAModule]:
    """Every module, refusing a name given twice."""
    modules = [parse_lora_module(v) for v in values]
    names = [m.name for m in modules]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"--lora-modules: adapter names given twice: {dupes}")
    return modules
