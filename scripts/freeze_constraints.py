"""Print pins of lit-attrib's installed dependency tree (core + test extra) for constraints.txt.

    python scripts/freeze_constraints.py > constraints.txt
"""

from __future__ import annotations

import importlib.metadata as metadata
import re

from packaging.requirements import Requirement


def closure(name: str, extras: tuple[str, ...] = (), seen: dict[str, str] | None = None) -> dict[str, str]:
    seen = {} if seen is None else seen
    key = re.sub(r"[-_.]+", "-", name).lower()
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return seen
    if key in seen:
        return seen
    seen[key] = dist.version.split("+")[0]  # torch's "+cpu" local label: the pin must match CUDA builds too
    for text in dist.requires or []:
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None or any(marker.evaluate({"extra": extra}) for extra in ("", *extras)):
            closure(requirement.name, tuple(requirement.extras), seen)
    return seen


if __name__ == "__main__":
    print("# Tested versions, used by both README commands: pip install -c constraints.txt ...")
    print("# Regenerate after an upgrade the test suite passed with: python scripts/freeze_constraints.py > constraints.txt")
    for name, version in sorted(closure("lit-attrib", ("test",)).items()):
        if name != "lit-attrib":
            print(f"{name}=={version}")
