"""The `speechgpt-rt` command line.

Each subcommand lives in the module that owns its job and exposes two functions:
`add_arguments(parser)` and `run(args) -> int`. Modules are imported only when their subcommand
runs, so `speechgpt-rt --help` stays fast and a broken optional dependency only breaks its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("agent.demo", "the main job on the embedded default: a live two-turn spoken conversation with the tiny bundle"),
    "make-tiny": ("agent.tiny", "write a tiny random-weight bundle in the release file formats"),
    "chat": ("agent.chat", "a live session over the loopback transport: audio files as consecutive user turns, replies, metrics"),
    "telephony": ("agent.telephony.command", "phone calls: Twilio/Telnyx/Vonage media-stream WebSockets and webhooks on one port, one session per call"),
    "room": ("agent.livekit.room_cli", "the agent in LiveKit rooms: joins, listens to a participant, answers (lk.agent.state, lk.transcription)"),
    "worker": ("agent.livekit.worker", "a LiveKit agent worker: registers with the server's dispatch, serves each assigned room"),
    "respond": ("agent.respond", "reference pipeline: one spoken (or text) question in, one reply WAV out"),
    "serve": ("agent.realtime.server", "an OpenAI Realtime-compatible WebSocket server (GA) for LiveKit Agents, Pipecat, the OpenAI SDK"),
    "convert": ("agent.convert", "release files -> fast-loading deployment bundle (safetensors, no pickle)"),
    "bench-convert": ("agent.bench_convert", "peak memory of convert on a synthetic 1B-shaped fp32 checkpoint"),
    "export-vocoder": ("streaming.vocoder_onnx", "export the unit vocoder to ONNX"),
    "bench": ("agent.bench", "end-to-end latency benchmark: every interval of a turn, heard on the listening side, vs the original pipeline"),
    "bench-realtime": ("agent.realtime.bench", "Realtime server: commit -> first audio delta through the OpenAI SDK client vs in-process, N connections"),
    "bench-session": ("agent.bench_session", "session benchmark: speculative prefill and preemptive replies on vs off, side by side"),
    "bench-livekit": ("agent.livekit.bench", "rooms through a real LiveKit server: latency at the participant, CPU per room, concurrent rooms"),
    "bench-decode": ("kernels.bench_decode", "decode-engine benchmark vs HF eager and torch.compile"),
    "bench-units": ("streaming.bench_units", "incremental unit extractor benchmark"),
    "bench-telephony": ("agent.telephony.bench", "phone calls against fake providers: end of speech -> first bot audio, concurrent calls without underruns"),
    "bench-vocoder": ("streaming.bench_vocoder", "streaming vocoder benchmark"),
}


def _top_level_help() -> str:
    width = max(len(n) for n in SUBCOMMANDS)
    lines = ["usage: speechgpt-rt COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {doc}" for name, (_, doc) in SUBCOMMANDS.items()]
    lines += ["", "Run `speechgpt-rt COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_level_help())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"speechgpt-rt: unknown command {name!r}\n\n{_top_level_help()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"speechgpt-rt {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
