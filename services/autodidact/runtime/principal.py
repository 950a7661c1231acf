"""Who a call is from: its principal (tenant, subject, roles), bound for the
call by the authentication interceptor (runtime/auth.py) and read by domain
code through `current_principal()`.

Roles are cumulative: a submitter may do what a viewer may, an admin what a
submitter may. The "service" role is the identity of autodidact's own
services: a service may act for any tenant, and names the tenant it acts for
in the ON_BEHALF_OF_HEADER of its calls (a job's calls to dedup carry the
job's tenant), so a namespace is the job's tenant's whichever service calls.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from collections.abc import Iterator
from dataclasses import dataclass

from autodidact.errors import PermissionDenied

VIEWER = "viewer"
SUBMITTER = "submitter"
ADMIN = "admin"
SERVICE = "service"
ROLES = (VIEWER, SUBMITTER, ADMIN, SERVICE)
# What each role may do, cumulatively; "service" may do what an admin may.
_RANK = {VIEWER: 1, SUBMITTER: 2, ADMIN: 3, SERVICE: 4}

# The tenant a service acts for, sent with its calls to other services.
ON_BEHALF_OF_HEADER = "x-autodidact-tenant"
# The tenant of every call when authentication is turned off (--insecure).
DEFAULT_TENANT = "default"
# Tenant names: they name folders in every service's data dir, and "<tenant>/<name>" references.
TENANT_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,63}\Z")
TENANT_RULE = "1 to 64 characters of a-z 0-9 -, starting with a letter or digit"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `tenant` owns what it creates; `subject`
    names the caller in audit lines (a token's name, a JWT's sub)."""

    tenant: str
    subject: str
    roles: frozenset[str]

    def may(self, role: str) -> bool:
        """True when one of this principal's roles includes `role`."""
        return any(_RANK.get(held, 0) >= _RANK[role] for held in self.roles)

    def require(self, role: str, action: str) -> None:
        """Raises PermissionDenied unless this principal may act as `role`."""
        if not self.may(role):
            raise PermissionDenied(f"{action} needs the {role} role; {self.subject!r} has {', '.join(sorted(self.roles)) or 'none'}")


# What a process serving without authentication (--insecure) grants every call.
ANONYMOUS = Principal(DEFAULT_TENANT, "anonymous", frozenset({ADMIN}))
# The principal of a call to an open method (health, reflection, what --open-methods adds) when
# authentication is on: no tenant and no role, so such a call reaches nobody's jobs or data.
NOBODY = Principal("", "unauthenticated", frozenset())

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("autodidact_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The principal of the call being served (ANONYMOUS outside any call and
    when authentication is off). A job's task runs under its tenant's
    principal (`acting_as`), so the calls it makes carry that tenant."""
    return _current.get()


@contextlib.contextmanager
def acting_as(principal: Principal) -> Iterator[None]:
    """Binds `principal` as the current one for the block (and for tasks created in it)."""
    token = _current.set(principal)
    try:
        yield
    finally:
        _current.reset(token)
