"""Phone calls over providers' media-stream WebSockets (`speechgpt-rt telephony`); formats in docs/telephony.md.

    server.py    aiohttp app: the WebSockets (/twilio, /telnyx, /vonage, / detected), webhooks, signatures, limits
    call.py      one call: limits, reorder window, start -> Session, marks/DTMF/stop, teardown and counters
    output.py    CallInput / CallOutput: the agent.io contracts over a socket (pacing, marks, clear)
    base.py      the serializer interface and call events; twilio.py, telnyx.py, vonage.py: one per provider
    codec.py     G.711 / L16 payloads (audioop) and the call's wire format
    security.py  X-Twilio-Signature
    events.py    CallStarted, DtmfReceived, CallProblem, CallEnded (published on the session's event bus)
    command.py   the CLI; bench.py: `speechgpt-rt bench-telephony`
"""
