"""The token-id table of the SpeechGPT vocabulary, read from the tokenizer files.

The release extends LLaMA's 32000 SentencePiece pieces with 1000 unit tokens `<0>`..`<999>` and six specials.
Nothing here is hard-coded except the release table used to check what was read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from agent.prompts import EOH, EOSP, HUMAN, NUM_UNITS, SOSP, SPEECHGPT

EXTRA_SPECIALS = (SOSP, EOSP, HUMAN, SPEECHGPT, EOH, "<eos>")

# What the released SpeechGPT-7B-cm / -com tokenizer files contain (docs/speechgpt-format.md, Vocabulary ids).
RELEASE_TABLE: dict[str, int] = {
    "<0>": 32000,
    "<999>": 32999,
    SOSP: 33000,
    EOSP: 33001,
    HUMAN: 33002,
    SPEECHGPT: 33003,
    EOH: 33004,
    "<eos>": 33005,
}
RELEASE_SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2}


class VocabError(ValueError):
    """The tokenizer files do not describe the SpeechGPT vocabulary."""


@dataclass(frozen=True)
class SpeechVocab:
    """Ids of every token the protocol layer needs."""

    sp_size: int  # pieces in tokenizer.model
    unit_base: int  # id of <0>
    num_units: int
    sosp: int
    eosp: int
    human: int
    speechgpt: int
    eoh: int
    eos_marker: int  # "<eos>": added by the release, never used in its data
    bos: int
    eos: int
    unk: int
    pad: int
    vocab_size: int
    added_tokens: dict[str, int]  # every added token, text -> id

    def unit_id(self, unit: int) -> int:
        if not 0 <= unit < self.num_units:
            raise ValueError(f"unit {unit} out of range [0, {self.num_units})")
        return self.unit_base + unit

    def is_unit(self, token_id: int) -> bool:
        return self.unit_base <= token_id < self.unit_base + self.num_units

    def unit_of(self, token_id: int) -> int:
        if not self.is_unit(token_id):
            raise ValueError(f"token id {token_id} is not a unit token")
        return token_id - self.unit_base

    def is_added(self, token_id: int) -> bool:
        """True for every added token (units and the six specials)."""
        return self.sp_size <= token_id < self.vocab_size

    @property
    def speech_rows(self) -> tuple[int, int]:
        """The contiguous id range legal while a unit span is open: the units and the specials after them."""
        return self.unit_base, self.vocab_size

    @classmethod
    def from_files(
        cls,
        added_tokens_json: Path,
        sp_size: int,
        special_ids: dict[str, int] | None = None,
        check_release: bool = True,
    ) -> "SpeechVocab":
        path = Path(added_tokens_json)
        try:
            added = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise VocabError(f"{path}: missing; a SpeechGPT tokenizer directory needs added_tokens.json") from None
        except json.JSONDecodeError as e:
            raise VocabError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(added, dict) or not all(isinstance(v, int) for v in added.values()):
            raise VocabError(f"{path}: expected an object mapping token text to integer id")
        special_ids = dict(special_ids or RELEASE_SPECIAL_IDS)

        missing = [t for t in [f"<{u}>" for u in range(NUM_UNITS)] + list(EXTRA_SPECIALS) if t not in added]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise VocabError(f"{path}: tokens missing: {shown}")
        base = added["<0>"]
        bad_units = [(u, added[f"<{u}>"]) for u in range(NUM_UNITS) if added[f"<{u}>"] != base + u]
        if bad_units:
            u, got = bad_units[0]
            raise VocabError(
                f"{path}: unit ids are not contiguous: <{u}> has id {got}, expected {base + u} (= id of <0> + {u}); "
                f"{len(bad_units)} unit(s) off"
            )
        if base != sp_size:
            raise VocabError(
                f"{path}: <0> has id {base} but tokenizer.model has {sp_size} pieces; added tokens must follow them"
            )
        vocab_size = max(added.values()) + 1
        if sorted(added.values()) != list(range(sp_size, vocab_size)):
            raise VocabError(f"{path}: added token ids are not exactly {sp_size}..{vocab_size - 1} without gaps")
        vocab = cls(
            sp_size=sp_size,
            unit_base=base,
            num_units=NUM_UNITS,
            sosp=added[SOSP],
            eosp=added[EOSP],
            human=added[HUMAN],
            speechgpt=added[SPEECHGPT],
            eoh=added[EOH],
            eos_marker=added["<eos>"],
            bos=special_ids["bos"],
            eos=special_ids["eos"],
            unk=special_ids["unk"],
            pad=special_ids.get("pad", 0),
            vocab_size=vocab_size,
            added_tokens=dict(added),
        )
        if check_release:
            vocab.check_release_table(path)
        return vocab

    def check_release_table(self, source: Path | str = "tokenizer files") -> None:
        got = {tok: self.added_tokens[tok] for tok in RELEASE_TABLE}
        got_special = {"unk": self.unk, "bos": self.bos, "eos": self.eos}
        diffs = [f"{t}: expected {RELEASE_TABLE[t]}, got {got[t]}" for t in RELEASE_TABLE if got[t] != RELEASE_TABLE[t]]
        diffs += [
            f"{n}: expected {RELEASE_SPECIAL_IDS[n]}, got {got_special[n]}"
            for n in RELEASE_SPECIAL_IDS
            if got_special[n] != RELEASE_SPECIAL_IDS[n]
        ]
        if self.vocab_size != 33006:
            diffs.append(f"vocab size: expected 33006, got {self.vocab_size}")
        if diffs:
            raise VocabError(f"{source}: does not match the SpeechGPT release table: " + "; ".join(diffs))
