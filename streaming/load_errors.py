"""One wording for "this model file cannot be read at all", shared by every loader in streaming/.

Readers (torch.load, safetensors, numpy, joblib, onnxruntime, json) report a broken file with their own bare error
("Ran out of input", "PytorchStreamReader failed ...", "header too small") and usually without the file's name.
Loaders catch those and raise a ValueError subclass whose message says which file, how big it is and what the
reader said. The most common cause is an interrupted download, so the size is part of the message. stdlib only:
the ONNX runtime imports this without torch.
"""

from __future__ import annotations

from pathlib import Path


class UnreadableFile(ValueError):
    """A model file exists but its container cannot be read: empty, truncated, or not the expected format."""


def file_size(path: str | Path) -> str:
    """'1234 bytes' (or why the size is unknown), for error messages."""
    try:
        return f"{Path(path).stat().st_size} bytes"
    except OSError as exc:
        return f"size unknown: {exc.strerror or exc}"


def unreadable_message(path: str | Path, what: str, error: BaseException) -> str:
    """'<path>: not a valid <what> (truncated or empty file? <n> bytes): <ErrorType>: <reader's message>'."""
    detail = str(error).strip() or "no message"
    return f"{path}: not a valid {what} (truncated or empty file? {file_size(path)}): {type(error).__name__}: {detail}"


def unreadable(path: str | Path, what: str, error: BaseException) -> UnreadableFile:
    """The UnreadableFile to raise (`raise unreadable(...) from error`)."""
    return UnreadableFile(unreadable_message(path, what, error))
