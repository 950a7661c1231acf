"""The operator's tenants file: quotas and input roots per tenant, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from autodidact.coordinator.tenants import Quotas, Tenants, parse_size


@pytest.mark.parametrize(("value", "size"), [(1048576, 2**20), ("1MiB", 2**20), ("1.5 GB", 1_500_000_000), ("10GiB", 10 * 2**30), ("7", 7)])
def test_sizes_read_as_people_write_them(value, size):
    assert parse_size(value, "q") == size


@pytest.mark.parametrize("value", ["ten", "-1", True, "1 XB", ""])
def test_sizes_that_are_not_sizes_are_refused_naming_where(value):
    with pytest.raises(ValueError, match=r"^q: "):
        parse_size(value, "q")


def test_a_tenant_inherits_the_defaults_and_overrides_its_own(tmp_path: Path):
    path = tmp_path / "tenants.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "defaults": {"quotas": {"running_jobs": 2, "stored_bytes": "1GiB"}},
                "tenants": {"team-a": {"quotas": {"running_jobs": 8}, "input_roots": ["s3://team-a-data/in/", "/mnt/team-a"]}},
            }
        )
    )
    tenants = Tenants.load(path, shared_roots=("/srv/shared",))
    a, other = tenants.policy("team-a"), tenants.policy("team-b")
    assert a.quotas == Quotas(running_jobs=8, stored_bytes=2**30) and other.quotas == Quotas(running_jobs=2, stored_bytes=2**30)
    assert a.input_roots == ("/srv/shared", "s3://team-a-data/in/", "/mnt/team-a") and other.input_roots == ("/srv/shared",)


def test_no_file_means_the_defaults_and_no_roots():
    policy = Tenants.load(None).policy("anyone")
    assert policy.quotas == Quotas() and policy.input_roots == ()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"tenant": {}}, "expected a mapping with 'defaults' and 'tenants'"),
        ({"defaults": {"quotas": {"jobs": 1}}}, "defaults.quotas: the quotas are"),
        ({"defaults": {"quotas": {"running_jobs": -1}}}, "expected a whole number"),
        ({"tenants": {"a": {"input_roots": ["relative/folder"]}}}, "is not an absolute folder"),
        ({"tenants": {"a": {"input_roots": ["S3://bucket/x"]}}}, "lowercase scheme"),
        ({"tenants": {"a": {"input_roots": ["s3:///no-bucket"]}}}, "with its bucket"),
    ],
)
def test_a_wrong_tenants_file_is_refused_naming_what(tmp_path: Path, content, message):
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match=message):
        Tenants.load(path)


def test_a_relative_input_root_flag_is_refused():
    with pytest.raises(ValueError, match="--input-root: 'data' is not an absolute folder"):
        Tenants.load(None, shared_roots=("data",))


def test_a_tripped_quota_names_itself_its_value_and_the_tenant():
    error = Quotas(stored_bytes=4000).exceeded("team-q", "stored_bytes", "3,990 bytes are stored")
    assert str(error) == "quota stored_bytes of tenant 'team-q' is 4,000 bytes: 3,990 bytes are stored"
