"""The protos stay conventional (buf lint) and the checked-in stubs match them."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUBS = ROOT / "services" / "autodidact" / "v1"


def test_checked_in_stubs_match_the_protos(tmp_path: Path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_stubs.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = tmp_path / "autodidact" / "v1"
    generated = sorted(p.name for p in fresh.iterdir())
    checked_in = sorted(p.name for p in STUBS.iterdir() if p.name != "__pycache__")
    assert generated == checked_in, "stub files differ: run `make stubs`"
    _, mismatch, errors = filecmp.cmpfiles(fresh, STUBS, generated, shallow=False)
    assert not mismatch and not errors, f"stale stubs {mismatch + errors}: run `make stubs`"


def test_buf_lint_passes():
    buf = ROOT / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        pytest.fail("buf is not installed: `make test` installs it (npm ci)")
    result = subprocess.run([str(buf), "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_has_a_contract():
    services = {
        "generator": "GeneratorService",
        "scorer": "ScorerService",
        "critic": "CriticService",
        "tool_executor": "ToolExecutorService",
        "dedup": "DedupService",
        "coordinator": "CoordinatorService",
    }
    import importlib

    for module, service in services.items():
        descriptor = importlib.import_module(f"autodidact.v1.{module}_pb2").DESCRIPTOR
        assert service in descriptor.services_by_name, f"{module}.proto lacks {service}"
        assert descriptor.package == "autodidact.v1"
