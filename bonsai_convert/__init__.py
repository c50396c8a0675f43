"""bonsai-convert: pack trained binary/ternary FLUX.2 Klein models into device bundles, verify, publish."""

__version__ = "0.1.0"
