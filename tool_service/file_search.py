"""The built-in ``file_search`` tool: a read-only search over configured directories.

Input ``{"query": string, "glob"?: string, "max_results"?: int}``. Every text file under
the roots (``glob`` narrows the files, matched against the path relative to its root) is
searched for ``query``, case-insensitively; a file whose path matches the query counts as a
hit too. Results name the file as ``ROOT/relative/path`` (ROOT is the root directory's base
name) with the line number and the line.

Read-only by construction: the tool opens files for reading only, never follows a symlink
out of its root, and skips files larger than ``max_file_bytes`` and files that are not
UTF-8 text. The walk runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from switchyard.v1 import tool_pb2
from tool_service.tools import (
    BUILTIN_LABEL,
    ProgressFn,
    Tool,
    ToolError,
    ToolOutput,
    require_string,
)

MAX_LINE_CHARS = 300


@dataclass(frozen=True, slots=True)
class Match:
    path: str
    line: int  # 0: the path itself matched
    text: str


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def search_files(
    roots: list[Path],
    query: str,
    *,
    glob: str = "*",
    max_results: int = 20,
    max_file_bytes: int = 1 << 20,
) -> list[Match]:
    """Up to ``max_results`` matches of ``query`` in the files under ``roots``."""
    needle = query.lower()
    matches: list[Match] = []
    for root in roots:
        root = root.resolve()
        for directory, subdirs, files in os.walk(root):
            subdirs.sort()
            here = Path(directory)
            for name in sorted(files):
                path = here / name
                real = path.resolve()
                if not _inside(real, root) or not real.is_file():
                    continue  # a symlink that leads out of the root
                relative = path.relative_to(root).as_posix()
                if not fnmatch.fnmatch(relative, glob):
                    continue
                shown = f"{root.name}/{relative}"
                if needle in relative.lower():
                    matches.append(Match(shown, 0, relative))
                if real.stat().st_size <= max_file_bytes:
                    matches.extend(_search_file(real, shown, needle))
                if len(matches) >= max_results:
                    return matches[:max_results]
    return matches


def _search_file(path: Path, shown: str, needle: str) -> list[Match]:
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return []
    return [
        Match(shown, number, line.strip()[:MAX_LINE_CHARS])
        for number, line in enumerate(text.splitlines(), start=1)
        if needle in line.lower()
    ]


class FileSearchTool(Tool):
    """``file_search`` over ``roots``."""

    def __init__(self, roots: list[Path], max_file_bytes: int = 1 << 20) -> None:
        missing = [str(root) for root in roots if not root.is_dir()]
        if missing:
            raise ValueError(f"file search roots are not directories: {', '.join(missing)}")
        self.roots = [root.resolve() for root in roots]
        self.max_file_bytes = max_file_bytes
        names = ", ".join(root.name for root in self.roots)
        self.info = tool_pb2.ToolInfo(
            name="file_search",
            server_label=BUILTIN_LABEL,
            server_tool_name="file_search",
            description=(
                f"Searches the text files under {names} (read-only) for a string, "
                "case-insensitively; returns matching lines as path:line: text."
            ),
            input_schema_json=(
                '{"type": "object", "properties": {'
                '"query": {"type": "string", "description": "text to look for"}, '
                '"glob": {"type": "string", "description": "only files whose relative path '
                'matches this glob, e.g. *.md"}, '
                '"max_results": {"type": "integer", "minimum": 1, "maximum": 200}}, '
                '"required": ["query"], "additionalProperties": false}'
            ),
        )

    async def call(self, arguments: dict[str, Any], progress: ProgressFn) -> ToolOutput:
        query = require_string(arguments, "query")
        if not query.strip():
            raise ToolError("query must not be empty")
        glob = arguments.get("glob", "*")
        max_results = arguments.get("max_results", 20)
        if not isinstance(glob, str):
            raise ToolError("argument 'glob' must be a string")
        if not isinstance(max_results, int) or not 1 <= max_results <= 200:
            raise ToolError("argument 'max_results' must be an integer in 1..200")
        matches = await asyncio.to_thread(
            search_files,
            self.roots,
            query,
            glob=glob,
            max_results=max_results,
            max_file_bytes=self.max_file_bytes,
        )
        lines = [
            f"{match.path}:{match.line}: {match.text}" if match.line else match.path
            for match in matches
        ]
        return ToolOutput.text(
            "\n".join(lines) if lines else f"no matches for {query!r}",
            structured={
                "matches": [
                    {"path": match.path, "line": match.line, "text": match.text}
                    for match in matches
                ]
            },
        )
