"""JSON Schemas of schemas/ and validation with a one-line error."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema

from .errors import InputError

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


@cache
def load_schema(name: str) -> dict:
    """schemas/<name>.schema.json."""
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())


def validate(instance: object, schema_name: str, label: str) -> None:
    """Raise InputError naming `label` and the first violation's location."""
    validator = jsonschema.Draft202012Validator(load_schema(schema_name))
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is not None:
        location = "/".join(str(part) for part in error.absolute_path) or "(root)"
        raise InputError(f"{label}: {location}: {error.message}")
