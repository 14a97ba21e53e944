"""Canonical utilities of the Stage 1 pipeline: one module per concern.

The source's API works as written (with `scripts/` on the path):

    from utils import CleanModelLoader
    from utils import CompletionStylePrompts
    from utils import InstructionCritic
    from utils import create_artifact_metadata, create_session_manifest

Each name is looked up in `_EXPORTS` and its module imported on first use (PEP 562), so
`import utils` imports nothing else, and none of these names imports torch: that waits until
`CleanModelLoader.load()` loads a model. Scripts import from the submodules directly
(``from utils.jsonl_io import read_jsonl``), which is just as lazy.
"""

from __future__ import annotations

import importlib

# name -> the module (in this package) that defines it; the one place a package-level name is declared.
_EXPORTS = {
    "CleanModelLoader": "clean_model_loader",
    "CompletionStylePrompts": "completion_prompts",
    "InstructionCritic": "instruction_critic",
    "create_artifact_metadata": "provenance_helper",
    "create_session_manifest": "provenance_helper",
    "model_identity": "provenance_helper",
    "same_model": "provenance_helper",
    "BadInputError": "exit_codes",
    "RefusedError": "exit_codes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
