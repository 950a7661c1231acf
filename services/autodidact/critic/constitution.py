"""Constitutions: versioned files of principles and few-shot examples.

A constitution is a YAML file (the JSON mapping of critic.proto's
Constitution). The critic loads its built-in ones and any in
--constitutions-dir at start; a file that breaks a rule stops the start with
a message naming the file, the field and the rule, so a bad constitution is
never half-used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from google.protobuf import json_format

from autodidact.errors import InvalidArgument, NotFound
from autodidact.v1 import critic_pb2
from autodidact.validation import check_count, check_length

BUILT_IN = Path(__file__).parent / "constitutions"
DEFAULT_NAME = "autodidact-default"
NAME_PATTERN = re.compile(r"^[a-z0-9_-]{1,64}$")


class ConstitutionError(ValueError):
    """A constitution file breaks a rule."""


def validate(constitution: critic_pb2.Constitution) -> None:
    """Raises InvalidArgument naming the field and the rule."""
    if not NAME_PATTERN.match(constitution.name):
        raise InvalidArgument("name", f"must be 1 to 64 characters of a-z 0-9 _ -, got {constitution.name!r}")
    check_length("version", constitution.version, 1, 64)
    check_count("principles", constitution.principles, 1, 256)
    names: set[str] = set()
    for i, principle in enumerate(constitution.principles):
        if not NAME_PATTERN.match(principle.name):
            raise InvalidArgument(f"principles[{i}].name", f"must be 1 to 64 characters of a-z 0-9 _ -, got {principle.name!r}")
        if principle.name in names:
            raise InvalidArgument(f"principles[{i}].name", f"{principle.name!r} appears twice")
        names.add(principle.name)
        check_length(f"principles[{i}].critique_request", principle.critique_request.strip(), 1, 4096)
        check_length(f"principles[{i}].revision_request", principle.revision_request.strip(), 1, 4096)
        check_length(f"principles[{i}].preference_question", principle.preference_question, 0, 4096)
    if not constitution.preference_question.strip() and not all(p.preference_question.strip() for p in constitution.principles):
        raise InvalidArgument("preference_question", "is required unless every principle has its own")
    check_count("examples", constitution.examples, 0, 16)
    for i, example in enumerate(constitution.examples):
        for field in ("prompt", "response", "critique", "revision"):
            check_length(f"examples[{i}].{field}", getattr(example, field).strip(), 1, 4096)
        if example.principle not in names:
            raise InvalidArgument(f"examples[{i}].principle", f"{example.principle!r} is not a principle of this constitution")


def load_file(path: Path) -> critic_pb2.Constitution:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ConstitutionError(f"{path}: expected a mapping of Constitution fields")
        constitution = json_format.ParseDict(raw, critic_pb2.Constitution())
        validate(constitution)
    except (yaml.YAMLError, json_format.ParseError) as exc:
        raise ConstitutionError(f"{path}: {exc}") from None
    except InvalidArgument as exc:
        raise ConstitutionError(f"{path}: {exc}") from None
    return constitution


@dataclass
class Constitutions:
    """Every known constitution by (name, version)."""

    by_ref: dict[tuple[str, str], critic_pb2.Constitution]

    @classmethod
    def load(cls, extra_dir: Path | None = None) -> Constitutions:
        files = sorted(BUILT_IN.glob("*.yaml")) + (sorted(extra_dir.glob("*.yaml")) if extra_dir else [])
        by_ref: dict[tuple[str, str], critic_pb2.Constitution] = {}
        for path in files:
            constitution = load_file(path)
            key = (constitution.name, constitution.version)
            if key in by_ref:
                raise ConstitutionError(f"{path}: {constitution.name} version {constitution.version} is defined twice")
            by_ref[key] = constitution
        return cls(by_ref)

    def refs(self) -> list[tuple[str, str]]:
        """Newest version of each name first (versions compare as numbers where they are numbers)."""
        return sorted(self.by_ref, key=lambda k: (k[0], [-int(p) if p.isdigit() else 0 for p in re.split(r"\D+", k[1]) if p], k[1]))

    def resolve(self, name: str, version: str, field: str = "constitution") -> critic_pb2.Constitution:
        name = name or DEFAULT_NAME
        found = self.by_ref.get((name, version)) if version else next((self.by_ref[k] for k in self.refs() if k[0] == name), None)
        if found is None:
            known = ", ".join(f"{n}@{v}" for n, v in self.refs())
            raise NotFound(f"{field}: no constitution {name}{'@' + version if version else ''}; known: {known}")
        return found
