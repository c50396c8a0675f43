"""Device profiles: data in data/profiles.json, validated by schemas/profiles.schema.json."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .errors import UsageError
from .schemas import validate

PROFILES_PATH = Path(__file__).resolve().parent / "data" / "profiles.json"
MLX_TARGETS = ("iphone", "ipad", "mac")
TARGETS = ("packed", *MLX_TARGETS, "cuda")


@lru_cache(maxsize=1)
def all_profiles() -> dict[str, dict]:
    """Every profile, validated."""
    data = json.loads(PROFILES_PATH.read_text())
    validate(data, "profiles", str(PROFILES_PATH))
    return data["profiles"]


def profile_for(target: str) -> dict:
    """The profile of a target (each target has one profile of the same name)."""
    profiles = all_profiles()
    if target not in profiles:
        raise UsageError(f"--target {target}: unknown (choose from {', '.join(TARGETS)})")
    return {"name": target, **profiles[target]}
