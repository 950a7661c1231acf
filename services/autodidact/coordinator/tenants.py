"""What the operator allows each tenant: quotas, and the input roots its jobs may read.

One YAML file (`--tenants-file`), every part optional:

    defaults:                      # every tenant, unless it says otherwise
      quotas:
        running_jobs: 4            # jobs PENDING or RUNNING at once
        stored_bytes: 10GiB        # uploaded datasets and job input snapshots
        items_per_job: 100000      # a job's planned items (prompts, questions, ...)
        upload_bytes: 1GiB         # one uploaded dataset, one input
      input_roots: []              # server paths / object-store prefixes jobs may read
    tenants:
      team-a:
        quotas: {running_jobs: 16}
        input_roots: ["s3://team-a-data/", "/mnt/shared/team-a"]

Input roots the operator gives with `--input-root` apply to every tenant, on
top of the file's. None by default: a job then reads only what its caller
sent (uploaded datasets, inline inputs).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from autodidact.errors import ResourceExhausted

_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*\Z", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: object, where: str) -> int:
    """Bytes from 1048576, "1MiB", "1.5 GB"; ValueError naming `where` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a size such as 1GiB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if match is None:
            raise ValueError(f"{where}: expected a size such as 10GiB or 1048576, got {value!r}")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "b").lower()])
    if size < 0:
        raise ValueError(f"{where}: must not be negative, got {value!r}")
    return size


@dataclass(frozen=True)
class Quotas:
    """A tenant's bounds; each one tripped is RESOURCE_EXHAUSTED naming it and its value."""

    running_jobs: int = 4
    stored_bytes: int = 10 * 2**30
    items_per_job: int = 100_000
    upload_bytes: int = 2**30

    def exceeded(self, tenant: str, quota: str, detail: str) -> ResourceExhausted:
        """The error for `quota` (a field name of this class) tripped by `tenant`."""
        value = getattr(self, quota)
        shown = f"{value:,} bytes" if quota.endswith("_bytes") else f"{value:,}"
        return ResourceExhausted(f"quota {quota} of tenant {tenant!r} is {shown}: {detail}")


@dataclass(frozen=True)
class TenantPolicy:
    quotas: Quotas = field(default_factory=Quotas)
    # Local folders (absolute) and object-store prefixes ("s3://bucket/prefix/") the tenant's jobs may read.
    input_roots: tuple[str, ...] = ()


@dataclass(frozen=True)
class Tenants:
    """Every tenant's policy: the defaults, with each named tenant's overrides."""

    defaults: TenantPolicy = field(default_factory=TenantPolicy)
    overrides: Mapping[str, TenantPolicy] = field(default_factory=dict)
    # Roots every tenant may read (--input-root).
    shared_roots: tuple[str, ...] = ()

    def policy(self, tenant: str) -> TenantPolicy:
        own = self.overrides.get(tenant, self.defaults)
        return replace(own, input_roots=(*self.shared_roots, *own.input_roots))

    @classmethod
    def load(cls, path: Path | None, shared_roots: tuple[str, ...] = ()) -> Tenants:
        """The tenants file at `path` (None: the defaults); ValueError naming what is wrong."""
        for root in shared_roots:
            _check_root(root, "--input-root")
        if path is None:
            return cls(shared_roots=shared_roots)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"tenants file {path}: {exc}") from None
        if not isinstance(raw, dict) or set(raw) - {"defaults", "tenants"}:
            raise ValueError(f"tenants file {path}: expected a mapping with 'defaults' and 'tenants'")
        defaults = _policy(raw.get("defaults") or {}, TenantPolicy(), f"{path}: defaults")
        tenants = raw.get("tenants") or {}
        if not isinstance(tenants, dict):
            raise ValueError(f"tenants file {path}: 'tenants' must map tenant names to their settings")
        overrides = {str(name): _policy(value or {}, defaults, f"{path}: tenants.{name}") for name, value in tenants.items()}
        return cls(defaults, overrides, shared_roots)


def _policy(raw: Any, base: TenantPolicy, where: str) -> TenantPolicy:
    if not isinstance(raw, dict) or set(raw) - {"quotas", "input_roots"}:
        raise ValueError(f"{where}: expected 'quotas' and 'input_roots'")
    quotas = raw.get("quotas") or {}
    known = {f.name for f in fields(Quotas)}
    if not isinstance(quotas, dict) or set(quotas) - known:
        raise ValueError(f"{where}.quotas: the quotas are {', '.join(sorted(known))}")
    values = {
        name: parse_size(value, f"{where}.quotas.{name}") if name.endswith("_bytes") else _count(value, f"{where}.quotas.{name}")
        for name, value in quotas.items()
    }
    roots = raw.get("input_roots", list(base.input_roots))
    if not isinstance(roots, list) or not all(isinstance(root, str) and root for root in roots):
        raise ValueError(f"{where}.input_roots: expected a list of folders and object-store prefixes")
    for root in roots:
        _check_root(root, f"{where}.input_roots")
    return TenantPolicy(replace(base.quotas, **values), tuple(roots))


def _check_root(root: str, where: str) -> None:
    """A root is an absolute folder or an object-store prefix with its bucket ("s3://bucket/...")."""
    scheme, separator, rest = root.partition("://")
    if separator:
        if scheme not in ("s3", "gs", "az") or not rest.split("/", 1)[0]:
            raise ValueError(f"{where}: {root!r} is not an s3://, gs:// or az:// prefix with its bucket (lowercase scheme)")
    elif not Path(root).is_absolute():
        raise ValueError(f"{where}: {root!r} is not an absolute folder")


def _count(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: expected a whole number, got {value!r}")
    return value
