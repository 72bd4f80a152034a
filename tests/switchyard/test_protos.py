"""The checked-in stubs under switchyard/v1/ are exactly what the protos generate today."""

from __future__ import annotations

from pathlib import Path

from switchyard import protogen


def test_checked_in_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    fresh = {p.name: p.read_bytes() for p in protogen.generate(tmp_path)}
    committed_dir = protogen.REPO_ROOT / "switchyard" / "v1"
    committed = {p.name: p.read_bytes() for p in committed_dir.iterdir() if p.is_file()}

    assert sorted(fresh) == sorted(committed), "run `python -m switchyard.protogen`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run `python -m switchyard.protogen`"


def test_stubs_import_as_a_package() -> None:
    from switchyard.v1 import controller_pb2_grpc, engine_pb2, engine_pb2_grpc

    request = engine_pb2.GenerateRequest(request_id="r", prompt_token_ids=[1, 2])
    assert engine_pb2.GenerateRequest.FromString(request.SerializeToString()) == request
    assert hasattr(engine_pb2_grpc, "EngineServiceStub")
    assert hasattr(controller_pb2_grpc, "ControllerServiceStub")
