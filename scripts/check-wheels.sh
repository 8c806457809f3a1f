#!/usr/bin/env bash
# Which locked dependencies install on a store box WITHOUT a compiler: asks PyPI for a
# binary wheel of each pin in constraints.txt for CPython 3.11 on Raspberry Pi OS
# bookworm (glibc 2.36), 64-bit (aarch64) and 32-bit (armv7l). Prints one line per
# pin that has none. Raspberry Pi OS also reads piwheels.org, which builds armv7
# wheels of most packages; this machine reaches only PyPI, so a pin missing here may
# still be on piwheels (README "Running it in a store" says which).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_venv
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
missing=0
for arch in aarch64 armv7l; do
    platforms=(--platform "manylinux_2_36_$arch" --platform "manylinux_2_31_$arch"
               --platform "manylinux_2_17_$arch" --platform "manylinux2014_$arch" --platform "linux_$arch")
    for pin in $(grep -E '^[A-Za-z0-9]' constraints.txt | sed 's/ .*//'); do
        if ! "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: "${platforms[@]}" \
            --python-version 3.11 --implementation cp -d "$out/$arch" "$pin" >/dev/null 2>&1; then
            echo "no $arch wheel on PyPI: $pin"
            missing=$((missing + 1))
        fi
    done
    echo "$arch: $(ls "$out/$arch" 2>/dev/null | wc -l) wheels found"
done
echo "$missing pins without a wheel (they need a compiler, or piwheels)"
