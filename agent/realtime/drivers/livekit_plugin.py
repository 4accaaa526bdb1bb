"""LiveKit Agents' OpenAI Realtime plugin (`livekit.plugins.openai.realtime.RealtimeModel`) against a speechgpt-rt
server, its RealtimeSession driven directly (no room).

    python livekit_plugin.py --url ws://127.0.0.1:PORT/v1 --audio SPEECH_24K.pcm --out REPORT.json

manual: turn_detection=None. Push audio, commit_audio, generate_reply (returns only if the server echoes the
response metadata), audio frames and text read from the generation; a second turn interrupted at its first audio
frame and truncated; then update_chat_ctx adds a text message (with the plugin's own id), generate_reply answers it,
and update_chat_ctx removes it again.
server_vad: the plugin's default server-side turn detection; the speech pushed with silence after it is answered by
a server-initiated generation. Runs in the client environment only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time

import aiohttp
from livekit import rtc
from livekit.agents import llm
from livekit.plugins import openai as lk_openai

RATE = 24000
CHUNK = RATE // 10


def frames_of(pcm: bytes):
    n = len(pcm) // 2
    for i in range(0, n, CHUNK):
        piece = pcm[2 * i : 2 * min(n, i + CHUNK)]
        yield rtc.AudioFrame(piece, RATE, 1, len(piece) // 2)


async def read_generation(gen: llm.GenerationCreatedEvent, on_first_audio=None) -> dict:
    out = {"user_initiated": gen.user_initiated, "messages": []}
    async for message in gen.message_stream:
        got = {"id": message.message_id, "text": "", "audio_frames": 0, "audio_s": 0.0}

        async def text():
            async for piece in message.text_stream:
                got["text"] += str(piece)

        async def audio():
            async for frame in message.audio_stream:
                got["audio_frames"] += 1
                got["audio_s"] += frame.samples_per_channel / frame.sample_rate
                if got["audio_frames"] == 1 and on_first_audio is not None:
                    on_first_audio(message.message_id)

        await asyncio.gather(text(), audio())
        got["modalities"] = await message.modalities
        out["messages"].append(got)
    return out


async def manual(args, http: aiohttp.ClientSession, pcm: bytes) -> dict:
    model = lk_openai.realtime.RealtimeModel(base_url=args.url, api_key=args.key, model="speechgpt-livekit",
                                             turn_detection=None, http_session=http)
    sess = model.session()
    report: dict = {"errors": [], "transcripts": [], "speech_started": 0}
    sess.on("error", lambda e: report["errors"].append(str(e.error)))
    sess.on("input_audio_transcription_completed", lambda e: report["transcripts"].append((e.item_id, e.transcript)))
    sess.on("input_speech_started", lambda e: report.__setitem__("speech_started", report["speech_started"] + 1))
    try:
        # turn 1: push audio, commit, generate_reply (returns once response.created echoes the metadata)
        for frame in frames_of(pcm):
            sess.push_audio(frame)
        sess.commit_audio()
        t = time.perf_counter()
        gen = await asyncio.wait_for(sess.generate_reply(), 60)
        report["generate_reply_s"] = time.perf_counter() - t
        report["turn1"] = await asyncio.wait_for(read_generation(gen), 300)

        # turn 2: interrupted at the first audio frame, then truncated at 100 ms
        for frame in frames_of(pcm):
            sess.push_audio(frame)
        sess.commit_audio()
        gen = await asyncio.wait_for(sess.generate_reply(), 60)
        interrupted: dict = {}

        def on_first_audio(message_id):
            interrupted["message_id"] = message_id
            sess.interrupt()

        report["turn2"] = await asyncio.wait_for(read_generation(gen, on_first_audio), 300)
        if "message_id" not in interrupted:
            raise RuntimeError(f"turn 2 produced no audio: {report}")
        sess.truncate(message_id=interrupted["message_id"], modalities=["audio"], audio_end_ms=100)
        report["turn2"]["truncated"] = interrupted["message_id"]

        # the chat context edited the way AgentSession does it: a text message added (with the plugin's own id,
        # acknowledged within 5 s), answered as text, then removed again
        ctx = sess.chat_ctx.copy()
        ctx.add_message(role="user", content="Tell me more about that.", id="lk_user_text")
        t = time.perf_counter()
        await sess.update_chat_ctx(ctx)
        report["chat_ctx_s"] = time.perf_counter() - t
        report["remote_ids_after_add"] = [i.id for i in sess.chat_ctx.items]
        gen = await asyncio.wait_for(sess.generate_reply(instructions="Answer briefly."), 60)
        report["turn3"] = await asyncio.wait_for(read_generation(gen), 300)
        ctx = sess.chat_ctx.copy()
        ctx.items = [i for i in ctx.items if i.id != "lk_user_text"]
        await sess.update_chat_ctx(ctx)
        report["remote_ids_after_delete"] = [i.id for i in sess.chat_ctx.items]
    finally:
        await sess.aclose()
        await model.aclose()
    return report


async def server_vad(args, http: aiohttp.ClientSession, pcm: bytes) -> dict:
    model = lk_openai.realtime.RealtimeModel(base_url=args.url, api_key=args.key, model="speechgpt-livekit",
                                             http_session=http)  # default: semantic_vad (server turn detection)
    sess = model.session()
    report: dict = {"errors": [], "speech_started": 0, "transcripts": []}
    generations: asyncio.Queue = asyncio.Queue()
    sess.on("generation_created", generations.put_nowait)
    sess.on("error", lambda e: report["errors"].append(str(e.error)))
    sess.on("input_speech_started", lambda e: report.__setitem__("speech_started", report["speech_started"] + 1))
    sess.on("input_audio_transcription_completed", lambda e: report["transcripts"].append((e.item_id, e.transcript)))
    try:
        silence = bytes(2 * RATE)  # 1 s
        for frame in frames_of(silence[: RATE] + pcm + silence + silence):
            sess.push_audio(frame)
        gen = await asyncio.wait_for(generations.get(), 300)
        report["generation"] = await asyncio.wait_for(read_generation(gen), 300)
    finally:
        await sess.aclose()
        await model.aclose()
    return report


async def main_async(args) -> dict:
    pcm = open(args.audio, "rb").read()
    async with aiohttp.ClientSession() as http:
        return {"manual": await manual(args, http, pcm), "server_vad": await server_vad(args, http, pcm)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--key", default="any-key")
    p.add_argument("--audio", required=True, help="raw 24 kHz PCM16 mono")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    report = asyncio.run(main_async(args))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
