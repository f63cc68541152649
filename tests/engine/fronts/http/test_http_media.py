"""Moderations, image generation and speech through the engine, with real clients against the simulator: the
official SDK over the HTTP front (a real engine subprocess) and the msgpack client helper."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import simulator, simulator_stats
from test_http_front import CLIENT_KEY, engine_stats, http_engine, in_thread, unix_sdk

from trio_mapper import AsyncClient

SPEECH: dict[str, Any] = {"model": "gpt-4o-mini-tts", "voice": "alloy", "input": "The quick brown fox jumps."}


def use_sdk(client: openai.OpenAI) -> dict[str, Any]:
    moderation = client.moderations.create(input=["hello there", "good night"])
    image = client.images.generate(model="gpt-image-1", prompt="a red fox", quality="low", n=2)
    speech = client.audio.speech.create(**SPEECH)
    wav = client.audio.speech.create(**{**SPEECH, "response_format": "wav"})
    return {"moderation": moderation, "image": image, "speech": speech, "wav": wav}


async def test_the_sdk_creates_moderations_images_and_speech_through_the_engine(short_tmp: Path) -> None:
    async with simulator() as url, http_engine(short_tmp, url) as (engine, tcp_url):
        # What the simulator itself sends for the same speech requests, byte for byte.
        async with httpx.AsyncClient(base_url=url, headers={"authorization": "Bearer sk-direct"}) as direct:
            mp3_direct = await direct.post("/audio/speech", json=SPEECH)
            wav_direct = await direct.post("/audio/speech", json={**SPEECH, "response_format": "wav"})
        with unix_sdk(engine, max_retries=0) as client:
            out = await in_thread(use_sdk, client)
        with openai.OpenAI(api_key=CLIENT_KEY, base_url=tcp_url, max_retries=0) as tcp_client:
            over_tcp = await in_thread(tcp_client.moderations.create, input="hi")
        lanes = (await engine_stats(engine))["lanes"]
        upstream = await simulator_stats(url)

    moderation = out["moderation"]
    assert moderation.model == "omni-moderation-latest" and len(moderation.results) == 2
    assert over_tcp.results[0].flagged is False
    image = out["image"]
    assert image.data is not None and len(image.data) == 2 and image.data[0].b64_json is not None
    assert base64.b64decode(image.data[0].b64_json).startswith(b"\x89PNG")
    assert image.usage is not None and image.usage.output_tokens == 2 * 272
    speech, wav = out["speech"], out["wav"]
    assert speech.response.headers["content-type"] == mp3_direct.headers["content-type"] == "audio/mpeg"
    assert speech.content == mp3_direct.content and len(speech.content) > 100
    assert wav.response.headers["content-type"] == "audio/wav" and wav.content == wav_direct.content
    # Each went through the budget: the engine's lanes and the simulator's buckets both counted them.
    assert lanes["default"]["succeeded"] == 2  # moderations without a model: the API's default
    assert lanes["gpt-image-1"]["succeeded"] == 1 and lanes["gpt-4o-mini-tts"]["succeeded"] == 2
    # The image reply's usage settled the lane's prompt estimate.
    assert lanes["gpt-image-1"]["actual_prompt_tokens"] == image.usage.input_tokens
    assert (
        upstream["models"]["gpt-image-1"]["ok"] == 1 and upstream["models"]["gpt-4o-mini-tts"]["ok"] == 4
    )  # 2 direct, 2 through the engine


@pytest.mark.parametrize(
    ("create", "param"),
    [
        (lambda c: c.images.generate(model="gpt-image-1", prompt="a fox", stream=True, partial_images=1), "stream"),
        (lambda c: c.audio.speech.create(**SPEECH, stream_format="sse"), "stream_format"),
        (lambda c: c.moderations.create(input=None), "input"),
        (lambda c: c.audio.speech.create(model="tts-1", voice="alloy", input=None), "input"),
    ],
)
async def test_streams_the_engine_cannot_relay_are_refused_naming_the_field(
    short_tmp: Path, create: Any, param: str
) -> None:
    async with simulator() as url, http_engine(short_tmp, url) as (engine, _):
        with unix_sdk(engine, max_retries=0) as client, pytest.raises(openai.BadRequestError) as refused:
            await in_thread(create, client)
        upstream = await simulator_stats(url)
    assert refused.value.param == param
    assert upstream["received"] == 0  # refused at intake, never sent


async def test_the_msgpack_client_moderates_and_gets_speech_as_bytes(short_tmp: Path) -> None:
    async with simulator() as url, http_engine(short_tmp, url) as (engine, _):
        async with httpx.AsyncClient(base_url=url, headers={"authorization": "Bearer sk-direct"}) as direct:
            mp3_direct = (await direct.post("/audio/speech", json=SPEECH)).content
        async with AsyncClient(engine.socket) as client:
            moderation = await client.request("/v1/moderations", {"input": "hello"})
            speech = await client.request_result("/v1/audio/speech", SPEECH)
    assert moderation["model"] == "omni-moderation-latest" and moderation["results"][0]["flagged"] is False
    assert speech.body == mp3_direct and speech.headers["content-type"] == "audio/mpeg"
