"""Make `tiny_tokenizer.model`: a LLaMA-like stand-in for the released SpeechGPT/LLaMA `tokenizer.model`.

The real LLaMA SentencePiece model cannot be downloaded here, but tests and the demo need a real model with the
release's layout and normalisation rules (docs/speechgpt-format.md, SentencePiece model), because the prompt-edge
cases (the trailing ": " after "[SpeechGPT]", runs of spaces, byte fallback for "\\n") only show with those rules:

    32000 pieces: 0 <unk> (UNKNOWN), 1 <s>, 2 </s> (CONTROL), 3..258 <0x00>..<0xFF> (BYTE), then merged pieces;
    BPE, byte_fallback, split_digits, identity normaliser, add_dummy_prefix ON, remove_extra_whitespaces OFF,
    allow_whitespace_only_pieces, max_sentencepiece_length 16, character_coverage 0.99995, pad_id -1.

The vocabulary itself (which merges exist) is of course not LLaMA's: ids of ordinary words differ from the real
model. Everything that depends on the *layout* (ids 0..258, 32000 pieces, unit ids from 32000 on) matches.

Corpus: English text that every machine of this project has offline, gathered deterministically (sorted paths,
fixed per-file caps, exact-duplicate files dropped):
  1. /usr/share/common-licenses/*            (license texts)
  2. /usr/share/doc/**/copyright             (Debian copyright files)
  3. /usr/share/doc/**/changelog*.gz         (first CHANGELOG_CAP bytes of each, decompressed)
  4. docstrings of the running Python's standard library (ast, sorted files; test packages excluded)
Lines that are blank, not UTF-8, contain a control character (tab, form feed, ...) or exceed 4192 bytes are
dropped, so "\\t" and "\\n" have no pieces and go through byte fallback as in LLaMA. On the machine that made the
committed model (Python 3.11.7, sentencepiece 0.2.3) this gave 379,096 lines / 19.1 MB (licenses 3,748, copyright
112,807, changelogs 225,828, docstrings 36,713 lines) and a 513,543-byte model (sha256 e2c401d6...).
The exact file set depends on what the machine has installed, so re-running on another machine may give a slightly
different model; the committed file is the reference, this script records how it was made. Training is
single-threaded (num_threads=1) and uses every sentence (input_sentence_size=0, no sampling), so on the same
machine the output is byte-identical.

Run from the repository root with the project venv (needs only `sentencepiece`):
    .venv/bin/python agent/assets/make_tiny_tokenizer.py            # writes agent/assets/tiny_tokenizer.model
    .venv/bin/python agent/assets/make_tiny_tokenizer.py --check    # only re-check an existing model
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import re
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import sentencepiece as spm

try:  # sentencepiece >= 0.1.99 ships the proto module inside the package
    from sentencepiece import sentencepiece_model_pb2 as model_pb2
except ImportError:  # pragma: no cover - older layouts
    import sentencepiece_model_pb2 as model_pb2  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "tiny_tokenizer.model"

VOCAB_SIZE = 32000
CHANGELOG_CAP = 48 * 1024  # bytes of each decompressed changelog (newest entries first)
MAX_SENTENCE_BYTES = 4192  # LLaMA's max_sentence_length; longer lines are skipped by the trainer anyway

# The trainer/normaliser settings of LLaMA's tokenizer.model (as printed by its ModelProto), except num_threads.
TRAINER_SETTINGS = dict(
    model_type="bpe",
    vocab_size=VOCAB_SIZE,
    character_coverage=0.99995,
    byte_fallback=True,
    split_digits=True,
    split_by_unicode_script=True,
    split_by_number=True,
    split_by_whitespace=True,
    treat_whitespace_as_suffix=False,
    allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16,
    max_sentence_length=MAX_SENTENCE_BYTES,
    normalization_rule_name="identity",
    add_dummy_prefix=True,
    remove_extra_whitespaces=False,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    input_sentence_size=0,  # use every sentence: no random sampling
    shuffle_input_sentence=False,
    num_threads=1,  # deterministic
    vocabulary_output_piece_score=True,
    hard_vocab_limit=True,
    minloglevel=1,
)


# ----------------------------------------------------------------------------------------------------------------
# corpus


# Lines with control characters (tabs, form feeds, ...) are dropped so that, as in LLaMA's model, "\t" and the other
# C0 controls have no piece and go through byte fallback (<0x09>, ...) instead of forming pieces like "▁\t\t<".
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _text_lines(data: bytes) -> list[str]:
    """Decode as UTF-8 and return the non-blank lines without their newline, dropping undecodable lines,
    lines with control characters and lines longer than the trainer's max_sentence_length."""
    text = data.decode("utf-8", errors="replace")
    out = []
    for line in text.splitlines():
        line = line.rstrip("\r")
        if not line.strip() or "\ufffd" in line or _CONTROL.search(line):
            continue
        if len(line.encode("utf-8")) > MAX_SENTENCE_BYTES:
            continue
        out.append(line)
    return out


def _stdlib_docstrings() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    files = sorted(
        p
        for p in stdlib.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts and "idle_test" not in p.parts
    )
    for path in files:
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    lines.extend(_text_lines(doc.encode("utf-8")))
    return lines


def gather_corpus() -> tuple[list[str], dict[str, int]]:
    """All training lines, in a fixed order, and per-source line counts (for the record)."""
    seen: set[str] = set()
    stats: dict[str, int] = {}
    lines: list[str] = []

    def add(source: str, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:  # identical license/copyright files are common; count each text once
            return
        seen.add(digest)
        new = _text_lines(data)
        lines.extend(new)
        stats[source] = stats.get(source, 0) + len(new)

    for path in sorted(Path("/usr/share/common-licenses").glob("*")):
        if path.is_file():
            add("common-licenses", path.read_bytes())
    doc = Path("/usr/share/doc")
    for path in sorted(p for p in doc.rglob("copyright") if p.is_file()):
        add("doc-copyright", path.read_bytes())
    for path in sorted(p for p in doc.rglob("changelog*.gz") if p.is_file()):
        try:
            with gzip.open(path, "rb") as fh:
                data = fh.read(CHANGELOG_CAP)
        except (OSError, EOFError):
            continue
        # cut at the last complete line so a cap never leaves half a line
        data = data[: data.rfind(b"\n") + 1] if b"\n" in data else b""
        add("doc-changelog", data)
    doc_lines = _stdlib_docstrings()
    add("stdlib-docstrings", "\n".join(doc_lines).encode("utf-8"))
    return lines, stats


# ----------------------------------------------------------------------------------------------------------------
# checks


def check_model(path: Path) -> None:
    """Assert the release layout and LLaMA's settings on the ModelProto, then the prompt-edge behaviour."""
    proto = model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    P = model_pb2.ModelProto.SentencePiece
    ts, ns = proto.trainer_spec, proto.normalizer_spec

    assert len(proto.pieces) == VOCAB_SIZE, f"expected {VOCAB_SIZE} pieces, got {len(proto.pieces)}"
    assert (proto.pieces[0].piece, proto.pieces[0].type) == ("<unk>", P.UNKNOWN), proto.pieces[0]
    assert (proto.pieces[1].piece, proto.pieces[1].type) == ("<s>", P.CONTROL), proto.pieces[1]
    assert (proto.pieces[2].piece, proto.pieces[2].type) == ("</s>", P.CONTROL), proto.pieces[2]
    for b in range(256):
        p = proto.pieces[3 + b]
        assert (p.piece, p.type) == (f"<0x{b:02X}>", P.BYTE), f"id {3 + b}: {p.piece!r} type {p.type}"
    rest = proto.pieces[259:]
    assert all(p.type == P.NORMAL for p in rest), "ids >= 259 must all be NORMAL (merged) pieces"
    assert len({p.piece for p in proto.pieces}) == VOCAB_SIZE, "duplicate pieces"

    assert ts.model_type == model_pb2.TrainerSpec.BPE, ts.model_type
    assert ts.vocab_size == VOCAB_SIZE
    assert ts.byte_fallback is True
    assert ts.split_digits is True
    assert ts.allow_whitespace_only_pieces is True
    assert ts.max_sentencepiece_length == 16
    assert abs(ts.character_coverage - 0.99995) < 1e-6, ts.character_coverage  # stored as float32
    assert (ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id) == (0, 1, 2, -1)
    assert ts.treat_whitespace_as_suffix is False
    assert ns.name == "identity", ns.name
    assert ns.add_dummy_prefix is True
    assert ns.remove_extra_whitespaces is False
    assert ns.escape_whitespaces is True
    assert len(ns.precompiled_charsmap) == 0, "identity normaliser has no charsmap"

    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.get_piece_size() == VOCAB_SIZE
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)

    def pieces(s: str) -> list[str]:
        return sp.encode(s, out_type=str)

    # The official prompt ends with "[SpeechGPT]: ": the last chunk ": " must become "▁:" "▁".
    assert pieces(": ") == ["▁:", "▁"], pieces(": ")
    # Runs of spaces survive (dummy prefix + both spaces = three "▁").
    got = pieces("  a")
    assert "".join(got) == "▁▁▁a", got
    # A newline is not a piece: byte fallback.
    got = pieces("\n")
    assert got == ["▁", "<0x0A>"], got
    # Trailing and double spaces survive; a tab is byte 0x09 (no piece contains one).
    assert "".join(pieces("a ")) == "▁a▁"
    assert "".join(pieces("University.  SpeechGPT")).count("▁▁") == 1
    assert pieces("\t") == ["▁", "<0x09>"], pieces("\t")
    assert not any("\t" in p.piece for p in rest), "no merged piece may contain a tab"
    assert sp.decode(sp.encode("a\tb")) == "a\tb"
    # Digits are split one by one.
    assert [p for p in pieces("12345") if p != "▁"] == list("12345"), pieces("12345")
    # Round trip of unicode through byte fallback.
    for s in ("é ü 中文 🙂", "You are an AI assistant whose name is SpeechGPT.\n- x"):
        assert sp.decode(sp.encode(s)) == s, s
    # Byte pieces are used for characters outside the vocabulary.
    assert any(p.startswith("<0x") for p in pieces("🙂")), pieces("🙂")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, default=OUTPUT)
    ap.add_argument("--check", action="store_true", help="only check an existing model")
    ap.add_argument("--keep-corpus", type=Path, help="also write the training corpus here")
    args = ap.parse_args(argv)

    if not args.check:
        t0 = time.time()
        lines, stats = gather_corpus()
        corpus = "\n".join(lines) + "\n"
        print(f"corpus: {len(lines)} lines, {len(corpus.encode('utf-8'))} bytes, by source: {stats}", flush=True)
        print(f"python stdlib: {sysconfig.get_paths()['stdlib']} ({sys.version.split()[0]}), sentencepiece {spm.__version__}")
        with tempfile.TemporaryDirectory() as tmp:
            corpus_path = Path(tmp) / "corpus.txt"
            corpus_path.write_text(corpus, encoding="utf-8")
            if args.keep_corpus:
                args.keep_corpus.write_text(corpus, encoding="utf-8")
            prefix = Path(tmp) / "tiny"
            spm.SentencePieceTrainer.train(input=str(corpus_path), model_prefix=str(prefix), **TRAINER_SETTINGS)
            proto = model_pb2.ModelProto()
            proto.ParseFromString(prefix.with_suffix(".model").read_bytes())
        # The trainer records the (random) temp paths; fixed names keep the file byte-identical across runs.
        del proto.trainer_spec.input[:]
        proto.trainer_spec.input.append("corpus.txt")
        proto.trainer_spec.model_prefix = "tiny_tokenizer"
        data = proto.SerializeToString()
        args.output.write_bytes(data)
        print(f"wrote {args.output} ({len(data)} bytes) in {time.time() - t0:.0f} s")

    check_model(args.output)
    print(f"{args.output}: all layout and prompt-edge checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
