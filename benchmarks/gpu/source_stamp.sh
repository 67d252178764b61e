#!/usr/bin/env bash
# Prints one hash of everything the compiled extension is built from (setup.py and csrc/, names and contents)
# under the repository root (or the directory given), so a library built elsewhere is used only when it was
# built from exactly these sources.
set -euo pipefail
cd "${1:-$(dirname "${BASH_SOURCE[0]}")/../..}"
{ echo setup.py; find csrc -type f; } | LC_ALL=C sort | while read -r f; do
  printf '%s %s\n' "$(sha256sum < "$f" | cut -c1-64)" "$f"
done | sha256sum | cut -c1-16
