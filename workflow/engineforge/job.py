"""The one typed object a stage body receives."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from engineforge.sidecar import canonical_json


@dataclass(frozen=True)
class Job:
    """One Snakemake job as a stage sees it.

    ``inputs``/``outputs`` are the rule's named files exactly as declared (outputs point
    into a staging directory while the body runs; the runner publishes them). ``settings``
    is the stage's typed config slice — the same object that is the rule's ``params`` and
    goes into the fingerprint.
    """

    stage: str
    model: str | None
    wildcards: dict[str, str]
    inputs: dict[str, Path]
    outputs: dict[str, Path]
    settings: Any
    tools: dict[str, str]
    device: str | None
    log: Path
    artifacts: str = "artifacts"
    # where the declared inputs lie in the artifacts layout: ``artifacts`` itself, or
    # Snakemake's local copies under a storage provider (--default-storage-provider s3)
    inputs_root: str | None = None
    extra_inputs: list[Path] = field(default_factory=list)  # unnamed inputs (reports)
    # seconds per stage (the model's time_limits; not part of the fingerprint)
    limits: dict[str, float] = field(default_factory=dict)

    def __getattr__(self, name):  # job.precision, job.backend, job.profile
        wildcards = self.__dict__.get("wildcards") or {}
        if name in wildcards:
            return wildcards[name]
        raise AttributeError(name)

    @property
    def inputs_layout(self):
        """The layout to find sibling inputs in (the track, summary and report stages)."""
        from engineforge.layout import Layout

        return Layout(self.inputs_root or self.artifacts)

    def with_outputs(self, outputs: dict[str, Path]) -> Job:
        return replace(self, outputs=outputs)


class Canonical(str):
    """A params value: the canonical JSON of a typed settings slice (or a dict), with the
    object itself as ``.value``. A ``str``, because Snakemake's params trigger compares only
    builtin values (other objects are silently left out of the comparison)."""

    def __new__(cls, value):
        dumped = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        text = super().__new__(cls, canonical_json(dumped))
        text.value = value
        text.dumped = dumped
        return text

    def dump(self):
        return self.dumped
