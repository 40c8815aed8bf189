"""Versioned prompt files for the captioner and the instruction writer (see docs/instruct.md).

This package holds only data: one YAML file per prompt, shipped with the installed package.
`pipeline.writers.prompt.load_prompt` reads them.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable


def bundled_prompt(name: str) -> Traversable | None:
    """The shipped prompt file `NAME.yaml`, or None when there is none."""
    candidate = resources.files(__name__).joinpath(f"{name}.yaml")
    return candidate if candidate.is_file() else None


def bundled_prompt_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))
