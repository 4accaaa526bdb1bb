"""An OpenAI Realtime-compatible WebSocket server over the Session (`speechgpt-rt serve`), GA dialect.

    protocol.py    the effective session, server events, items, error codes (what goes on the wire)
    audio.py       wire formats (PCM16 24 kHz, G.711) <-> the session's 16 kHz frames, streaming resamplers
    transport.py   the session's audio contracts over a connection (PushInput, RealtimeOutput)
    connection.py  one connection: client events -> Session calls, Session events -> server events
    server.py      the aiohttp application, authentication, admission, and the `serve` command
    clients.py     the separate virtual environment of real client libraries (tests, bench-realtime)
    bench.py       `speechgpt-rt bench-realtime`: commit -> first audio delta through the server
    remote.py      `RemoteModel`: room, worker and telephony with `--server`, the model behind a running `serve`
    remote_session.py  its sessions: a Realtime client (server_vad) with the in-process Session's surface
    drivers/       client programs run inside that environment (they import openai, livekit-agents, pipecat)

What each client needs and the choices made here: docs/realtime.md.
"""
