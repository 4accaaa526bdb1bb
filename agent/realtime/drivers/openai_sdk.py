"""The OpenAI Python SDK's GA client (`client.realtime.connect`) against a speechgpt-rt server.

    python openai_sdk.py --url ws://127.0.0.1:PORT/v1 --audio SPEECH_24K.pcm --out REPORT.json [--mode conformance]
    python openai_sdk.py ... --mode bench --turns N --connections C

conformance: session.update (manual turns, transcription on), a manual turn with the given speech (append in 100 ms
chunks, commit, response.create with metadata), a second turn cancelled at its first audio delta and then truncated,
a text-only response, and an item retrieve; the report holds every event type seen and what each step got.
bench: per connection, N manual turns; for each, the time from sending the commit to the first audio delta.
Runs in the client environment only (it imports `openai`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time

from openai import AsyncOpenAI

CHUNK = 4800  # 100 ms of 24 kHz PCM16, what LiveKit sends too


def chunks(data: bytes, size: int = CHUNK):
    for i in range(0, len(data), size):
        yield data[i : i + size]


class Recorder:
    def __init__(self, conn):
        self.conn = conn
        self.types: list[str] = []
        self.errors: list[dict] = []

    async def until(self, *types: str, timeout: float = 300.0, on_event=None):
        while True:
            ev = await asyncio.wait_for(self.conn.recv(), timeout)
            self.types.append(ev.type)
            if ev.type == "error":
                self.errors.append(ev.error.model_dump())
            if on_event is not None:
                await on_event(ev)
            if ev.type in types:
                return ev


async def manual_turn(conn, rec: Recorder, pcm: bytes, metadata: dict | None = None, response: dict | None = None) -> dict:
    for piece in chunks(pcm):
        await conn.input_audio_buffer.append(audio=base64.b64encode(piece).decode())
    out = {"audio_bytes": 0, "transcript": "", "deltas": 0, "input_transcript": None}
    t_commit = time.perf_counter()
    await conn.input_audio_buffer.commit()
    await conn.response.create(response={**(response or {}), **({"metadata": metadata} if metadata else {})})

    async def on_event(ev):
        if ev.type == "response.output_audio.delta":
            if out.get("first_audio_s") is None:
                out["first_audio_s"] = time.perf_counter() - t_commit
            out["audio_bytes"] += len(base64.b64decode(ev.delta))
            out["deltas"] += 1
        elif ev.type in ("response.output_audio_transcript.delta", "response.output_text.delta"):
            out["transcript"] += ev.delta
        elif ev.type == "conversation.item.input_audio_transcription.completed":
            out["input_transcript"] = ev.transcript
        elif ev.type == "input_audio_buffer.committed":
            out["user_item"] = ev.item_id
        elif ev.type == "response.created":
            out["created_metadata"] = ev.response.metadata
            out["response_id"] = ev.response.id

    done = await rec.until("response.done", on_event=on_event)
    out.update(status=done.response.status, metadata=done.response.metadata,
               usage=done.response.usage.model_dump() if done.response.usage else None,
               item=done.response.output[0].model_dump() if done.response.output else None)
    return out


async def conformance(args) -> dict:
    pcm = open(args.audio, "rb").read()
    client = AsyncOpenAI(api_key=args.key, websocket_base_url=args.url)
    report: dict = {}
    async with client.realtime.connect(model="speechgpt-sdk-test") as conn:
        rec = Recorder(conn)
        created = await rec.until("session.created")
        report["session_id"] = created.session.id
        report["created_turn_detection"] = created.session.audio.input.turn_detection.type
        await conn.session.update(session={
            "type": "realtime", "output_modalities": ["audio"], "instructions": "Be brief.",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None,
                                "transcription": {"model": "whisper-1"}},
                      "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "alloy"}},
            "some_future_field": {"x": 1},
        })
        updated = await rec.until("session.updated")
        report["updated"] = {"turn_detection": updated.session.audio.input.turn_detection,
                             "transcription": updated.session.audio.input.transcription.model,
                             "instructions": updated.session.instructions}
        report["turn1"] = await manual_turn(conn, rec, pcm, metadata={"turn": "1"})

        # turn 2: cancelled at its first audio delta, then truncated to what "was heard"
        for piece in chunks(pcm):
            await conn.input_audio_buffer.append(audio=base64.b64encode(piece).decode())
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        turn2: dict = {}

        async def cancel_at_first_audio(ev):
            if ev.type == "response.output_audio.delta" and "cancelled_at" not in turn2:
                turn2["cancelled_at"] = ev.item_id
                await conn.response.cancel()
            elif ev.type == "response.output_audio.delta":
                turn2["deltas_after_cancel"] = turn2.get("deltas_after_cancel", 0) + 1

        done = await rec.until("response.done", on_event=cancel_at_first_audio)
        turn2["status"] = done.response.status
        turn2["reason"] = done.response.status_details.reason if done.response.status_details else None
        item_id = done.response.output[0].id
        turn2["item_id"] = item_id
        turn2["transcript_at_cancel"] = done.response.output[0].content[0].transcript
        await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=60_000)
        truncated = await rec.until("conversation.item.truncated")
        turn2["truncated_to_ms"] = truncated.audio_end_ms
        await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=40)
        truncated = await rec.until("conversation.item.truncated")
        turn2["truncated_again_ms"] = truncated.audio_end_ms
        await conn.conversation.item.retrieve(item_id=item_id)
        retrieved = await rec.until("conversation.item.retrieved")
        turn2["retrieved"] = retrieved.item.model_dump()
        await conn.response.cancel()  # nothing active: an error the clients ignore
        err = await rec.until("error")
        turn2["cancel_idle_code"] = err.error.code
        report["turn2"] = turn2

        # a text question answered as text only
        await conn.conversation.item.create(item={"type": "message", "role": "user", "id": "sdk_text_q",
                                                  "content": [{"type": "input_text", "text": "Tell me a story."}]})
        added = await rec.until("conversation.item.added")
        report["text_item_id"] = added.item.id
        await conn.response.create(response={"output_modalities": ["text"]})
        text: dict = {"text": "", "audio_deltas": 0}

        async def on_text(ev):
            if ev.type == "response.output_text.delta":
                text["text"] += ev.delta
            elif ev.type == "response.output_audio.delta":
                text["audio_deltas"] += 1

        done = await rec.until("response.done", on_event=on_text)
        text["status"] = done.response.status
        report["text_response"] = text
    report["event_types"] = sorted(set(rec.types))
    report["errors"] = rec.errors
    return report


async def bench_connection(args, pcm: bytes) -> list[float]:
    client = AsyncOpenAI(api_key=args.key, websocket_base_url=args.url)
    latencies = []
    async with client.realtime.connect(model="speechgpt-bench") as conn:
        rec = Recorder(conn)
        await rec.until("session.created")
        await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        await rec.until("session.updated")
        for _ in range(args.turns):
            turn = await manual_turn(conn, rec, pcm)
            if turn.get("first_audio_s") is not None:
                latencies.append(turn["first_audio_s"])
    return latencies


async def bench(args) -> dict:
    pcm = open(args.audio, "rb").read()
    t0 = time.perf_counter()
    results = await asyncio.gather(*(bench_connection(args, pcm) for _ in range(args.connections)))
    return {"connections": args.connections, "turns": args.turns, "latencies_s": results,
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--key", default="any-key")
    p.add_argument("--audio", required=True, help="raw 24 kHz PCM16 mono")
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=("conformance", "bench"), default="conformance")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--connections", type=int, default=1)
    args = p.parse_args()
    report = asyncio.run(conformance(args) if args.mode == "conformance" else bench(args))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
