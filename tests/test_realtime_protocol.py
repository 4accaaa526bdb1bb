"""The Realtime server's pieces without a model: G.711, wire formats and resampling, the effective session and its
updates, item parsing, the push input's drain and the output's playback model."""

from __future__ import annotations

import asyncio
import random
import warnings

import numpy as np
import pytest

from agent.realtime import audio as A
from agent.realtime import protocol as P
from agent.realtime.transport import PushInput, RealtimeOutput
from streaming.frames import AudioFrame


def _audioop():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import audioop
        except ImportError:  # Python >= 3.13
            return None
    return audioop


def test_g711_matches_the_reference_codec_on_every_sample():
    audioop = _audioop()
    every = np.arange(-32768, 32768, dtype=np.int16)
    codes = bytes(range(256))
    if audioop is None:
        pytest.skip("audioop (the reference G.711) is gone from this Python")
    assert A.ulaw_encode(every) == audioop.lin2ulaw(every.tobytes(), 2)
    assert A.alaw_encode(every) == audioop.lin2alaw(every.tobytes(), 2)
    assert np.array_equal(A.ulaw_decode(codes), np.frombuffer(audioop.ulaw2lin(codes, 2), "<i2"))
    assert np.array_equal(A.alaw_decode(codes), np.frombuffer(audioop.alaw2lin(codes, 2), "<i2"))


def test_g711_round_trips_and_stays_within_its_quantisation():
    codes = np.arange(256, dtype=np.uint8)
    for decode, encode in ((A.ulaw_decode, A.ulaw_encode), (A.alaw_decode, A.alaw_encode)):
        linear = decode(codes.tobytes())
        again = np.frombuffer(encode(linear), np.uint8)
        same = again == codes
        # mu-law has two zeros (0x7F and 0xFF); every other code survives a round trip
        assert same.sum() >= 255 and np.array_equal(decode(again.tobytes()), linear)
        rng = np.random.default_rng(7)
        x = rng.integers(-32768, 32768, 5000).astype(np.int16)
        y = decode(encode(x)).astype(np.int32)
        assert np.all(np.abs(y - x) <= np.maximum(16, np.abs(x.astype(np.int32)) // 16 + 8))


def test_wire_formats():
    assert A.WireFormat().sample_rate == 24000 and A.WireFormat(A.PCMU).sample_rate == 8000
    with pytest.raises(ValueError, match="audio/opus"):
        A.WireFormat("audio/opus")
    with pytest.raises(A.AudioFormatError, match="16-bit"):
        A.WireFormat().decode(b"\x00\x01\x02")
    x = np.array([0, 1, -1, 32767, -32768], np.int16)
    assert np.array_equal(A.WireFormat().decode(A.WireFormat().encode(x)), x)


@pytest.mark.parametrize("rate, override", [(24000, None), (8000, None), (24000, 16000)])
def test_input_chunks_make_the_same_stream_as_one_piece(rate, override):
    """Appends of any size through the one streaming resampler: the same 16 kHz audio as the whole piece at once,
    stamped contiguously with the stream position."""
    rng = np.random.default_rng(rate + (override or 0))
    in_rate = override or rate
    samples = (rng.standard_normal(in_rate) * 3000).astype(np.int16)
    fmt = A.WireFormat() if rate == 24000 else A.WireFormat(A.PCMU)
    data = fmt.encode(samples)
    whole = A.InputConverter(fmt, 10.0, override)
    one = whole.push(data) + whole.flush()
    chunked = A.InputConverter(fmt, 10.0, override)
    frames, i, width = [], 0, 1 if fmt.type == A.PCMU else 2
    while i < len(data):
        n = width * random.Random(i).randrange(1, 800)
        frames += chunked.push(data[i : i + n])
        i += n
    frames += chunked.flush()
    a = np.concatenate([f.samples for f in one])
    b = np.concatenate([f.samples for f in frames])
    assert a.shape == b.shape and abs(a.shape[0] - 16000) <= 2
    assert np.abs(a.astype(np.int32) - b.astype(np.int32)).max() <= 1
    for f, g in zip(frames, frames[1:]):
        assert g.timestamp == pytest.approx(f.end_time, abs=1e-6)
    assert frames[0].timestamp == pytest.approx(10.0)


def test_the_effective_session_and_partial_updates():
    s = P.RealtimeSessionState(model="m")
    d = s.to_dict()
    assert d["type"] == "realtime" and d["object"] == "realtime.session" and d["model"] == "m"
    assert d["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert d["audio"]["input"]["turn_detection"]["type"] == "server_vad"  # the GA default: VAD on
    assert d["tools"] == [] and d["tool_choice"] == "auto" and d["max_output_tokens"] == "inf"
    s2 = s.update({"instructions": "hi", "audio": {"input": {"turn_detection": None}}, "future_field": 1,
                   "tool_choice": {"type": "function"}, "truncation": "auto"})
    d2 = s2.to_dict()
    assert d2["instructions"] == "hi" and d2["audio"]["input"]["turn_detection"] is None
    assert "future_field" not in d2 and "truncation" not in d2 and d2["tool_choice"] == "auto"
    assert d2["audio"]["input"]["format"] == d["audio"]["input"]["format"]  # untouched fields stay
    assert s.to_dict() == d  # an update makes a new state
    s3 = s2.update({"output_modalities": ["text"], "max_output_tokens": 100,
                    "audio": {"input": {"format": {"type": "audio/pcmu"},
                                        "turn_detection": {"type": "semantic_vad", "eagerness": "high",
                                                           "interrupt_response": False}},
                              "output": {"format": {"type": "audio/pcm", "rate": 16000}, "voice": "marin"}}})
    d3 = s3.to_dict()
    assert d3["output_modalities"] == ["text"] and d3["max_output_tokens"] == 100
    assert d3["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}  # what we send
    assert d3["audio"]["input"]["turn_detection"] == {"type": "semantic_vad", "eagerness": "high",
                                                      "create_response": True, "interrupt_response": False}
    assert P.turn_silence_s(d3["audio"]["input"]["turn_detection"]) == P.SEMANTIC_SILENCE_S["high"]
    assert s3.update({"instructions": ""}).instructions == ""
    for bad, param in [({"type": "transcription"}, "session.type"),
                       ({"output_modalities": ["video"]}, "session.output_modalities"),
                       ({"audio": {"input": {"format": {"type": "audio/opus"}}}}, "session.audio.input.format"),
                       ({"audio": {"input": {"turn_detection": {"type": "magic"}}}}, "session.audio.input.turn_detection.type"),
                       ({"max_output_tokens": 0}, "session.max_output_tokens")]:
        with pytest.raises(P.ProtocolError) as err:
            s.update(bad)
        assert err.value.code == P.INVALID_VALUE and err.value.param == param
    with pytest.raises(P.ProtocolError):
        s.update("not an object")


def test_items_are_parsed_and_rendered_in_ga_shapes():
    from agent.conversation import Message

    spec = P.parse_item({"type": "message", "role": "user", "id": "x",
                         "content": [{"type": "input_text", "text": " hi "}, {"type": "input_image", "image_url": "u"}]})
    assert spec == {"id": "x", "role": "user", "modality": "text", "text": "hi", "audio": None}
    spec = P.parse_item({"role": "assistant", "content": [{"type": "output_audio", "transcript": "said"}]})
    assert spec["modality"] == "audio" and spec["text"] == "said"
    spec = P.parse_item({"role": "user", "content": [{"type": "input_audio", "audio": "AAAA"}]})
    assert spec["audio"] == "AAAA" and spec["text"] is None
    for bad in [{"type": "function_call", "role": "user"}, {"role": "tool"}, {"role": "user", "content": [{"type": "x"}]},
                {"role": "user", "id": ""}, None]:
        with pytest.raises(P.ProtocolError):
            P.parse_item(bad)
    m = Message("a", "assistant", "audio", text="one two three four", units=[1, 2, 3, 4], durations=[5, 5, 5, 5],
                audio_s=0.4, heard_s=0.2)
    assert P.item_dict(m) == {"id": "a", "object": "realtime.item", "type": "message", "status": "completed",
                              "role": "assistant", "content": [{"type": "output_audio", "transcript": "one two"}]}
    u = Message("u", "user", "audio", units=[1])
    assert P.item_dict(u)["content"] == [{"type": "input_audio", "transcript": None}]


def test_error_events_carry_the_client_event_id():
    e = P.error_event(P.ProtocolError(P.COMMIT_EMPTY, "empty"), "evt_1")
    assert e["type"] == "error" and e["event_id"].startswith("event_")
    assert e["error"] == {"type": "invalid_request_error", "code": P.COMMIT_EMPTY, "message": "empty", "param": None,
                          "event_id": "evt_1"}


def test_push_input_drains_only_after_the_consumer_took_every_frame():
    async def main():
        inp = PushInput()
        taken = []

        async def consumer():
            async for frame in inp:
                await asyncio.sleep(0.001)  # the consumer's work between frames
                taken.append(frame)

        task = asyncio.get_running_loop().create_task(consumer())
        await inp.drained()  # nothing pushed: returns once the consumer waits
        for i in range(5):
            inp.push(AudioFrame(np.zeros(160, np.int16), 16000, 1, i * 0.01))
        await inp.drained()
        n = len(taken)
        inp.close()
        await task
        await inp.drained()  # closed: at once
        return n

    assert asyncio.run(main()) == 5


def test_realtime_output_models_playback_from_the_first_frame():
    from agent.clock import SessionClock

    class Clock(SessionClock):
        t = 0.0

        def now(self):
            return self.t

    clock, sent = Clock(), []
    out = RealtimeOutput(clock, sent.append, lambda: sent.append("flush"), lambda: sent.append("clear"))
    events = []
    out.on_playback(events.append)

    async def main():
        assert out.clear_buffer() is None
        clock.t = 1.0
        for _ in range(10):
            await out.capture_frame(AudioFrame(np.zeros(320, np.float32), 16000, 1, 0.0))  # 0.2 s in all
        clock.t = 1.05
        cut = out.clear_buffer()
        assert cut.interrupted and cut.position == pytest.approx(0.05)
        clock.t = 2.0
        await out.capture_frame(AudioFrame(np.zeros(320, np.float32), 16000, 1, 0.0))
        clock.t = 9.0
        assert out.played_estimate() == pytest.approx(0.02)  # capped at what was sent
        out.flush()
        done = await out.wait_for_playout()
        assert not done.interrupted and done.position == pytest.approx(0.02)

    asyncio.run(main())
    assert sent.count("clear") == 1 and sent.count("flush") == 1 and len([s for s in sent if isinstance(s, AudioFrame)]) == 11
    assert [type(e).__name__ for e in events] == ["PlaybackStarted", "PlaybackFinished", "PlaybackStarted", "PlaybackFinished"]
