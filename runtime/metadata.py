"""The ONNX file's patchgen metadata (`metadata_props`): the keys, and ModelSpec <-> strings.

Every value is a string. These keys are all a runtime needs to sample; the
exporter adds descriptive ones (data set, attribution, training steps) beside them.
"""
from __future__ import annotations

from .errors import PatchgenError
from .schedule import Schedule
from .spec import GCC_SOURCES, PREDICTIONS, ModelSpec

FORMAT_VERSION = "2"  # 2: patchgen.halo, and x is the (P+2M)^2 window
READABLE_VERSIONS = ("1", "2")  # version 1 files have no halo: they read as halo 0, unchanged
PREFIX = "patchgen."


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
    """Parse and check the keys; a foreign file, a missing key or a newer format is one clear error."""
    if not any(k.startswith(PREFIX) for k in meta):
        raise PatchgenError(f"{source} is not a patchgen model (no patchgen metadata); export one with patchgen-export")
    version = meta.get("patchgen.format_version")
    if version not in READABLE_VERSIONS:
        raise PatchgenError(f"{source} has patchgen format version {version!r}; this runtime reads versions "
                            f"{', '.join(READABLE_VERSIONS)}: re-export it with a matching patchgen")

    def get(key: str) -> str:
        try:
            return meta[PREFIX + key]
        except KeyError:
            raise PatchgenError(f"{source} lacks the metadata key {PREFIX + key}; re-export it") from None

    def flag(key: str) -> bool:
        value = get(key)
        if value not in ("true", "false"):
            raise PatchgenError(f"{source}: metadata {PREFIX + key} must be true or false, got {value!r}")
        return value == "true"

    try:
        spec = ModelSpec(
            image_size=int(get("image_size")), channels=int(get("channels")), grid=int(get("grid")),
            use_position=flag("position_conditioning"), use_gcc=flag("gcc"), gcc_source=get("gcc_source"),
            prediction=get("prediction"), halo=int(get("halo")) if version != "1" else 0,
            schedule=Schedule(kind=get("schedule.kind"), num_timesteps=int(get("schedule.num_timesteps")),
                              cosine_s=float(get("schedule.cosine_s")), max_beta=float(get("schedule.max_beta")),
                              beta_start=float(get("schedule.beta_start")), beta_end=float(get("schedule.beta_end"))))
    except ValueError as e:
        raise PatchgenError(f"{source} has invalid patchgen metadata: {e}") from None
    if spec.grid < 1 or spec.image_size % spec.grid or int(get("patch_size")) != spec.patch_size:
        raise PatchgenError(f"{source}: metadata grid {spec.grid}, image size {spec.image_size} and patch size "
                            f"{get('patch_size')} do not agree")
    if spec.halo < 0:
        raise PatchgenError(f"{source}: metadata halo must be >= 0, got {spec.halo}")
    if spec.gcc_source not in GCC_SOURCES or spec.prediction not in PREDICTIONS:
        raise PatchgenError(f"{source}: unsupported gcc_source {spec.gcc_source!r} or prediction {spec.prediction!r}")
    return spec
