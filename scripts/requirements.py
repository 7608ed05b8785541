"""The project's pins, read from pyproject.toml (the one place they are written).

    python scripts/requirements.py                 # the runtime pins (what requirements.txt holds)
    python scripts/requirements.py cuda            # runtime + the CUDA engine (the Space's image)
    python scripts/requirements.py cpu dev         # runtime + the CPU engine + tests (make test)
    python scripts/requirements.py --only torch    # one pin: torch is installed first, on its own
    python scripts/requirements.py --check         # exit 1 if requirements.txt is not up to date

Needs only the standard library (tomllib), so the Dockerfile can run it before anything is installed.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = ("# PrefLoop runtime pins, generated from pyproject.toml by\n"
          "# `python scripts/requirements.py > requirements.txt`; edit pyproject.toml, not this file.\n"
          "# Install torch first, on its own: on a CPU machine its exact pin takes the CPU wheel, where a\n"
          "# looser request would pull several GB of CUDA wheels.\n")


def pins(extras: list[str]) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = list(project["dependencies"])
    for extra in extras:
        if extra not in project["optional-dependencies"]:
            raise SystemExit(f"no extra {extra!r}; the extras are {sorted(project['optional-dependencies'])}")
        out += project["optional-dependencies"][extra]
    return out


def requirements_txt() -> str:
    return HEADER + "".join(f"{p}\n" for p in pins([]))


def main(argv: list[str]) -> int:
    if argv[:1] == ["--check"]:
        current = (ROOT / "requirements.txt").read_text()
        if current != requirements_txt():
            print("requirements.txt differs from pyproject.toml: run `python scripts/requirements.py > "
                  "requirements.txt`", file=sys.stderr)
            return 1
        return 0
    if argv[:1] == ["--only"]:
        name = argv[1].lower()
        found = [p for p in pins([]) if p.split("==")[0].strip().lower() == name]
        if not found:
            raise SystemExit(f"no pin for {name!r} in pyproject.toml")
        print(found[0])
        return 0
    sys.stdout.write(requirements_txt() if not argv else "".join(f"{p}\n" for p in pins(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
