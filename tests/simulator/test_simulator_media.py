"""Moderations, image generation and speech: shaped as the SDK's types, deterministic, charged and counted."""

from __future__ import annotations

import base64
from typing import Any

import openai
import pytest
from openai.types import ImagesResponse, ModerationCreateResponse
from simulator_fixtures import fast_config, simulator_client, stats, with_sdk

from trio_mapper.simulator.media import IMAGE_TOKENS


async def test_sdk_parses_moderations_images_and_speech() -> None:
    def work(client: openai.OpenAI) -> dict[str, Any]:
        out: dict[str, Any] = {}
        raw = client.moderations.with_raw_response.create(input=["hello there", "good night"])
        out["moderation"] = (raw.parse(), raw.http_response.json())
        parts: Any = [
            {"type": "text", "text": "a picture"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ]
        out["multimodal"] = client.moderations.create(model="omni-moderation-latest", input=parts)
        raw_i = client.images.with_raw_response.generate(model="gpt-image-1", prompt="a red fox", quality="low", n=2)
        out["image"] = (raw_i.parse(), raw_i.http_response.json())
        out["dalle"] = client.images.generate(model="dall-e-3", prompt="a fox")
        speech = client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="Hello there")
        out["speech"] = (speech.content, speech.response.headers["content-type"])
        wav = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello there", response_format="wav")
        out["wav"] = (wav.content, wav.response.headers["content-type"])
        again = client.audio.speech.create(model="gpt-4o-mini-tts", voice="alloy", input="Hello there")
        out["again"] = again.content
        return out

    out = await with_sdk(fast_config(), work)

    moderation, moderation_raw = out["moderation"]
    ModerationCreateResponse.model_validate(moderation_raw)
    assert moderation.model == "omni-moderation-latest"
    assert [result.flagged for result in moderation.results] == [False, False]
    multimodal = out["multimodal"].results
    assert len(multimodal) == 1 and multimodal[0].category_applied_input_types.violence == ["text", "image"]

    image, image_raw = out["image"]
    ImagesResponse.model_validate(image_raw)
    assert image.data is not None and len(image.data) == 2
    assert image.data[0].b64_json is not None
    assert base64.b64decode(image.data[0].b64_json).startswith(b"\x89PNG\r\n\x1a\n")
    assert image.usage is not None and image.usage.output_tokens == 2 * IMAGE_TOKENS["low"]["1024x1024"]
    dalle = out["dalle"]
    assert dalle.data[0].url and dalle.data[0].revised_prompt == "a fox" and dalle.usage is None

    audio, content_type = out["speech"]
    assert content_type == "audio/mpeg" and audio.startswith(b"ID3")
    assert audio == out["again"]  # deterministic
    wav, wav_type = out["wav"]
    assert wav_type == "audio/wav" and wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"


async def test_media_requests_are_charged_and_counted() -> None:
    async with simulator_client() as client:
        moderation = await client.post("/moderations", json={"input": "one two three"})
        image = await client.post(
            "/images/generations", json={"model": "gpt-image-1", "prompt": "fox", "quality": "medium"}
        )
        speech = await client.post("/audio/speech", json={"model": "tts-1", "voice": "alloy", "input": "one two"})
        counted = await stats(client)
    assert moderation.status_code == image.status_code == speech.status_code == 200
    assert "x-ratelimit-remaining-tokens" in speech.headers
    assert counted["received"] == counted["admitted"] == counted["ok"] == 3
    # The moderation's input, the image's prompt and its output tokens, the speech's input.
    assert counted["models"]["omni-moderation-latest"]["tokens_charged"] == 3
    assert counted["models"]["gpt-image-1"]["tokens_charged"] == 1 + IMAGE_TOKENS["medium"]["1024x1024"]
    assert counted["models"]["tts-1"]["tokens_charged"] == 2


async def test_media_rate_limits_apply() -> None:
    async with simulator_client(fast_config(rpm=1)) as client:
        first = await client.post("/moderations", json={"input": "hi"})
        second = await client.post("/moderations", json={"input": "hi"})
    assert first.status_code == 200
    assert second.status_code == 429 and second.json()["error"]["type"] == "requests"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/moderations", {"model": "omni-moderation-latest"}, "input"),
        ("/moderations", {"input": 3}, "input"),
        ("/images/generations", {"model": "gpt-image-1"}, "prompt"),
        ("/images/generations", {"model": "dall-e-3", "prompt": "x", "n": 2}, "n"),
        ("/images/generations", {"model": "gpt-image-1", "prompt": "x", "stream": True}, "stream"),
        ("/audio/speech", {"model": "tts-1", "voice": "alloy"}, "input"),
        ("/audio/speech", {"model": "tts-1", "input": "hi"}, "voice"),
        ("/audio/speech", {"voice": "alloy", "input": "hi"}, None),
        ("/audio/speech", {"model": "tts-1", "voice": "a", "input": "hi", "response_format": "ogg"}, "response_format"),
    ],
)
async def test_media_bad_requests_are_400s(path: str, body: dict[str, Any], param: str | None) -> None:
    async with simulator_client() as client:
        response = await client.post(path, json=body)
        counted = await stats(client)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert counted["client_errors"] == 1 and counted["admitted"] == 0
