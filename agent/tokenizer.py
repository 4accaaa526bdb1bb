"""The tokenizer the SpeechGPT checkpoints were trained with, rebuilt over `sentencepiece`.

SpeechGPT was trained and evaluated with transformers <= 4.33's slow `LlamaTokenizer` (legacy mode). Its rules,
which newer transformers and every fast tokenizer no longer follow:

1. BOS first, no EOS.
2. Split the text on added tokens (longest match). The LLaMA specials `<s>`, `</s>`, `<unk>` also split, but
   keep their neighbours' whitespace (they were registered with lstrip/rstrip False).
3. Every chunk next to a plain added token (units, `<sosp>`, `[Human]`, ...) loses the whitespace on the side
   facing that token; chunks left empty vanish.
4. Each remaining chunk is encoded on its own by SentencePiece, which gives it a dummy-prefix "▁".

Golden ids made with the real transformers 4.33.1 live in tests/fixtures/tokenizer/.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from agent.vocab import SpeechVocab, VocabError

REPLACEMENT_CHAR = "\ufffd"


class SpeechGPTTokenizer:
    def __init__(self, sp_model_file: Path | str, added_tokens_json: Path | str, check_release: bool = True):
        self.model_file = Path(sp_model_file)
        if not self.model_file.is_file():
            raise VocabError(f"{self.model_file}: missing; a SpeechGPT tokenizer directory needs tokenizer.model")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        special_ids = {"unk": self.sp.unk_id(), "bos": self.sp.bos_id(), "eos": self.sp.eos_id(), "pad": 0}
        self.vocab = SpeechVocab.from_files(
            Path(added_tokens_json), self.sp.get_piece_size(), special_ids=special_ids, check_release=check_release
        )
        self._added: dict[str, int] = dict(self.vocab.added_tokens)
        self._id_to_added: dict[int, str] = {i: t for t, i in self._added.items()}
        self._specials: dict[str, int] = {
            self.sp.id_to_piece(i): i for i in (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) if i >= 0
        }
        every = sorted(list(self._added) + list(self._specials), key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(t) for t in every) + ")")

    @classmethod
    def from_dir(cls, directory: Path | str, check_release: bool = True) -> "SpeechGPTTokenizer":
        d = Path(directory)
        return cls(d / "tokenizer.model", d / "added_tokens.json", check_release=check_release)

    @property
    def bos_id(self) -> int:
        return self.vocab.bos

    @property
    def eos_id(self) -> int:
        return self.vocab.eos

    def __len__(self) -> int:
        return self.vocab.vocab_size

    # ---- encoding -------------------------------------------------------------------------------------------

    def split(self, text: str) -> list[str]:
        """Rules 2 and 3: the chunks the slow tokenizer encodes (added tokens as their own chunks)."""
        chunks = [c for c in self._split_re.split(text) if c != ""]
        for i, chunk in enumerate(chunks):
            if chunk not in self._added:  # LLaMA's own specials keep their neighbours' whitespace
                continue
            if i + 1 < len(chunks):
                chunks[i + 1] = chunks[i + 1].lstrip()
            if i > 0:
                chunks[i - 1] = chunks[i - 1].rstrip()
        return [c for c in chunks if c]

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        for chunk in self.split(text):
            if chunk in self._added:
                ids.append(self._added[chunk])
            elif chunk in self._specials:
                ids.append(self._specials[chunk])
            else:
                ids.extend(self.sp.encode(chunk))
        return ids

    def tokenize(self, text: str) -> list[str]:
        """Pieces (added tokens as their text), like the slow tokenizer's `tokenize`."""
        return [self.id_to_token(i) for i in self.encode(text, add_bos=False)]

    def encode_units(self, units: Iterable[int]) -> list[int]:
        return [self.vocab.unit_id(int(u)) for u in units]

    # ---- decoding -------------------------------------------------------------------------------------------

    def id_to_token(self, token_id: int) -> str:
        if token_id in self._id_to_added:
            return self._id_to_added[token_id]
        if 0 <= token_id < self.vocab.sp_size:
            return self.sp.id_to_piece(token_id)
        raise ValueError(f"token id {token_id} outside the vocabulary [0, {self.vocab.vocab_size})")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False, spaces_between_special_tokens: bool = True) -> str:
        """Text exactly as transformers 4.33's slow LlamaTokenizer.decode writes it (what the official code parsed).

        Added tokens become their own text joined to the rest by single spaces ("[SpeechGPT] :", "<sosp> <12>");
        LLaMA's specials get a space before them unless they follow another special; the first piece of each
        text run loses its dummy-prefix "▁". Our own parser works on ids and never needs this string.
        """
        specials = {self.vocab.bos, self.vocab.eos, self.vocab.unk}
        sub_texts: list[str] = []
        run: list[str] = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in specials:
                continue
            token = self.id_to_token(i)
            if i in self._id_to_added:
                if run:
                    sub_texts.append(self._pieces_to_text_433(run))
                    run = []
                sub_texts.append(token)
            else:
                run.append(token)
        if run:
            sub_texts.append(self._pieces_to_text_433(run))
        return (" " if spaces_between_special_tokens else "").join(sub_texts)

    def _pieces_to_text_433(self, pieces: list[str]) -> str:
        pieces = list(pieces)
        if pieces[0].startswith("\u2581"):
            pieces[0] = pieces[0][1:]
        out, run, prev_special = "", [], False
        for k, piece in enumerate(pieces):
            if piece in self._specials:
                if not prev_special and k != 0:
                    out += " "
                out += self.sp.decode_pieces(run) + piece
                run, prev_special = [], True
            else:
                run.append(piece)
                prev_special = False
        return out + self.sp.decode_pieces(run)

    def detokenizer(self) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
    """Turns a stream of SentencePiece ids into text deltas.

    A delta is released only when it cannot change any more: byte-fallback pieces of a multi-byte character
    decode to U+FFFD until the character is complete, so text ending in U+FFFD is held back.
    """

    def __init__(self, tokenizer: SpeechGPTTokenizer):
        self._sp = tokenizer.sp
        self._sp_size = tokenizer.vocab.sp_size
        self.ids: list[int] = []
        self.text = ""  # released so far

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if not 2 < token_id < self._sp_size:
            raise ValueError(f"token id {token_id} is not a SentencePiece text piece")
        self.ids.append(token_id)
        return self._release(final=False)

    def flush(self) -> str:
        """Release whatever is left (an incomplete character stays as U+FFFD)."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        full = self._sp.decode(self.ids)
        if not final and full.endswith(REPLACEMENT_CHAR):
            return ""
        if not full.startswith(self.text):
            # Can only happen when a byte sequence completes in a way that rewrites released text; keep the
            # released text (it cannot be recalled) and continue after the common prefix.
            common = 0
            for a, b in zip(full, self.text):
                if a != b:
                    break
                common += 1
            delta = full[common:] if len(full) > len(self.text) else ""
            self.text = self.text + delta
            return delta
        delta = full[len(self.text) :]
        self.text = full
        return delta

