"""LiveKit transport: the agent in LiveKit rooms, over the official `livekit` Python SDK.

    conventions.py  what LiveKit frontends read (the `lk.agent.state` attribute, `lk.transcription` text streams)
                    and the grants an agent token needs
    audio.py        RoomAudioInput (rtc.AudioStream at 16 kHz -> Session) and RoomAudioOutput (Session ->
                    a 48 kHz small-queue rtc.AudioSource published as a microphone track)
    publisher.py    session events -> attribute updates and text streams, in order, off the session's path
    room_agent.py   RoomAgent: one room connection, one served participant at a time, one Session each;
                    participant churn, mute, reconnects
    metrics.py      per-room metrics: JSON lines and Prometheus, labelled by room
    room_cli.py     `speechgpt-rt room`
    worker.py       `speechgpt-rt worker`: LiveKit agent dispatch (the `livekit.agent` protobufs)
    devserver.py    a pinned livekit-server built with `go install` and run in a private network namespace
                    (tests and `bench-livekit`)
    bench.py        `speechgpt-rt bench-livekit`

Facts about LiveKit the code relies on are written down in docs/livekit.md. Nothing here is imported by the
modules the GPU machines use (they have no livekit package).
"""
