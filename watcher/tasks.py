"""What to write for an image: task definitions, prompts for generic models, output clean-up."""

from __future__ import annotations

import re
from dataclasses import dataclass

TASK_KINDS = ("prompt", "short", "normal", "long", "query")

# Instructions for chat-template models. Moondream maps short/normal/long to its own
# caption lengths and only uses PROMPT_INSTRUCTION / the question.
PROMPT_INSTRUCTION = (
    "Describe this image as a Stable Diffusion prompt: a comma-separated list of short "
    "phrases covering the subject, colours, materials, lighting, composition and style. "
    "No full sentences."
)
INSTRUCTIONS = {
    "prompt": PROMPT_INSTRUCTION,
    "short": "Describe this image in one short sentence.",
    "normal": "Describe this image in a few sentences.",
    "long": "Describe this image in detail: subject, setting, colours, lighting and mood.",
}

# Openings that models add and that nobody wants in a caption file.
_BOILERPLATE = re.compile(
    r"^\s*(?:answer\s*:|caption\s*:|prompt\s*:|assistant\s*:|"
    r"(?:the|this)\s+(?:image|picture|photo(?:graph)?)\s+(?:shows|depicts|features|"
    r"displays|contains|is\s+of|captures)\b\s*:?)\s*",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Task:
    """One output to produce for an image."""

    kind: str
    question: str | None = None
    max_tokens: int = 120

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"unknown task {self.kind!r}; expected one of {', '.join(TASK_KINDS)}")
        if self.kind == "query" and not self.question:
            raise ValueError("task 'query' needs a question")

    @property
    def instruction(self) -> str:
        """The text a chat-template model is asked."""
        if self.kind == "query":
            assert self.question is not None
            return self.question
        return INSTRUCTIONS[self.kind]

    @property
    def key(self) -> str:
        """Stable identity of the task, for caches and the index."""
        return f"query:{self.question}" if self.kind == "query" else self.kind


def clean_caption(text: str, prefix: str = "", suffix: str = "") -> str:
    """Strip boilerplate openings, collapse whitespace, add trigger words.

    Never turns an answer into nothing: one that is all boilerplate ("The image shows.")
    is kept as the model gave it (whitespace collapsed), since an empty sidecar says less.
    """
    given = " ".join(text.split())
    text = given
    stripped_any = False
    # Strip repeatedly: "Answer: The image shows ..." has two layers.
    for _ in range(3):
        stripped = _BOILERPLATE.sub("", text, count=1)
        if stripped == text:
            break
        text, stripped_any = stripped, True
    if not any(c.isalnum() for c in text):  # nothing but the lead-in (and punctuation)
        text, stripped_any = given, False
    if stripped_any and text[:1].islower():
        text = text[0].upper() + text[1:]
    parts = [p for p in (prefix.strip(), text.strip(), suffix.strip()) if p]
    return ", ".join(parts) if (prefix or suffix) else text.strip()
