"""stack.py: the service graph, the wiring every local stack shares, and a small real stack on loopback."""

from __future__ import annotations

from dataclasses import fields

import grpc
import pytest
from grpc_health.v1 import health_pb2

from autodidact.client import health_stub
from autodidact.runtime.settings import ServerSettings
from autodidact.stack import (
    BUILDERS,
    CALLS,
    DEFAULT_PORTS,
    IMPLEMENTED,
    LocalStack,
    StackOptions,
    services_for,
    shifted_ports,
    start_order,
    wired,
)

EVERYWHERE = {name: f"host-{name}:{port}" for name, port in DEFAULT_PORTS.items()}


def test_the_graph_names_every_service_and_only_services():
    assert set(CALLS) == set(BUILDERS) == set(DEFAULT_PORTS)
    assert all(set(neighbours) <= set(BUILDERS) for neighbours in CALLS.values())


def test_every_service_starts_after_the_services_it_calls():
    order = start_order(IMPLEMENTED)
    assert order == list(IMPLEMENTED)
    for service, neighbours in CALLS.items():
        assert all(order.index(n) < order.index(service) for n in neighbours), service


def test_start_order_keeps_only_what_was_asked_and_refuses_unknown_names():
    assert start_order(["coordinator", "critic", "scorer", "generator"]) == ["generator", "scorer", "critic", "coordinator"]
    with pytest.raises(ValueError, match="no service named 'judge'; services: generator, scorer"):
        start_order(["generator", "judge"])


def test_a_recipe_gets_the_services_it_declares_and_what_they_call():
    from autodidact.coordinator.recipes.registry import RECIPES

    for name, recipe in RECIPES.items():
        started = services_for(name)
        assert started == start_order(started), name
        for service in started:
            assert set(CALLS[service]) <= set(started), (name, service)
        assert {s.replace("_", "-") for s in recipe.services} <= set(started), name
    assert services_for("constitutional") == ["generator", "scorer", "critic"]  # the critic calls both
    assert services_for("no_such_recipe") == []


def test_wired_points_each_service_at_its_neighbours():
    options = wired(StackOptions(), EVERYWHERE)
    assert options.tool_executor.generator_target == "host-generator:50051"
    assert (options.critic.generator_target, options.critic.scorer_target) == ("host-generator:50051", "host-scorer:50052")
    coordinator = options.coordinator
    assert {f.name: getattr(coordinator, f.name) for f in fields(coordinator) if f.name.endswith("_target")} == {
        "generator_target": "host-generator:50051",
        "dedup_target": "host-dedup:50055",
        "scorer_target": "host-scorer:50052",
        "tool_executor_target": "host-tool-executor:50054",
        "critic_target": "host-critic:50053",
    }


def test_a_neighbour_absent_from_the_targets_keeps_its_configured_address():
    options = wired(StackOptions(), {"generator": "127.0.0.1:7000"})
    assert options.critic.generator_target == options.coordinator.generator_target == "127.0.0.1:7000"
    assert options.critic.scorer_target == StackOptions().critic.scorer_target
    assert options.coordinator.dedup_target == StackOptions().coordinator.dedup_target


def test_wiring_keeps_every_other_setting(tmp_path):
    base = StackOptions().under(tmp_path)
    options = wired(base, EVERYWHERE)
    assert options.coordinator.patience_seconds == base.coordinator.patience_seconds
    assert options.coordinator.data_dir == tmp_path / "coordinator"
    assert options.tool_executor.data_dir == tmp_path / "tool-executor"
    assert options.dedup_data_dir == tmp_path / "dedup"


def test_up_shifts_every_port_with_the_base_port():
    assert shifted_ports(50050) == DEFAULT_PORTS
    assert shifted_ports(6000) == {name: port - 50050 + 6000 for name, port in DEFAULT_PORTS.items()}
    with pytest.raises(ValueError, match="--base-port must be between 1 and 65,530, got 65531"):
        shifted_ports(65531)


def test_services_on_fixed_ports_are_wired_before_they_start():
    """`autodidact up`: every port is known, so the stack is built without starting anything."""
    stack = LocalStack(StackOptions())
    for name, port in shifted_ports(7000).items():
        stack.add(name, ServerSettings(port=port))
    assert [stack.target(name) for name in IMPLEMENTED] == [f"127.0.0.1:{port}" for port in (7001, 7002, 7004, 7003, 7005, 7000)]


async def test_a_stack_on_free_ports_starts_in_order_and_serves(tmp_path):
    """Two services that need no model: the critic, and a coordinator whose critic is that one."""
    stack = LocalStack(StackOptions().under(tmp_path))
    await stack.start(["coordinator", "critic"], ServerSettings(grace_seconds=0), wait_each=True)
    try:
        assert list(stack.hosts) == ["critic", "coordinator"]
        assert stack.target("critic") != stack.target("coordinator")
        for name in stack.hosts:
            async with grpc.aio.insecure_channel(stack.target(name)) as channel:
                reply = await health_stub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        assert (tmp_path / "coordinator" / "jobs.sqlite").exists()
    finally:
        await stack.stop()
