"""TorchScript calls, with torch's deprecation notice of them silenced.

The model package format is TorchScript by contract (DESIGN.md). torch 2.14 warns on every
`torch.jit.script/save/load/freeze` that TorchScript is deprecated; that is known and expected
here, so exactly that warning (its message, its two categories) is filtered, for the whole process
from the import of this module on. Not with `warnings.catch_warnings()` around each call: that
swaps the process's one filter list, and another thread leaving its own `catch_warnings` block
meanwhile (FastAPI and pydantic open such blocks) puts the list back without ours: the notice
printed at startup in 2 starts of 17, while the inference thread froze the model (none of 12 since).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import IO

import torch
from torch import nn

_DEPRECATION = r"`torch\.jit\.\w+` is (deprecated|not supported)"


warnings.filterwarnings("ignore", message=_DEPRECATION, category=FutureWarning)
warnings.filterwarnings("ignore", message=_DEPRECATION, category=DeprecationWarning)


def script(module: nn.Module) -> torch.jit.ScriptModule:
    scripted = torch.jit.script(module)
    assert isinstance(scripted, torch.jit.ScriptModule)
    return scripted


def save(module: torch.jit.ScriptModule, target: str | Path | IO[bytes]) -> None:
    torch.jit.save(module, target if not isinstance(target, Path) else str(target))


def optimize_for_inference(module: torch.jit.ScriptModule, other_methods: list[str]) -> torch.jit.ScriptModule:
    """A frozen copy of an eval-mode module, with torch's inference rewrites; `other_methods` are
    kept besides forward."""
    frozen = torch.jit.freeze(module, preserved_attrs=other_methods)
    optimized = torch.jit.optimize_for_inference(frozen, other_methods=other_methods)
    assert isinstance(optimized, torch.jit.ScriptModule)
    return optimized


def load(source: str | Path | io.BytesIO, map_location: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    module = torch.jit.load(  # type: ignore[no-untyped-call]
        source if not isinstance(source, Path) else str(source), map_location=map_location
    )
    assert isinstance(module, torch.jit.ScriptModule)
    return module
