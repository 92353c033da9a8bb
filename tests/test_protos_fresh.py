"""The committed protobuf/gRPC stubs must be exactly what scripts/gen_protos.py generates now."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
GENERATED = ("fleetwatch_pb2.py", "fleetwatch_pb2.pyi", "fleetwatch_pb2_grpc.py")


def _load_gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("protos-fresh")
    _load_gen_protos().generate(out)
    return out / "protos"


@pytest.mark.parametrize("name", GENERATED)
def test_committed_stubs_are_fresh(fresh: pathlib.Path, name: str) -> None:
    committed = ROOT / "protos" / name
    generated = fresh / name
    assert generated.exists(), f"scripts/gen_protos.py did not write protos/{name}"
    assert committed.exists(), (f"protos/{name} is missing: run `python scripts/gen_protos.py` "
                                "and commit the result")
    assert committed.read_bytes() == generated.read_bytes(), (
        f"protos/{name} is stale (it differs from what protos/fleetwatch.proto generates): "
        "run `python scripts/gen_protos.py` and commit the result")


def test_generation_writes_only_the_stubs(fresh: pathlib.Path) -> None:
    assert sorted(p.name for p in fresh.iterdir()) == sorted(GENERATED)
