"""Regenerates the Python stubs under ``switchyard/v1/`` from ``proto/switchyard/v1/*.proto``.

``python -m switchyard.protogen`` writes ``*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py``
with ``grpc_tools.protoc``. The protos are compiled with ``-Iproto``, so their imports
(``import "switchyard/v1/common.proto"``) become ``from switchyard.v1 import common_pb2``.
The generated files are checked in; ``tests/switchyard/test_protos.py`` fails when they are
stale.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PACKAGE_INIT = (
    '"""Generated protobuf and gRPC stubs; run ``python -m switchyard.protogen`` to refresh."""\n'
)


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The ``.proto`` sources of the ``switchyard.v1`` package, sorted."""
    return sorted((proto_root / "switchyard" / "v1").glob("*.proto"))


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every proto into ``out_root/switchyard/v1/`` and return the files written.

    ``out_root`` is the directory that holds the ``switchyard`` package (the repo root for the
    checked-in stubs). Raises ``RuntimeError`` when protoc fails.
    """
    from grpc_tools import protoc

    sources = proto_files(proto_root)
    if not sources:
        raise RuntimeError(f"no .proto files under {proto_root / 'switchyard' / 'v1'}")
    package_dir = out_root / "switchyard" / "v1"
    package_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(source.relative_to(proto_root)) for source in sources),
    ]
    # protoc resolves the relative source names against the -I roots.
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    (package_dir / "__init__.py").write_text(PACKAGE_INIT)
    return sorted(p for p in package_dir.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m switchyard.protogen", description=__doc__)
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT,
        help="directory that holds the switchyard package (default: the repository root)",
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
