"""The reference speech-to-unit extractor: whole utterance -> mHuBERT layer 11 -> k-means 1000 -> (dedup).

This is the behaviour SpeechGPT was trained with (docs/speechgpt-format.md, Unit extraction rules): raw 16 kHz mono
waveform (layer-normed only if the checkpoint says so), independent 100 s chunks, fp32, nearest centre, run-length
dedup. The incremental extractor (`streaming.incremental_units`) uses it for exact end-of-turn units.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from streaming.hubert import HubertReader, load_hubert
from streaming.kmeans import KMeansQuantizer, dedup_units, load_kmeans


@dataclass(frozen=True)
class StageTimings:
    """Wall-clock seconds per stage of one extraction (device work is synchronised before each reading)."""

    audio_seconds: float
    hubert_s: float
    kmeans_s: float
    dedup_s: float

    @property
    def total_s(self) -> float:
        return self.hubert_s + self.kmeans_s + self.dedup_s

    @property
    def real_time_factor(self) -> float:
        return self.total_s / self.audio_seconds if self.audio_seconds > 0 else float("nan")


@dataclass(frozen=True)
class UnitExtraction:
    frame_units: np.ndarray  # int64 [T], 50 per second
    reduced_units: np.ndarray | None  # int64, consecutive duplicates collapsed (None when dedup is off)
    timings: StageTimings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class UnitExtractor:
    """HuBERT L11 + k-means (+ dedup) on a whole utterance."""

    def __init__(self, hubert: HubertReader, kmeans: KMeansQuantizer):
        if hubert.hidden_size != kmeans.dim:
            raise ValueError(f"HuBERT features are {hubert.hidden_size}-d ({hubert.source}) but the k-means centres "
                             f"are {kmeans.dim}-d ({kmeans.source})")
        if kmeans.device != hubert.device:
            kmeans = KMeansQuantizer(kmeans.centers, hubert.device, kmeans.source)
        self.hubert = hubert
        self.kmeans = kmeans
        self.last_timings: StageTimings | None = None

    @classmethod
    def from_files(cls, hubert_path: str | Path, kmeans_path: str | Path,
                   device: str | torch.device = "cpu") -> "UnitExtractor":
        """fairseq `.pt` or converted directory + joblib `.bin` or `centers.npy`."""
        return cls(load_hubert(hubert_path, device), load_kmeans(kmeans_path, device))

    @property
    def device(self) -> torch.device:
        return self.hubert.device

    def extract_detailed(self, wave16k: np.ndarray | torch.Tensor, dedup: bool = True,
                         chunk_cache: dict[int, torch.Tensor] | None = None) -> UnitExtraction:
        """Units of a whole 16 kHz mono utterance, with per-stage timings. `chunk_cache`: see HubertReader."""
        n = int(wave16k.shape[0])
        _sync(self.device)
        t0 = time.perf_counter()
        features = self.hubert.features(wave16k, chunk_cache=chunk_cache)
        _sync(self.device)
        t1 = time.perf_counter()
        frame_units = self.kmeans.assign(features)
        t2 = time.perf_counter()
        reduced = dedup_units(frame_units) if dedup else None
        t3 = time.perf_counter()
        timings = StageTimings(n / 16000.0, t1 - t0, t2 - t1, t3 - t2)
        self.last_timings = timings
        return UnitExtraction(frame_units, reduced, timings)

    def extract(self, wave16k: np.ndarray | torch.Tensor, dedup: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(frame_units int64 [T], reduced_units int64 or None). Stage timings land in `last_timings`."""
        result = self.extract_detailed(wave16k, dedup=dedup)
        return result.frame_units, result.reduced_units
