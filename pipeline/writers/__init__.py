"""Instruction writers: given a pair (query and target image with their text), write instructions.

A writer has an id (`writer`, recorded in every triplet), the id of the prompt it follows
(`prompt_id` = name@version) and `write(pair) -> list[str]`, which raises `WriterRejected` when it
cannot write a valid instruction for the pair.
"""

from __future__ import annotations

from typing import Protocol


class WriterRejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class InstructionWriter(Protocol):
    writer_id: str
    prompt_id: str

    def write(self, pair: dict, count: int) -> list[str]:
        """Up to `count` distinct instructions leading from the pair's query image to its target."""
        ...


def make_writer(name: str) -> InstructionWriter:
    if name == "template":
        from pipeline.writers.template import TemplateWriter

        return TemplateWriter()
    raise SystemExit(f"unknown writer {name!r}; available: template")
