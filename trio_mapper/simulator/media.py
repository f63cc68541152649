"""Moderations, image generation and text to speech: small, deterministic stand-ins for the real endpoints.

Each reply is a pure function of the request (no draw from the dice), so the same request always gets the same
bytes: a moderation that flags nothing, a tiny PNG whose colour comes from the prompt, a few hundred bytes of
"audio" that start like the requested format. Costs follow what the real API counts against a model's
tokens per minute: a moderation its input text, an image its prompt plus (gpt-image models) its output image
tokens, speech its input text.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from collections.abc import Mapping
from typing import Any, Final

from .tokens import TokenCounter

DEFAULT_MODERATION_MODEL: Final = "omni-moderation-latest"
DEFAULT_IMAGE_MODEL: Final = "dall-e-2"
MAX_IMAGES: Final = 10
MAX_SPEECH_CHARS: Final = 4096

MODERATION_CATEGORIES: Final = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
#: The categories the omni model also judges images for (the rest are text-only, as on the API).
_IMAGE_CATEGORIES: Final = frozenset(
    {"self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "violence", "violence/graphic"}
)

#: Output image tokens of one gpt-image image by quality and size (OpenAI's pricing table for gpt-image-1).
IMAGE_TOKENS: Final[Mapping[str, Mapping[str, int]]] = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}
#: What ``auto`` stands for here (the API picks by prompt; the simulator picks the same every time).
_AUTO_QUALITY: Final = "high"
_AUTO_SIZE: Final = "1024x1024"

#: ``response_format`` of speech, and the content type the API answers it with.
SPEECH_FORMATS: Final[Mapping[str, bytes]] = {
    "mp3": b"audio/mpeg",
    "opus": b"audio/ogg",
    "aac": b"audio/aac",
    "flac": b"audio/flac",
    "wav": b"audio/wav",
    "pcm": b"audio/pcm",
}
#: The first bytes of each format, so that a player (or `file`) recognises the kind; the rest is noise.
_MAGIC: Final[Mapping[str, bytes]] = {
    "mp3": b"ID3\x04\x00\x00\x00\x00\x00\x00\xff\xfb\x90\x64",
    "opus": b"OggS\x00\x02",
    "aac": b"\xff\xf1\x50\x80",
    "flac": b"fLaC",
    "wav": b"",  # a real header, see `speech_audio`
    "pcm": b"",
}
#: Bytes of audio per input token: enough to differ with the input, small enough for tests.
_AUDIO_BYTES_PER_TOKEN: Final = 48
_SAMPLE_RATE: Final = 24_000


class MediaError(ValueError):
    """A 400 the API would answer: ``param`` and ``code`` of its error body."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def _missing(name: str) -> MediaError:
    return MediaError(f"Missing required parameter: '{name}'.", name, "missing_required_parameter")


def _choice(body: Mapping[str, Any], name: str, allowed: tuple[str, ...] | Mapping[str, Any], default: str) -> str:
    value = body.get(name)
    if value is None:
        return default
    if value not in allowed:
        names = ", ".join(f"'{option}'" for option in allowed)
        raise MediaError(f"Invalid value for '{name}': {value!r}. Supported values are: {names}.", name)
    return str(value)


def _refuse_stream(body: Mapping[str, Any], name: str, value: Any, what: str) -> None:
    if body.get(name) == value and value is not None:
        raise MediaError(
            f"The simulator does not stream {what} ('{name}': {value!r}); send the request without it.", name
        )


# --- moderations -------------------------------------------------------------------------------------------


def moderation_inputs(value: Any) -> list[tuple[str, bool]]:
    """The texts the request asks to judge, one per result, each with whether it holds an image."""
    if isinstance(value, str):
        return [(value, False)]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return [(item, False) for item in value]
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        # Multi-modal parts make a single input (and a single result), as on the omni model.
        texts, image = [], False
        for index, part in enumerate(value):
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif part.get("type") == "image_url" and isinstance(part.get("image_url"), dict):
                image = True
            else:
                raise MediaError(f"Invalid content part at 'input[{index}]'.", f"input[{index}]")
        return [("\n".join(texts), image)]
    raise MediaError("'input' must be a string, a non-empty array of strings or an array of content parts.", "input")


def moderation_cost(body: Mapping[str, Any], counter: TokenCounter) -> int:
    if "input" not in body:
        raise _missing("input")
    return sum(counter.text(text) for text, _ in moderation_inputs(body["input"]))


def _score(model: str, text: str, category: str) -> float:
    digest = hashlib.sha256(f"{model}\0{category}\0{text}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 / 100  # below 0.01: nothing is flagged


def moderation_reply(body: Mapping[str, Any], model: str, ident: str) -> dict[str, Any]:
    results = []
    for text, image in moderation_inputs(body["input"]):
        applied = {
            category: ["text", "image"] if image and category in _IMAGE_CATEGORIES else ["text"]
            for category in MODERATION_CATEGORIES
        }
        results.append(
            {
                "flagged": False,
                "categories": dict.fromkeys(MODERATION_CATEGORIES, False),
                "category_scores": {category: _score(model, text, category) for category in MODERATION_CATEGORIES},
                "category_applied_input_types": applied,
            }
        )
    return {"id": f"modr-{ident}", "model": model, "results": results}


# --- images ------------------------------------------------------------------------------------------------


def is_gpt_image(model: str) -> bool:
    return model.startswith("gpt-image")


def _image_settings(body: Mapping[str, Any], model: str) -> tuple[int, str, str]:
    """Number of images, quality and size of an images request (``auto`` resolved)."""
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_IMAGES:
        raise MediaError(f"Invalid 'n': expected an integer from 1 to {MAX_IMAGES}, got {n!r}.", "n")
    if model == "dall-e-3" and n != 1:
        raise MediaError("Invalid 'n': dall-e-3 generates one image per request (n=1).", "n")
    qualities = ("auto", "low", "medium", "high", "standard", "hd")
    quality = _choice(body, "quality", qualities, "auto")
    size = body.get("size") or "auto"
    if not isinstance(size, str) or (size != "auto" and not _is_size(size)):
        raise MediaError(f"Invalid value for 'size': {size!r}; use WIDTHxHEIGHT or 'auto'.", "size")
    quality = _AUTO_QUALITY if quality in ("auto", "standard", "hd") else quality
    return n, quality, _AUTO_SIZE if size == "auto" else size


def _is_size(size: str) -> bool:
    width, x, height = size.partition("x")
    return x == "x" and width.isdigit() and height.isdigit()


def image_output_tokens(quality: str, size: str) -> int:
    """One gpt-image image's output tokens; sizes outside the table count as the largest."""
    table = IMAGE_TOKENS[quality]
    return table.get(size, max(table.values()))


def image_cost(body: Mapping[str, Any], model: str, counter: TokenCounter) -> int:
    if "prompt" not in body:
        raise _missing("prompt")
    prompt = body["prompt"]
    if not isinstance(prompt, str) or not prompt:
        raise MediaError("Invalid 'prompt': expected a non-empty string.", "prompt")
    _refuse_stream(body, "stream", True, "images")
    _choice(body, "response_format", ("url", "b64_json"), "url")
    n, quality, size = _image_settings(body, model)
    output = n * image_output_tokens(quality, size) if is_gpt_image(model) else 0
    return counter.text(prompt) + output


def tiny_png(seed: bytes) -> bytes:
    """A 1x1 PNG whose colour is derived from ``seed``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rgb = hashlib.sha256(seed).digest()[:3]
    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" + rgb)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def image_reply(body: Mapping[str, Any], model: str, ident: str, created: int, counter: TokenCounter) -> dict[str, Any]:
    n, quality, size = _image_settings(body, model)
    prompt: str = body["prompt"]
    gpt_image = is_gpt_image(model)
    as_url = not gpt_image and body.get("response_format", "url") in (None, "url")
    data = []
    for index in range(n):
        if as_url:
            image: dict[str, Any] = {"url": f"https://simulator.invalid/images/img-{ident}-{index}.png"}
        else:
            seed = f"{model}\0{prompt}\0{index}".encode()
            image = {"b64_json": base64.b64encode(tiny_png(seed)).decode()}
        if model == "dall-e-3":
            image["revised_prompt"] = prompt
        data.append(image)
    reply: dict[str, Any] = {"created": created, "data": data}
    if gpt_image:
        prompt_tokens = counter.text(prompt)
        output = n * image_output_tokens(quality, size)
        reply.update(
            background="opaque",
            output_format="png",
            quality=quality,
            size=size,
            usage={
                "input_tokens": prompt_tokens,
                "input_tokens_details": {"image_tokens": 0, "text_tokens": prompt_tokens},
                "output_tokens": output,
                "output_tokens_details": {"image_tokens": output, "text_tokens": 0},
                "total_tokens": prompt_tokens + output,
            },
        )
    return reply


# --- speech ------------------------------------------------------------------------------------------------


def speech_cost(body: Mapping[str, Any], counter: TokenCounter) -> int:
    for name in ("input", "voice"):
        if body.get(name) is None:
            raise _missing(name)
    text = body["input"]
    if not isinstance(text, str) or not text:
        raise MediaError("Invalid 'input': expected a non-empty string.", "input")
    if len(text) > MAX_SPEECH_CHARS:
        raise MediaError(f"Invalid 'input': at most {MAX_SPEECH_CHARS} characters.", "input", "string_above_max_length")
    voice = body["voice"]
    if not isinstance(voice, str | dict):
        raise MediaError("Invalid 'voice': expected a voice name or {'id': ...}.", "voice")
    _choice(body, "response_format", SPEECH_FORMATS, "mp3")
    _choice(body, "stream_format", ("audio", "sse"), "audio")
    _refuse_stream(body, "stream_format", "sse", "speech as events")
    speed = body.get("speed")
    if speed is not None and (not isinstance(speed, int | float) or isinstance(speed, bool) or not 0.25 <= speed <= 4):
        raise MediaError(f"Invalid 'speed': expected a number from 0.25 to 4.0, got {speed!r}.", "speed")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise MediaError("Invalid 'instructions': expected a string.", "instructions")
    return counter.text(text) + (counter.text(instructions) if instructions else 0)


def speech_format(body: Mapping[str, Any]) -> str:
    return str(body.get("response_format") or "mp3")


def speech_audio(body: Mapping[str, Any], model: str, counter: TokenCounter) -> tuple[bytes, bytes]:
    """The audio bytes and their content type: a format's first bytes, then noise derived from the request."""
    kind = speech_format(body)
    text: str = body["input"]
    size = max(1, counter.text(text)) * _AUDIO_BYTES_PER_TOKEN
    seed = f"{model}\0{body['voice']}\0{kind}\0{text}".encode()
    if kind in ("wav", "pcm"):
        samples = hashlib.shake_256(seed).digest(size)
        if kind == "pcm":
            return samples, SPEECH_FORMATS[kind]
        header = b"RIFF" + struct.pack("<I", 36 + size) + b"WAVEfmt "
        header += struct.pack("<IHHIIHH", 16, 1, 1, _SAMPLE_RATE, _SAMPLE_RATE * 2, 2, 16)
        return header + b"data" + struct.pack("<I", size) + samples, SPEECH_FORMATS[kind]
    return _MAGIC[kind] + hashlib.shake_256(seed).digest(size), SPEECH_FORMATS[kind]
