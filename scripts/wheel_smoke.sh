#!/usr/bin/env bash
# Build the wheel, install it (not editable) into a clean venv outside the checkout and run the smoke commands
# from a folder where the source tree is not importable: proves the package carries its data files (schemas,
# profiles) and runtimes. Usage: scripts/wheel_smoke.sh [WORKDIR] (default: a fresh temporary folder, removed).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d -t bonsai-wheel-smoke-XXXXXX)}"
[ $# -ge 1 ] || trap 'rm -rf "$work"' EXIT
mkdir -p "$work"
python3 -m pip wheel -q --no-deps -w "$work/dist" "$repo"
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
"$work/venv/bin/pip" install -q torch==2.13.0
"$work/venv/bin/pip" install -q "$work"/dist/bonsai_convert-*.whl
cd "$work"
for dev_tool in pytest xdist hypothesis ruff; do
  if "$work/venv/bin/python" -c "import $dev_tool" 2>/dev/null; then
    echo "wheel smoke: the base install brought the dev tool $dev_tool" >&2
    exit 1
  fi
done
"$work/venv/bin/bonsai-convert" pack demo:ternary --target iphone -o "$work/X"
"$work/venv/bin/bonsai-convert" verify "$work/X"
"$work/venv/bin/bonsai-convert" plan --target cuda --variant binary
echo "wheel smoke: passed"
