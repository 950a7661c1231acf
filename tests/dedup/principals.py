"""Principals for tenancy tests, without the authentication work: bound directly
(`acting_as`) around domain calls, or over gRPC by BindPrincipal from test metadata."""

from __future__ import annotations

from typing import Any

import grpc

from autodidact.runtime.principal import SUBMITTER, Principal, acting_as

TENANT_KEY, ROLES_KEY = "x-test-tenant", "x-test-roles"


def principal(tenant: str, *roles: str) -> Principal:
    return Principal(tenant, f"{tenant}-user", frozenset(roles or {SUBMITTER}))


def as_(tenant: str, roles: str = SUBMITTER) -> tuple[tuple[str, str], ...]:
    """Metadata that makes BindPrincipal bind a principal of `tenant` with `roles` (comma-separated)."""
    return ((TENANT_KEY, tenant), (ROLES_KEY, roles))


class BindPrincipal(grpc.aio.ServerInterceptor):
    """Stands in for the authentication interceptor (unary calls): the principal comes from test metadata.
    Put it inside the ErrorInterceptor, as the real one is, so domain refusals become status codes."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        who = Principal(str(metadata[TENANT_KEY]), "tester", frozenset(str(metadata.get(ROLES_KEY, SUBMITTER)).split(",")))
        behaviour = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with acting_as(who):
                return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
