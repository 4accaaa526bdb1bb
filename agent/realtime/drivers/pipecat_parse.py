"""Pipecat's GA event models (`pipecat.services.openai.realtime.events.parse_server_event`) on server event logs.

    python pipecat_parse.py --out REPORT.json LOG.jsonl [LOG.jsonl ...]

Pipecat's receive loop ends at the first server event its parser rejects (a field that fails its pydantic models;
older releases also died on unknown types, 1.14 skips them silently, which loses them just the same), so every event
a server sends must parse. Also checks what its handlers read without a check
(response.done carries usage; a failed response an error message). Runs in the client environment only.
"""

from __future__ import annotations

import argparse
import json
import logging

from pipecat.services.openai.realtime import events


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("logs", nargs="+")
    args = p.parse_args()
    logging.disable(logging.CRITICAL)
    report = {"parsed": 0, "failures": [], "types": {}}
    for path in args.logs:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                raw = json.loads(line)
                try:
                    ev = events.parse_server_event(line)
                except Exception as exc:  # noqa: BLE001 - reported
                    report["failures"].append({"log": path, "line": number, "type": raw.get("type"), "error": str(exc)[:500]})
                    continue
                if ev is None:  # not in its table: its receive loop skips it (older releases died on it)
                    report["failures"].append({"log": path, "line": number, "type": raw.get("type"),
                                               "error": "unknown to Pipecat's parser (ignored)"})
                    continue
                report["parsed"] += 1
                report["types"][ev.type] = report["types"].get(ev.type, 0) + 1
                if ev.type == "response.done":
                    r = ev.response
                    if r.usage is None or r.usage.input_tokens is None or r.usage.output_tokens is None:
                        report["failures"].append({"log": path, "line": number, "type": ev.type, "error": "no usage"})
                    if r.status == "failed" and not (r.status_details or {}).get("error", {}).get("message"):
                        report["failures"].append({"log": path, "line": number, "type": ev.type,
                                                   "error": "a failed response without status_details.error.message"})
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
