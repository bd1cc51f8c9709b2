"""The ONNX file's patchgen metadata (`metadata_props`): the keys, and ModelSpec <-> strings.

Every value is a string. These keys are all a runtime needs to sample; the
exporter adds descriptive ones (data set, attribution, training steps) beside them.
"""
from __future__ import annotations

import math
import re
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

from .errors import PatchgenError
from .checks import Problems, shown
from .schedule import SCHEDULE_KINDS, Schedule, schedule_problems
from .spec import ModelSpec, spec_problems

FORMAT_VERSION = "2"  # 2: patchgen.halo, and x is the (P+2M)^2 window
READABLE_VERSIONS = ("1", "2")  # version 1 files have no halo: they read as halo 0, unchanged
PREFIX = "patchgen."
# The key of each ModelSpec / Schedule field, so that a problem with a field is reported by its key.
SPEC_KEYS = {"image_size": "patchgen.image_size", "channels": "patchgen.channels", "grid": "patchgen.grid",
             "halo": "patchgen.halo", "use_position": "patchgen.position_conditioning", "use_gcc": "patchgen.gcc",
             "gcc_source": "patchgen.gcc_source", "prediction": "patchgen.prediction"}
SCHEDULE_KEYS = {name: f"patchgen.schedule.{name}"
                 for name in ("kind", "num_timesteps", "cosine_s", "max_beta", "beta_start", "beta_end")}
INTEGER = re.compile(r"-?[0-9]+")  # what str(int) writes: no "1e3", "1_000", " 12" or "12.0"


def patchgen_version() -> str:
    """The installed patchgen's version, as a file's metadata and the commands' reports record it."""
    try:
        return version("patchgen")
    except PackageNotFoundError:
        return "unknown"


def _bool(value: bool) -> str:
    return "true" if value else "false"


def spec_to_metadata(spec: ModelSpec) -> dict[str, str]:
    s = spec.schedule
    return {
        "patchgen.format_version": FORMAT_VERSION,
        "patchgen.image_size": str(spec.image_size),
        "patchgen.channels": str(spec.channels),
        "patchgen.grid": str(spec.grid),
        "patchgen.patch_size": str(spec.patch_size),
        "patchgen.halo": str(spec.halo),
        "patchgen.position_conditioning": _bool(spec.use_position),
        "patchgen.gcc": _bool(spec.use_gcc),
        "patchgen.gcc_source": spec.gcc_source,
        "patchgen.prediction": spec.prediction,
        "patchgen.output": "eps",
        "patchgen.schedule.kind": s.kind,
        "patchgen.schedule.num_timesteps": str(s.num_timesteps),
        "patchgen.schedule.cosine_s": repr(s.cosine_s),
        "patchgen.schedule.max_beta": repr(s.max_beta),
        "patchgen.schedule.beta_start": repr(s.beta_start),
        "patchgen.schedule.beta_end": repr(s.beta_end),
    }


def spec_from_metadata(meta: dict[str, str], source: str = "model") -> ModelSpec:
    """Parse and check the keys; a foreign file, a missing key, a newer format or any value out of range
    (the file is untrusted: its sizes decide what the sampler allocates) is one PatchgenError line naming
    the key."""
    version = _readable_version(meta, source)
    values = _Values(meta, source)
    # Parse: every value a string of the right form.
    k = SPEC_KEYS
    fields = dict(image_size=values.integer(k["image_size"]), channels=values.integer(k["channels"]),
                  grid=values.integer(k["grid"]), halo=values.integer(k["halo"]) if version != "1" else 0,
                  use_position=values.flag(k["use_position"]), use_gcc=values.flag(k["use_gcc"]),
                  gcc_source=values.get(k["gcc_source"]), prediction=values.get(k["prediction"]))
    patch_size = values.integer("patchgen.patch_size")
    k = SCHEDULE_KEYS
    schedule = dict(kind=values.get(k["kind"]), num_timesteps=values.integer(k["num_timesteps"]),
                    cosine_s=values.number(k["cosine_s"]), max_beta=values.number(k["max_beta"]),
                    beta_start=values.number(k["beta_start"]), beta_end=values.number(k["beta_end"]))
    problems = values.problems or _range_problems(fields, schedule, patch_size)
    if problems:
        raise PatchgenError(f"{source} has invalid patchgen metadata: {problems.message()}; re-export it with "
                            f"patchgen-export")
    try:  # what is left is the schedule's own check of its betas
        return ModelSpec(**fields, schedule=Schedule(**schedule))
    except ValueError as e:
        raise PatchgenError(f"{source} has invalid patchgen metadata: patchgen.schedule.*: {e}") from None


def _readable_version(meta: dict[str, str], source: str) -> str:
    """The file's patchgen format version, refused unless it is a patchgen model this runtime reads."""
    if not any(k.startswith(PREFIX) for k in meta):
        raise PatchgenError(f"{source} is not a patchgen model (no patchgen metadata); export one with patchgen-export")
    version = meta.get("patchgen.format_version")
    if version not in READABLE_VERSIONS:
        raise PatchgenError(f"{source} has patchgen format version {shown(version)}; this runtime reads versions "
                            f"{', '.join(READABLE_VERSIONS)}: re-export it with a matching patchgen")
    return version


def _range_problems(fields: dict, schedule: dict, patch_size: int) -> Problems:
    """The ranges ModelSpec and Schedule check, each problem named by its metadata key, and the patch size the
    file states against the one its image size and grid give."""
    problems = Problems()
    problems.extend((SPEC_KEYS[name], text) for name, text in spec_problems(**fields))
    problems.choice(SCHEDULE_KEYS["kind"], schedule["kind"], SCHEDULE_KINDS)
    problems.extend((SCHEDULE_KEYS[name], text) for name, text in schedule_problems(
        *(schedule[name] for name in ("num_timesteps", "cosine_s", "max_beta", "beta_start", "beta_end"))))
    if not problems and patch_size != fields["image_size"] // fields["grid"]:
        problems.add("patchgen.patch_size", f"{patch_size} does not agree with image size {fields['image_size']} "
                                            f"and grid {fields['grid']}")
    return problems


class _Values:
    """The metadata's values read as types; a value of the wrong form is a problem named by its key, and a
    missing key a PatchgenError at once."""

    def __init__(self, meta: dict[str, str], source: str):
        self.meta, self.source, self.problems = meta, source, Problems()

    def get(self, key: str) -> str:
        try:
            return self.meta[key]
        except KeyError:
            raise PatchgenError(f"{self.source} lacks the metadata key {key}; re-export it") from None

    def integer(self, key: str) -> Optional[int]:
        value = self.get(key)
        if INTEGER.fullmatch(value):
            try:
                return int(value)
            except ValueError:  # more digits than Python converts
                pass
        self.problems.add(key, f"must be an integer, got {shown(value)}")
        return None

    def number(self, key: str) -> Optional[float]:
        value = self.get(key)
        try:
            x = float(value)
        except ValueError:
            x = math.nan
        if math.isfinite(x):
            return x
        self.problems.add(key, f"must be a finite number, got {shown(value)}")
        return None

    def flag(self, key: str) -> Optional[bool]:
        value = self.get(key)
        if value in ("true", "false"):
            return value == "true"
        self.problems.add(key, f"must be true or false, got {shown(value)}")
        return None
