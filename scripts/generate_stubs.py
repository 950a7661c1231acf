"""Regenerates the Python stubs of protos/autodidact/v1 into services/autodidact/v1.

    python scripts/generate_stubs.py            # write into the package
    python scripts/generate_stubs.py --out DIR  # write elsewhere (the staleness test)

Uses grpcio-tools (message and service code) and mypy-protobuf (.pyi stubs),
both pinned in pyproject.toml so that the output is reproducible.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_ROOT = ROOT / "services"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "autodidact" / "v1").glob("*.proto"))


def generate(out_root: Path) -> None:
    out_dir = out_root / "autodidact" / "v1"
    out_dir.mkdir(parents=True, exist_ok=True)
    # The mypy plugins live next to this interpreter (installed by mypy-protobuf).
    bin_dir = Path(sys.executable).parent
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    init = out_dir / "__init__.py"
    init.write_text('"""Generated gRPC stubs of protos/autodidact/v1. Never edit by hand: run scripts/generate_stubs.py."""\n')
    (out_dir / "py.typed").write_text("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=PACKAGE_ROOT, help="root to write autodidact/v1 under")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
