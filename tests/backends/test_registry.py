"""backends/registry.py: backends as data, and the CLI and docs that derive from the tables."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest

from autodidact.backends.registry import EMBEDDER_PORT, LLM_PORT, Backend, Port
from autodidact.backends.remote import RemoteSettings
from autodidact.cli import _parser

DOCS = Path(__file__).resolve().parents[2] / "docs"
PORTS: dict[str, Port[Any]] = {"llm": LLM_PORT, "embedder": EMBEDDER_PORT}


class Recorder:
    """DOUBLE: a backend that returns the settings it was loaded with."""

    @classmethod
    async def load(cls, settings: object) -> object:
        return settings


TEST_PORT: Port[object] = Port(
    flag="--test-backend",
    url_flag="--test-url",
    default="embedded",
    backends={
        "embedded": Backend(f"{__name__}:Recorder", "in this process"),
        "remote": Backend(f"{__name__}:Recorder", "over HTTP", remote=True),
    },
)


@pytest.mark.parametrize("port", PORTS.values(), ids=PORTS.keys())
def test_every_backend_names_a_class_that_loads(port):
    assert port.default in port.backends
    for name, backend in port.backends.items():
        implementation = backend.implementation_class()
        assert inspect.iscoroutinefunction(implementation.load), name


async def test_a_remote_backend_is_built_from_the_server_and_an_embedded_one_from_its_settings():
    embedded, remote = object(), RemoteSettings(url="http://model:80")
    assert await TEST_PORT.loader("embedded", embedded, remote)() is embedded
    assert await TEST_PORT.loader("remote", embedded, remote)() is remote


@pytest.mark.parametrize("remote", [None, RemoteSettings(url="")])
def test_a_remote_backend_without_an_address_is_refused_naming_the_flag(remote):
    TEST_PORT.check("embedded", remote)
    with pytest.raises(ValueError, match="this backend needs the server's address: --test-url URL"):
        TEST_PORT.check("remote", remote)
    with pytest.raises(ValueError, match="this backend needs the server's address"):  # at start, not when it loads
        TEST_PORT.loader("remote", object(), remote)


def test_an_unknown_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="--test-backend: no backend named 'gpu'; backends: embedded, remote"):
        TEST_PORT.backend("gpu")


def test_the_cli_offers_exactly_the_registered_backends(capsys):
    for port in PORTS.values():
        assert getattr(_parser().parse_args(["serve", "generator"]), port.flag.removeprefix("--").replace("-", "_")) == port.default
        for name in port.choices:
            _parser().parse_args(["serve", "generator", port.flag, name])
        with pytest.raises(SystemExit):
            _parser().parse_args(["serve", "generator", port.flag, "unregistered"])
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--help"])
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    for port in PORTS.values():
        assert port.flag in shown and port.url_flag in shown
        assert all(f"{name}: {backend.summary}" in shown for name, backend in port.backends.items())


@pytest.mark.parametrize(("port", "variable"), [(LLM_PORT, "AUTODIDACT_LLM_BACKEND"), (EMBEDDER_PORT, "AUTODIDACT_EMBEDDER")])
def test_the_deploy_guide_lists_every_backend(port, variable):
    guide = (DOCS / "deploy.md").read_text(encoding="utf-8")
    rows = [line for line in guide.splitlines() if line.startswith("|") and f"`{variable}`" in line]
    assert len(rows) == 1, f"docs/deploy.md: one row of the environment table for {variable}"
    assert all(f"`{name}`" in rows[0] for name in port.backends), rows[0]
