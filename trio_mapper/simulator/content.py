"""Deterministic pseudo content: reply text with an exact token count, and embedding vectors.

Reply text is built from words that are each exactly one cl100k token with or without a leading space, so a
reply of N words is N completion tokens without running the tokenizer on the request path.
Embeddings are a pure function of the input text (same text, same vector), which makes caches testable.
"""

from __future__ import annotations

import array
import base64
import hashlib
import math
import sys
from collections.abc import Iterator

WORDS: tuple[str, ...] = (
    "the", "quick", "brown", "fox", "over", "lazy", "dog", "and", "runs", "far", "away", "from", "home",
    "into", "light", "river", "stone", "moon", "sun", "tree", "water", "fire", "wind", "song", "story",
    "time", "day", "night", "road", "city", "house", "world", "small", "large", "green", "blue", "red",
    "white", "black", "old", "new", "bright", "quiet", "soft", "warm", "cold", "deep", "high", "long",
    "short", "open", "clear", "simple", "strong", "early", "late", "rain", "snow", "field", "window",
    "door", "bridge", "market", "music",
)  # fmt: skip
# Coprime with len(WORDS) so a reply walks the whole vocabulary before repeating.
_STRIDE = 7

# Sizes of the real models' vectors; other names get the text-embedding-3-small size.
EMBEDDING_DIMENSIONS = {
    "text-embedding-3-large": 3072,
    "text-embedding-3-small": 1536,
    "text-embedding-ada-002": 1536,
}
DEFAULT_DIMENSIONS = 1536


def reply_tokens(start: int, count: int) -> Iterator[str]:
    """The reply's pieces, one token each: the first word bare, the rest with a leading space."""
    size = len(WORDS)
    for i in range(count):
        word = WORDS[(start + i * _STRIDE) % size]
        yield word if i == 0 else " " + word


def reply_text(start: int, count: int) -> str:
    return "".join(reply_tokens(start, count))


def embedding_vector(key: bytes, dimensions: int) -> array.array[float]:
    """A unit-length float32 vector derived from ``key`` by hashing, never by drawing from the RNG."""
    raw = array.array("h", hashlib.shake_256(key).digest(2 * dimensions))
    values = array.array("f", raw)
    norm = math.sqrt(math.fsum(v * v for v in values)) or 1.0
    return array.array("f", (v / norm for v in values))


def embedding_base64(vector: array.array[float]) -> str:
    """Base64 of little-endian float32, what the SDK decodes for ``encoding_format="base64"``."""
    if sys.byteorder == "big":
        vector = array.array("f", vector)
        vector.byteswap()
    return base64.b64encode(vector.tobytes()).decode("ascii")
