"""Longer fuzzing of the readers and codecs: `python scripts/fuzz.py --seconds 600 [--target safetensors ...]`.

Runs the properties of tests/test_fuzz.py (TARGETS) with fresh randomness, round-robin in batches, until the time
is up. Each example runs under the same time limit and memory ceiling as in CI. Exit 0 if nothing failed; on a
failure, hypothesis prints the shrunk input and this exits 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

from hypothesis import HealthCheck, given, settings

TESTS = Path(__file__).resolve().parent.parent / "tests"


def load_fuzz_module() -> ModuleType:
    """tests/test_fuzz.py as a module (it is not a package)."""
    spec = importlib.util.spec_from_file_location("bonsai_fuzz_targets", TESTS / "test_fuzz.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {TESTS / 'test_fuzz.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="total time budget (default 60)")
    parser.add_argument("--target", action="append", help="fuzz only these targets (repeatable)")
    parser.add_argument("--batch", type=int, default=200, help="examples per target per round (default 200)")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    args = parser.parse_args(argv)

    fuzz = load_fuzz_module()
    targets = fuzz.TARGETS
    if args.list:
        print("\n".join(sorted(targets)))
        return 0
    chosen = args.target or sorted(targets)
    unknown = sorted(set(chosen) - set(targets))
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(sorted(targets))}")
    batch = settings(
        max_examples=args.batch,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    runs = {name: batch(given(targets[name][0])(targets[name][1])) for name in chosen}
    examples = dict.fromkeys(chosen, 0)
    end = time.monotonic() + args.seconds
    rounds = 0
    while time.monotonic() < end or rounds == 0:
        for name, run in runs.items():
            if rounds and time.monotonic() >= end:
                break
            started = time.monotonic()
            try:
                run()
            except BaseException as error:  # noqa: BLE001 - report which target failed, then stop
                if isinstance(error, KeyboardInterrupt):
                    print("interrupted", file=sys.stderr)
                    return 130
                print(f"FAILED {name}: {type(error).__name__}: {error}", file=sys.stderr)
                return 1
            examples[name] += args.batch
            print(f"{name}: {examples[name]} examples ({time.monotonic() - started:.1f} s this round)", flush=True)
        rounds += 1
    print(f"ok: {sum(examples.values())} examples in {args.seconds:g} s, no crash, hang or huge allocation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
