"""Per-room metrics: each finished turn as one JSON line and, optionally, on a Prometheus endpoint labelled by room.

A line holds the room, the served participant, the session number on that room connection, the Session's own
`TurnMetrics` (with its intervals, agent/metrics.py) and the transport's share:
    capture_s        first frame handed to the output -> first frame captured into the SDK's AudioSource (the
                     Session's `playout` interval on this transport: resampling to 48 kHz and the capture call)
    queue_ms         the AudioSource queue (audio captured but not yet sent when a reply is cut)
    captured_s       reply audio captured into the SDK; `position_s` of it was played (captured - queued)
    underruns        times the source queue ran dry inside the reply
and `clock_origin_unix`, the Unix time of session-clock 0, so session times can be put next to what a
participant measured on the same machine (the barge-in test and bench-livekit do).
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import IO

from agent.metrics import PrometheusExporter


def turn_record(room: str, participant: str, session: int, metrics, report, clock) -> dict:
    iv = metrics.intervals()
    transport = {"capture_s": iv.get("playout"), "queue_ms": None, "captured_s": None, "position_s": None,
                 "underruns": metrics.underruns}
    if report is not None:
        transport.update(queue_ms=report.queue_ms, captured_s=report.captured_s, position_s=report.position_s,
                         underruns=report.underruns)
    return {"room": room, "participant": participant, "session": session, "turn": metrics.to_dict(),
            "transport": transport, "clock_origin_unix": time.time() - clock.now()}


class RoomMetricsLog:
    """JSON lines to a file and/or a stream; safe to share between rooms of one process."""

    def __init__(self, path: Path | str | None = None, stream: IO[str] | None = None):
        self._file = open(path, "a", encoding="utf-8") if path is not None else None
        self._stream = stream
        self._lock = threading.Lock()
        self.lines = 0

    def write(self, record: dict) -> None:
        line = json.dumps(record, sort_keys=True, default=str)
        with self._lock:
            for out in (self._file, self._stream):
                if out is not None:
                    out.write(line + "\n")
                    out.flush()
            self.lines += 1

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                self._file.close()
                self._file = None


class RoomPrometheusExporter:
    """The Session's turn metrics and the transport's, per room (prometheus_client; its own registry)."""

    def __init__(self, port: int | None = None, addr: str = "127.0.0.1", registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self.registry = registry or CollectorRegistry()
        buckets = PrometheusExporter.BUCKETS
        self.intervals = Histogram("speechgpt_room_turn_interval_seconds", "Per-turn latency intervals, per room",
                                   ["room", "interval"], buckets=buckets, registry=self.registry)
        self.capture = Histogram("speechgpt_room_capture_seconds", "First frame handed -> captured into the SDK",
                                 ["room"], buckets=buckets, registry=self.registry)
        self.turns = Counter("speechgpt_room_turns_total", "Answered user turns", ["room", "outcome"],
                             registry=self.registry)
        self.underruns = Counter("speechgpt_room_underruns_total", "Playout underruns", ["room"], registry=self.registry)
        self.errors = Counter("speechgpt_room_errors_total", "Stage errors in turns", ["room"], registry=self.registry)
        self.sessions = Gauge("speechgpt_room_sessions", "Sessions running", ["room"], registry=self.registry)
        self.server = None
        if port is not None:
            self.server = start_http_server(port, addr=addr, registry=self.registry)

    def observe(self, record: dict) -> None:
        room = record["room"]
        turn = record["turn"]
        for name, value in turn["intervals"].items():
            if value is not None and math.isfinite(value):
                self.intervals.labels(room, name).observe(value)
        capture = record["transport"].get("capture_s")
        if capture is not None and math.isfinite(capture):
            self.capture.labels(room).observe(capture)
        self.turns.labels(room, "interrupted" if turn["interrupted"] else "completed").inc()
        self.underruns.labels(room).inc(record["transport"].get("underruns") or 0)
        self.errors.labels(room).inc(len(turn["errors"]))

    def set_sessions(self, room: str, n: int) -> None:
        self.sessions.labels(room).set(n)

    def close(self) -> None:
        if self.server is not None:
            server, _thread = self.server
            server.shutdown()
            self.server = None
