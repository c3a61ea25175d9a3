"""Fail (exit 1) naming every package whose installed version differs from its pin in a constraints file.

usage: python .ci/check_pins.py constraints.txt
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement


def main(path: str) -> int:
    drift = []
    pins = 0
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        pins += 1
        try:
            installed = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            drift.append(f"{req.name}: pinned {req.specifier}, not installed")
            continue
        if not req.specifier.contains(re.sub(r"\+.*$", "", installed), prereleases=True):
            drift.append(f"{req.name}: pinned {req.specifier}, installed {installed}")
    if drift:
        print(f"{path}: {len(drift)} installed version(s) differ from the pins:\n  " + "\n  ".join(drift), file=sys.stderr)
        return 1
    print(f"{path}: all {pins} pins match the installed versions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
