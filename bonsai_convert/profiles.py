"""Device profiles: data in data/profiles.json, validated by data/schemas/profiles.schema.json (in the package)."""

from __future__ import annotations

import json
from functools import lru_cache

from .errors import UsageError
from .schemas import package_data, validate
from .vocabulary import TARGETS

PROFILES_DATA = "data/profiles.json"  # inside the bonsai_convert package


@lru_cache(maxsize=1)
def all_profiles() -> dict[str, dict]:
    """Every profile, validated."""
    data = json.loads(package_data(PROFILES_DATA))
    validate(data, "profiles", f"bonsai_convert/{PROFILES_DATA}")
    return data["profiles"]


def profile_for(target: str) -> dict:
    """The profile of a target (each target has one profile of the same name)."""
    profiles = all_profiles()
    if target not in profiles:
        raise UsageError(f"--target {target}: unknown (choose from {', '.join(TARGETS)})")
    return {"name": target, **profiles[target]}
