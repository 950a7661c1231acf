"""Errors that domain code raises.

Domain code never imports grpc: it raises one of these, and the runtime's error
interceptor (autodidact.runtime.interceptors) maps each kind to one status code.
Anything else that escapes a handler is a bug and reaches the client as INTERNAL
with the request id, never as a traceback.
"""

from __future__ import annotations


class AutodidactError(Exception):
    """Base of every error a client may see; the message is shown to the client."""


class InvalidArgument(AutodidactError):
    """A request field broke a rule. The message names the field and the rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class NotFound(AutodidactError):
    """The named thing does not exist."""


class AlreadyExists(AutodidactError):
    """Something else already holds that name."""


class FailedPrecondition(AutodidactError):
    """The request is valid but the system is not in a state to serve it."""


class ResourceExhausted(AutodidactError):
    """A quota or capacity bound was reached; retrying later may succeed."""


class Unavailable(AutodidactError):
    """The service cannot answer now (still loading, a backend is down); retry."""


class DeadlineExceeded(AutodidactError):
    """The work did not finish within its time bound."""


class Unauthenticated(AutodidactError):
    """The call carries no credentials, or ones that do not verify. The message
    says which, never what a valid credential would be."""


class PermissionDenied(AutodidactError):
    """The caller is authenticated but its roles do not allow the call."""


class StartupError(Exception):
    """A process cannot start: a port in use, a damaged store. Not a client
    error: the command prints the message (one line, naming the port or the
    file) and exits 2, with no traceback."""
