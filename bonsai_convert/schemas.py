"""The JSON Schemas shipped in the package (bonsai_convert/data/schemas/) and validation with a one-line error."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

import jsonschema

from .errors import InputError

SCHEMA_PACKAGE_DIR = "data/schemas"  # inside the bonsai_convert package; read with importlib.resources


def package_data(relative: str) -> str:
    """The text of a data file shipped inside bonsai_convert (works from a wheel, an sdist or a checkout)."""
    return resources.files("bonsai_convert").joinpath(relative).read_text(encoding="utf-8")


@cache
def load_schema(name: str) -> dict:
    """data/schemas/<name>.schema.json."""
    return json.loads(package_data(f"{SCHEMA_PACKAGE_DIR}/{name}.schema.json"))


def validate(instance: object, schema_name: str, label: str) -> None:
    """Raise InputError naming `label` and the first violation's location."""
    validator = jsonschema.Draft202012Validator(load_schema(schema_name))
    error = jsonschema.exceptions.best_match(validator.iter_errors(instance))
    if error is not None:
        location = "/".join(str(part) for part in error.absolute_path) or "(root)"
        raise InputError(f"{label}: {location}: {error.message}")
