"""FrameBuffer: frames split out of a byte stream, however the stream was cut."""

import pytest

from trio_mapper.wire import FrameBuffer, FrameTooLarge
from trio_mapper.wire.framing import LENGTH_PREFIX


def framed(body: bytes) -> bytes:
    return LENGTH_PREFIX.pack(len(body)) + body


def test_frames_come_out_whole_and_in_order_whatever_the_cuts() -> None:
    stream = framed(b"one") + framed(b"") + framed(b"three" * 1000)
    for cut in (1, 3, 7, 4096, len(stream)):
        frames = FrameBuffer(1 << 20)
        out = []
        for start in range(0, len(stream), cut):
            frames.feed(stream[start : start + cut])
            while (frame := frames.next_frame()) is not None:
                out.append(bytes(frame))
        assert out == [b"one", b"", b"three" * 1000]
        assert frames.pending_bytes == 0


def test_a_frame_that_is_all_the_buffer_is_handed_over_without_a_copy() -> None:
    frames = FrameBuffer(1 << 24)
    body = b"x" * (4 << 20)
    frames.feed(framed(body))
    frame = frames.next_frame()
    assert isinstance(frame, memoryview) and frame == body
    assert frames.pending_bytes == 0
    frames.feed(framed(b"next"))  # the buffer is a new one: the view handed out stays valid
    assert frames.next_frame() == b"next"
    assert frame == body


def test_a_length_over_the_limit_is_refused_before_buffering() -> None:
    frames = FrameBuffer(100)
    frames.feed(LENGTH_PREFIX.pack(101))
    with pytest.raises(FrameTooLarge):
        frames.next_frame()
