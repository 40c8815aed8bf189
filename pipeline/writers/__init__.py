"""Instruction writers: given a pair (query and target image with their text), write instructions.

Every writer runs as a generation backend inside Beam's `RunInference` (see `chat.py`): `template`
(rule-based, `template.py`), and the model backends `openai`, `vllm` and `transformers`, which
follow a versioned prompt (`prompt.py`) and whose answers are checked (`validate.py`). A writer has
an id (`writer`, recorded in every triplet) and the id of the prompt it follows (`prompt_id` =
name@version). `WriterRejected` carries the reason an element gets no output.
"""

from __future__ import annotations


class WriterRejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

