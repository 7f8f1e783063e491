"""Split pyproject.toml's runtime dependencies for the image build: torch's own, and the rest.

    python requirements.py pyproject.toml torch.txt rest.txt

torch and torchvision come from PyTorch's index for the image's variant (CPU or a CUDA build);
everything else from PyPI. pyproject.toml stays the one list of versions.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

TORCH_PACKAGES = frozenset({"torch", "torchvision"})


def split(pyproject: Path) -> tuple[list[str], list[str]]:
    dependencies: list[str] = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    torch: list[str] = []
    rest: list[str] = []
    names: set[str] = set()
    for requirement in dependencies:
        match = re.match(r"[A-Za-z0-9._-]+", requirement)
        if match is None:
            raise SystemExit(f"cannot read the requirement {requirement!r}")
        name = match.group(0).lower()
        if name in TORCH_PACKAGES:
            names.add(name)
            torch.append(requirement)
        else:
            rest.append(requirement)
    if names != TORCH_PACKAGES:
        raise SystemExit(f"pyproject.toml must list {sorted(TORCH_PACKAGES)} among its dependencies")
    return torch, rest


def main(argv: list[str]) -> int:
    pyproject, torch_out, rest_out = (Path(arg) for arg in argv)
    torch, rest = split(pyproject)
    torch_out.write_text("\n".join(torch) + "\n")
    rest_out.write_text("\n".join(rest) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
