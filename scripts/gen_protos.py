#!/usr/bin/env python3
"""Regenerate the committed gRPC/protobuf stubs from protos/fleetwatch.proto.

Usage: python scripts/gen_protos.py [--out DIR]

The generated files must be produced by the grpcio-tools version pinned in pyproject.toml;
tests/test_protos_fresh.py regenerates them into a temporary directory and compares bytes.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO = "protos/fleetwatch.proto"


def generate(out_dir: pathlib.Path) -> None:
    """Run protoc (from grpcio-tools) so imports read `from protos import fleetwatch_pb2`."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(ROOT / PROTO),
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT,
                        help="root to write protos/*_pb2*.py under (default: the repository)")
    ns = parser.parse_args(argv)
    generate(ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
