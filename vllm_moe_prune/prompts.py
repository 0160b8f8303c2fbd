"""Prompt files: JSONL in the completion or chat shape, and how vLLM tokenizes each.

``trace`` replays them through vLLM and ``calibrate`` runs them through the model layer
by layer; both must read the same file the same way and see the same token ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_moe_prune.errors import UserError


class PromptError(UserError):
    """A prompts (or request log) file that cannot be used; the message names the line."""


@dataclass(frozen=True)
class Prompt:
    """One calibration prompt: its line in the prompts file and its text or chat messages."""

    line: int
    text: str | None = None
    messages: list[dict[str, Any]] | None = None


def read_jsonl_objects(path: str | Path, what: str) -> list[tuple[int, str, dict[str, Any]]]:
    """``(line number, "file:line", object)`` of every non-blank line of a JSONL file.

    Anything that is not a JSON object is refused with its line number: silently using
    part of a file skews every trace, calibration and plan made from it.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"{what} file {path} does not exist")
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")  # not splitlines(): JSON may hold U+2028
    except UnicodeDecodeError as exc:
        raise PromptError(f"{path} is not UTF-8 text ({exc})") from exc
    objects = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(obj, dict):
            raise PromptError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        objects.append((number, where, obj))
    if not objects:
        raise PromptError(f"{path} contains no {what}s")
    return objects


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts of a JSONL file: objects with ``"prompt"``, ``"text"`` or OpenAI-style ``"messages"``."""
    return [_prompt_of(obj, number, where) for number, where, obj in read_jsonl_objects(path, "prompt")]


def _prompt_of(obj: dict[str, Any], number: int, where: str) -> Prompt:
    for key in ("prompt", "text"):
        if key in obj:
            if not isinstance(obj[key], str) or not obj[key]:
                raise PromptError(f"{where}: '{key}' must be a non-empty string")
            return Prompt(number, text=obj[key])
    if "messages" in obj:
        messages = obj["messages"]
        valid = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        if not valid:
            raise PromptError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
        return Prompt(number, messages=messages)
    raise PromptError(f"{where}: expected a 'prompt', 'text' or 'messages' field, got {sorted(obj)}")


def tokenize(prompt: Prompt, tokenizer: Any) -> list[int]:
    """Token ids as vLLM would serve the prompt.

    Plain text gets the tokenizer's special tokens (vLLM's completions default); chat
    messages are rendered with the model's chat template, which places its own specials,
    with a generation prompt unless the conversation already ends with the assistant.
    """
    if prompt.text is not None:
        return list(tokenizer(prompt.text, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(f"prompts line {prompt.line}: chat 'messages' need a chat template; the model has none")
    assert prompt.messages is not None
    rendered = tokenizer.apply_chat_template(
        prompt.messages, tokenize=False, add_generation_prompt=prompt.messages[-1]["role"] != "assistant"
    )
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
