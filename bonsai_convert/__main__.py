"""`python -m bonsai_convert` runs the CLI."""

from .cli import main

main()
