"""Who is calling: bearer tokens turned into a Principal, roles per method, audit lines.

Two kinds of bearer token, both checked here and nowhere else:
- static tokens listed in an auth file by their sha256 (a mounted Secret; the
  file is re-read when it changes, because a mounted Secret is updated in place);
- JWTs (OIDC, Kubernetes projected ServiceAccount tokens) verified against a
  JWKS (a file or a URL) for signature, expiry, issuer and audience, with
  asymmetric algorithms only: a JWKS holds public keys, and accepting HS256
  would let anyone who has the public key sign tokens with it.

The server interceptor (runtime/interceptors.py) calls `Authenticator.authenticate`
with the call's metadata, `required_role` with its method, and `audit_line` once
the call ends. Errors name what is wrong with the credential, never a token,
a hash or a key.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import yaml

from autodidact import errors
from autodidact.runtime.principal import (
    ADMIN,
    ANONYMOUS,
    ON_BEHALF_OF_HEADER,
    ROLES,
    SERVICE,
    SUBMITTER,
    TENANT_PATTERN,
    TENANT_RULE,
    VIEWER,
    Principal,
)

log = structlog.get_logger("autodidact.auth")
# A key id the cached JWKS lacks triggers a fetch of the key set at most this often.
JWKS_REFETCH_SECONDS = 30.0

# Open to every caller: Kubernetes probes and grpcurl carry no token.
DEFAULT_OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Signature algorithms a JWT may use: public-key ones only (never "none" or HS*).
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
# The request fields that name the object a call acts on, for the audit line.
OBJECT_FIELDS = ("job_id", "dataset_id", "namespace", "collection")


@dataclass(frozen=True)
class StaticToken:
    """One bearer token the server accepts, known by its sha256 only."""

    sha256: str
    subject: str
    tenant: str
    roles: frozenset[str]

    @classmethod
    def of(cls, token: str, subject: str, tenant: str, roles: frozenset[str]) -> StaticToken:
        """The entry for a token held in memory (`autodidact up`'s session token)."""
        return cls(token_sha256(token), subject, tenant, roles)


@dataclass(frozen=True)
class AuthSettings:
    """How a server authenticates its callers (the `serve` flags of the same names)."""

    # No authentication: every call is ANONYMOUS (tenant "default", admin).
    insecure: bool = False
    # YAML: `tokens: [{sha256, subject, tenant, roles}]`, `subjects: {<jwt sub>: {tenant, roles}}`.
    auth_file: Path | None = None
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwks_file: Path | None = None
    jwks_url: str = ""
    jwt_tenant_claim: str = "tenant"
    jwt_roles_claim: str = "roles"
    # Method name prefixes served without authentication.
    open_methods: tuple[str, ...] = DEFAULT_OPEN_METHODS
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Mutual TLS: clients must present a certificate signed by this CA.
    tls_client_ca: Path | None = None
    # Tokens held in memory rather than in a file (`autodidact up`'s session token).
    static_tokens: tuple[StaticToken, ...] = ()

    @property
    def verifies_jwts(self) -> bool:
        return self.jwks_file is not None or bool(self.jwks_url)

    @property
    def configured(self) -> bool:
        """True when this says how to authenticate callers (or, explicitly, not to)."""
        return self.insecure or self.auth_file is not None or self.verifies_jwts or bool(self.static_tokens)

    def check(self) -> None:
        """Raises ValueError (one line naming the flags) for a configuration that cannot work."""
        if self.verifies_jwts and not (self.jwt_issuer and self.jwt_audience):
            raise ValueError("verifying JWTs (--jwks-file / --jwks-url) needs --jwt-issuer and --jwt-audience")
        if self.jwks_file is not None and self.jwks_url:
            raise ValueError("give --jwks-file or --jwks-url, not both")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("mutual TLS (--tls-client-ca) needs --tls-cert and --tls-key")


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random bearer token (256 bits)."""
    return secrets.token_urlsafe(32)


def auth_file_entry(token: str, subject: str, tenant: str, roles: list[str]) -> dict[str, Any]:
    """The auth file's `tokens:` entry for `token` (what `autodidact token` prints)."""
    return {"sha256": token_sha256(token), "subject": subject, "tenant": tenant, "roles": list(roles)}


def check_tenant(tenant: str, where: str) -> str:
    if not TENANT_PATTERN.match(tenant):
        raise ValueError(f"{where}: tenant must be {TENANT_RULE}, got {tenant!r}")
    return tenant


def _roles(value: object, where: str) -> frozenset[str]:
    """Roles from a list or a space-separated string (OAuth scopes are written so)."""
    names = value.split() if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{where}: roles must be a list of {', '.join(ROLES)}")
    unknown = sorted(set(names) - set(ROLES))
    if unknown:
        raise ValueError(f"{where}: unknown role {unknown[0]!r}; roles are {', '.join(ROLES)}")
    return frozenset(names)


@dataclass(frozen=True)
class AuthFile:
    """What an auth file says: static tokens by sha256, and JWT subjects' tenants and roles."""

    tokens: tuple[StaticToken, ...] = ()
    subjects: Mapping[str, tuple[str, frozenset[str]]] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, where: str) -> AuthFile:
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict) or set(raw) - {"tokens", "subjects"}:
            raise ValueError(f"{where}: expected a mapping with `tokens` and/or `subjects`")
        tokens = []
        for i, entry in enumerate(raw.get("tokens") or []):
            at = f"{where}: tokens[{i}]"
            if not isinstance(entry, dict) or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256", ""))):
                raise ValueError(f"{at}: needs sha256 (64 lowercase hex digits), subject, tenant and roles")
            subject = str(entry.get("subject") or "")
            if not subject:
                raise ValueError(f"{at}: needs a subject (the name audit lines give the caller)")
            tenant = check_tenant(str(entry.get("tenant", "")), at)
            tokens.append(StaticToken(entry["sha256"], subject, tenant, _roles(entry.get("roles"), at)))
        subjects = {}
        for subject, entry in (raw.get("subjects") or {}).items():
            at = f"{where}: subjects[{subject!r}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{at}: needs tenant and roles")
            subjects[str(subject)] = (check_tenant(str(entry.get("tenant", "")), at), _roles(entry.get("roles"), at))
        return cls(tuple(tokens), subjects)


class _ReloadingFile:
    """A file parsed again whenever its modification time changes (a rotated
    Secret). A rotation that breaks the file keeps the last good version, with
    a warning, rather than refusing every caller."""

    def __init__(self, path: Path, parse: Any) -> None:
        self._path = path
        self._parse = parse
        self._mtime = -1
        self.value: Any = None
        self.refresh(first=True)

    def refresh(self, first: bool = False) -> Any:
        try:
            mtime = self._path.stat().st_mtime_ns
            if mtime != self._mtime:
                self.value = self._parse(self._path.read_text(encoding="utf-8"), str(self._path))
                self._mtime = mtime
        except (OSError, ValueError, yaml.YAMLError) as exc:
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
            if first:
                raise ValueError(f"cannot read {self._path}: {message}") from None
            log.warning("auth file not reloaded; keeping the previous version", path=str(self._path), reason=message)
        return self.value


def _parse_jwks(text: str, where: str) -> Any:
    import jwt

    try:
        return jwt.PyJWKSet.from_dict(json.loads(text))
    except (json.JSONDecodeError, jwt.PyJWTError) as exc:
        raise ValueError(f"{where}: not a usable JWKS ({exc})") from None


class Authenticator:
    """Turns a call's metadata into its Principal, or refuses it."""

    def __init__(self, settings: AuthSettings) -> None:
        settings.check()
        self.settings = settings
        self._file = _ReloadingFile(settings.auth_file, AuthFile.parse) if settings.auth_file is not None else None
        self._jwks_file = _ReloadingFile(settings.jwks_file, _parse_jwks) if settings.jwks_file is not None else None
        self._jwks_client: Any = None
        self._jwks_refetched_at = -JWKS_REFETCH_SECONDS  # monotonic time of the last fetch for an unknown key id
        if settings.jwks_url:
            import jwt

            # Caches the key set, and fetches it again for a key id it has not seen (key rotation).
            self._jwks_client = jwt.PyJWKClient(settings.jwks_url, cache_keys=True, lifespan=300, timeout=10)

    def is_open(self, method: str) -> bool:
        return method.startswith(self.settings.open_methods)

    async def authenticate(self, metadata: Mapping[str, str]) -> Principal:
        """The principal of a call with these (lowercase-keyed) metadata; raises
        Unauthenticated or PermissionDenied."""
        if self.settings.insecure:
            return ANONYMOUS
        header = metadata.get("authorization")
        if not header:
            raise errors.Unauthenticated("no bearer token: send the metadata `authorization: Bearer <token>`")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise errors.Unauthenticated("the authorization metadata is not a bearer token (`Bearer <token>`)")
        principal = self._static(token)
        if principal is None and self.settings.verifies_jwts and token.count(".") == 2:
            principal = await self._jwt(token)
        if principal is None:
            raise errors.Unauthenticated("token not recognised")
        return self._on_behalf(principal, metadata.get(ON_BEHALF_OF_HEADER))

    def _auth_file(self) -> AuthFile:
        return self._file.refresh() if self._file is not None else AuthFile()

    def _static(self, token: str) -> Principal | None:
        digest = token_sha256(token)
        found = None
        for entry in (*self.settings.static_tokens, *self._auth_file().tokens):
            # Constant-time comparison, and no early exit: timing says nothing about which entry matched.
            if hmac.compare_digest(entry.sha256, digest) and found is None:
                found = entry
        return Principal(found.tenant, found.subject, found.roles) if found else None

    async def _jwt(self, token: str) -> Principal:
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise errors.Unauthenticated("token not recognised") from None
        algorithm = header.get("alg")
        if algorithm not in ASYMMETRIC_ALGORITHMS:
            raise errors.Unauthenticated("token algorithm not accepted (public-key signatures only)")
        key = await self._signing_key(header.get("kid"))
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.settings.jwt_audience,
                issuer=self.settings.jwt_issuer,
                options={"require": ["exp", "iss", "aud", "sub"]},
                leeway=30,  # clocks of issuer and server differ a little
            )
        except jwt.ExpiredSignatureError:
            raise errors.Unauthenticated("token expired") from None
        except jwt.InvalidAudienceError:
            raise errors.Unauthenticated("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise errors.Unauthenticated("token issuer not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise errors.Unauthenticated(f"token lacks the {exc.claim!r} claim") from None
        except jwt.PyJWTError:
            raise errors.Unauthenticated("token signature does not verify") from None
        return self._principal_of_claims(claims)

    async def _signing_key(self, kid: str | None) -> Any:
        import jwt

        if self._jwks_client is not None:
            try:  # a fetch when the key set is not cached: off the event loop
                keys = await asyncio.to_thread(self._jwks_client.get_signing_keys)
                if kid is None:
                    return keys[0].key
                known = [key for key in keys if key.key_id == kid]
                if not known:
                    # A key id the cached set lacks: the issuer may have rotated, so fetch again, but at most
                    # once per JWKS_REFETCH_SECONDS: made-up key ids must not turn every call into a fetch.
                    now = time.monotonic()
                    if now - self._jwks_refetched_at < JWKS_REFETCH_SECONDS:
                        raise errors.Unauthenticated("token signed with a key this server does not know")
                    self._jwks_refetched_at = now
                    keys = await asyncio.to_thread(self._jwks_client.get_signing_keys, True)
                    known = [key for key in keys if key.key_id == kid]
                    if not known:
                        raise errors.Unauthenticated("token signed with a key this server does not know")
                return known[0].key
            except jwt.PyJWKClientConnectionError:
                raise errors.Unavailable("cannot reach the key set (JWKS URL) to verify the token; retry later") from None
            except jwt.PyJWKClientError:
                raise errors.Unauthenticated("token signed with a key this server does not know") from None
        assert self._jwks_file is not None
        keys = [key for key in self._jwks_file.refresh().keys if kid is None or key.key_id == kid]
        if len(keys) != 1:
            raise errors.Unauthenticated("token signed with a key this server does not know")
        return keys[0].key

    def _principal_of_claims(self, claims: Mapping[str, Any]) -> Principal:
        subject = str(claims["sub"])
        tenant = claims.get(self.settings.jwt_tenant_claim)
        roles = claims.get(self.settings.jwt_roles_claim)
        if tenant is None or roles is None:
            # Tokens without our claims (Kubernetes ServiceAccounts): the auth file maps their subject.
            mapped = self._auth_file().subjects.get(subject)
            if mapped is None:
                raise errors.PermissionDenied(f"token subject {subject!r} has no tenant and roles (claims or auth file `subjects`)")
            return Principal(mapped[0], subject, mapped[1])
        try:
            granted = _roles(roles, "token")
            if SERVICE in granted:
                # The service role acts for any tenant: only the operator's auth file grants it, never an issuer's claims.
                raise ValueError(f"token: the {SERVICE} role is granted only by the auth file")
            return Principal(check_tenant(str(tenant), "token"), subject, granted)
        except ValueError as exc:
            raise errors.PermissionDenied(str(exc)) from None

    @staticmethod
    def _on_behalf(principal: Principal, tenant: str | None) -> Principal:
        """A service names the tenant it acts for; anyone else's header is ignored."""
        if not tenant or SERVICE not in principal.roles:
            return principal
        try:
            return Principal(check_tenant(tenant, ON_BEHALF_OF_HEADER), principal.subject, principal.roles)
        except ValueError as exc:
            raise errors.PermissionDenied(str(exc)) from None


def required_role(method: str) -> str:
    """The role a method needs, by its name (/package.Service/Name)."""
    name = method.rsplit("/", 1)[-1]
    if name.startswith(("Get", "List", "Watch", "Stream", "Download")):
        return VIEWER
    if name.startswith("Share"):
        return ADMIN
    return SUBMITTER


def audited(role: str) -> bool:
    """Calls that may change something (submitter or more) get an audit line."""
    return role != VIEWER


# The object an audited call acts on; a handler names it with audit_object().
_audit_object: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("autodidact_audit_object", default=None)


def audit_object(value: str) -> None:
    """Names the object of the call being served in its audit line (e.g. the
    dataset id an upload created). Outside an audited call it does nothing."""
    holder = _audit_object.get()
    if holder is not None:
        holder[0] = value


def object_of_request(request: Any) -> str:
    """The job id, dataset id, namespace or collection a request names, if any."""
    descriptor = getattr(request, "DESCRIPTOR", None)
    if descriptor is None:
        return ""
    for name in OBJECT_FIELDS:
        if name in descriptor.fields_by_name:
            value = getattr(request, name)
            if isinstance(value, str) and value:
                return value
    return ""


class AuditScope:
    """Binds, for one call, the place audit_object() writes the object's name to."""

    def __init__(self) -> None:
        self.holder = [""]
        self._token: contextvars.Token[list[str] | None] | None = None

    @property
    def named(self) -> str:
        """The object's name, or "" when neither the request nor the handler named one."""
        return self.holder[0]

    def __enter__(self) -> AuditScope:
        self._token = _audit_object.set(self.holder)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _audit_object.reset(self._token)


def audit_request(request: Any) -> None:
    """Names the object of the call from its (unary) request, unless a handler already did."""
    holder = _audit_object.get()
    if holder is not None and not holder[0]:
        holder[0] = object_of_request(request)


def write_audit_line(principal: Principal | None, method: str, object_name: str, code: str) -> None:
    log.info(
        "audit",
        tenant=principal.tenant if principal else "",
        principal=principal.subject if principal else "",
        method=method,
        object=object_name,
        code=code,
    )
