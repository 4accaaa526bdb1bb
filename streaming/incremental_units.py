"""Incremental unit extraction: provisional units while the user speaks, final units at end of turn.

Why not exact streaming: conv layer 0's GroupNorm normalises each channel over the WHOLE input, the positional
conv spans +-64 frames and attention is bidirectional, so a frame's unit depends on the whole utterance.

Design:
  * The whole turn is buffered (exact final units need it).
  * Conv layer 0's per-channel statistics are accumulated over the turn so far (conv0 output of new audio only;
    conv0 is cheap), optionally blended with the previous turn's statistics (`prior_weight_s`: the first hops of a
    turn otherwise normalise with statistics of a few hundred ms). At end of turn they cover the whole segment,
    exactly the set the reference normalises over.
  * Every `hop_ms` the transformer runs on a sliding window: `left_context_ms` of frames before the first
    uncommitted frame, up to the newest frame. Frames with at least `right_context_ms` of audio after them are
    committed ("stable": never recomputed); the newest ones are tentative and recomputed next hop. Lag of the
    stable prefix <= right context + hop.
  * Front end (`frontend`): "refresh" (default) recomputes the CNN + projection of the whole window with the
    current statistics every hop and caches the result; "running" computes each frame's CNN output once, with
    the statistics of its hop (cheapest per hop, noisier early frames); "window" is the plain baseline: the whole
    HF model on the audio window, GroupNorm over the window only, nothing cached.
  * Stable reduced units = dedup of the committed frame units. Later frames only append (a run that continues
    adds no token), so the stable reduced prefix only grows.
  * End of turn, exact mode (default): the reference whole-utterance extraction on the buffered turn, bit for bit
    (`UnitExtractor.extract_detailed`), with no pending hop run first. Turns longer than one 100 s chunk reuse the
    exact features of completed chunks computed during the turn (fairseq's chunks are independent when the
    checkpoint does not layer-norm the waveform), so exact mode is never slower than whole-utterance extraction.
  * End of turn, approximate mode: only the uncommitted tail is computed (CNN frames not yet cached + one
    transformer window with left context, statistics of the whole turn); earlier committed units are kept.
  * The report gives the first index where the stable reduced prefix (what the LLM may have prefilled) and the
    final reduced units differ: roll the KV cache back to it. In approximate mode it is always the stable count.

100 s chunks: each chunk of the turn is a separate segment with its own frame grid and statistics, like the
reference; a segment is closed (all its frames committed) when its audio is complete.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from streaming.hubert import HOP, RECEPTIVE_FIELD, num_frames
from streaming.kmeans import dedup_units, run_lengths
from streaming.units import UnitExtractor

FRAME_MS = 20
CONV0_KERNEL, CONV0_STRIDE = 10, 5
MIN_PRIOR_CONV0_FRAMES = 16000 // 2 // CONV0_STRIDE  # a turn must have >= 0.5 s to become the next prior


@dataclass(frozen=True)
class IncrementalConfig:
    hop_ms: int = 320  # provisional update period
    left_context_ms: int = 1280  # transformer context before the first uncommitted frame (pos conv half-width)
    right_context_ms: int = 320  # audio a frame needs after it before it is committed
    frontend: Literal["running", "refresh", "window"] = "refresh"
    finalize_mode: Literal["exact", "approximate"] = "exact"
    precompute_closed_chunks: bool = True  # exact features of completed 100 s chunks during the turn
    # conv0 statistics of earlier audio (the previous turn, or `set_stats_prior`) blended into the running
    # statistics with the weight of this many seconds of audio; 0 = off. Provisional units and the approximate
    # finalize only (exact finals never see it); not used by the "window" front end.
    prior_weight_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("hop_ms", "left_context_ms", "right_context_ms"):
            value = getattr(self, name)
            if value < 0 or value % FRAME_MS:
                raise ValueError(f"IncrementalConfig.{name}={value}: must be a non-negative multiple of {FRAME_MS} ms")
        if self.hop_ms == 0:
            raise ValueError("IncrementalConfig.hop_ms must be > 0")
        if self.prior_weight_s < 0:
            raise ValueError(f"IncrementalConfig.prior_weight_s={self.prior_weight_s}: must be >= 0")
        if self.frontend not in ("running", "refresh", "window"):
            raise ValueError(f"IncrementalConfig.frontend={self.frontend!r}: 'running', 'refresh' or 'window'")
        if self.finalize_mode not in ("exact", "approximate"):
            raise ValueError(f"IncrementalConfig.finalize_mode={self.finalize_mode!r}: 'exact' or 'approximate'")

    @property
    def hop_frames(self) -> int:
        return self.hop_ms // FRAME_MS

    @property
    def left_frames(self) -> int:
        return self.left_context_ms // FRAME_MS

    @property
    def right_frames(self) -> int:
        return self.right_context_ms // FRAME_MS


@dataclass(frozen=True)
class ComputeRecord:
    """Cost of one piece of work. kind: hop | segment-close | exact-chunk | finalize-exact | finalize-approximate."""

    kind: str
    audio_end_s: float  # turn audio received when the work ran
    new_frames: int  # frames whose CNN features were computed (0 in window mode / exact finalize)
    window_frames: int  # frames the transformer ran on
    committed_frames: int  # frames newly declared stable
    frontend_s: float
    encoder_s: float
    kmeans_s: float
    total_s: float


@dataclass(frozen=True)
class ProvisionalUnits:
    """What the agent sees while the user speaks."""

    reduced_units: np.ndarray  # provisional reduced units: stable prefix + tentative tail
    stable_count: int  # reduced_units[:stable_count] will not be revised by the incremental path
    new_stable: np.ndarray  # reduced units declared stable by this event (ready to prefill)
    frame_units: np.ndarray  # provisional frame units (stable + tentative)
    stable_frames: int
    audio_seconds: float  # turn audio received
    stable_lag_s: float  # audio received after the last stable frame's end
    record: ComputeRecord


@dataclass(frozen=True)
class FinalUnits:
    frame_units: np.ndarray
    reduced_units: np.ndarray
    mode: str
    stable_count: int  # reduced units declared stable before end of turn
    rollback_index: int  # first index where the declared-stable prefix and the final units differ
    revised_stable: int  # stable_count - rollback_index: declared-stable units that turned out wrong
    provisional_divergence: int  # same, for the last provisional sequence including its tentative tail
    stable_frame_agreement: float  # committed provisional frame units == final frame units (fraction)
    record: ComputeRecord


def first_divergence(a: np.ndarray, b: np.ndarray) -> int:
    """First index where `a` and `b` differ (the shorter length if one is a prefix of the other)."""
    a, b = np.asarray(a), np.asarray(b)
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Segment:
    """State of one 100 s chunk of the turn (segment-local frame indices)."""

    start: int  # first sample of the segment in the turn
    frames_done: int = 0  # frames available at the last update
    committed: int = 0  # frames committed (stable)
    tentative: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # running frontend
    conv0_frames: int = 0
    z_sum: torch.Tensor | None = None  # float64 [C]
    z_sumsq: torch.Tensor | None = None
    cnn_frames: int = 0  # frames whose projected CNN features are cached
    proj: torch.Tensor | None = None  # [cached, E]
    proj_start: int = 0  # frame index of proj[0]


class IncrementalUnitExtractor:
    """Feed 16 kHz mono float32 audio with `push`; get provisional units; call `end_of_turn` for final units."""

    def __init__(self, extractor: UnitExtractor, config: IncrementalConfig = IncrementalConfig()):
        self.extractor = extractor
        self.config = config
        self.hubert = extractor.hubert
        self.device = extractor.device
        self.max_chunk = int(self.hubert.max_chunk_samples)
        if self.max_chunk < RECEPTIVE_FIELD or self.max_chunk % HOP:
            raise ValueError(f"chunk size {self.max_chunk} must be a multiple of {HOP} samples")
        self.records: list[ComputeRecord] = []
        self._stats_prior: tuple[float, torch.Tensor, torch.Tensor] | None = None
        self.reset()

    # -- state ---------------------------------------------------------------------------------------------------

    def set_stats_prior(self, count: float, z_sum: torch.Tensor, z_sumsq: torch.Tensor) -> None:
        """Per-channel conv-layer-0 statistics (frames, sum, sum of squares) used as prior by `prior_weight_s`."""
        if count <= 0:
            raise ValueError("stats prior needs a positive frame count")
        self._stats_prior = (float(count), z_sum.to(self.device, torch.float64), z_sumsq.to(self.device, torch.float64))

    def conv0_statistics(self) -> tuple[float, torch.Tensor, torch.Tensor] | None:
        """(frames, sum, sum of squares) of conv layer 0 over the current turn (running frontends only)."""
        seg = self._segment
        return None if seg.z_sum is None else (float(seg.conv0_frames), seg.z_sum.clone(), seg.z_sumsq.clone())

    def reset(self) -> None:
        """Start a new turn (records are kept; the turn's conv0 statistics become the next turn's prior)."""
        previous = self.conv0_statistics() if hasattr(self, "_segment") else None
        if previous is not None and previous[0] >= MIN_PRIOR_CONV0_FRAMES:  # a blip of a turn is no prior
            self._stats_prior = previous
        self._buf = np.zeros(16000 * 4, dtype=np.float32)
        self._n = 0
        self._wave_sum = 0.0
        self._wave_sumsq = 0.0
        self._segment = _Segment(start=0)
        self._committed: list[np.ndarray] = []
        self._stable_reduced: list[int] = []
        self._exact_chunks: dict[int, torch.Tensor] = {}
        self._finished = False
        self.bad_samples = 0  # NaN/Inf samples replaced by 0 (reported, the session goes on)

    @property
    def audio(self) -> np.ndarray:
        """The turn so far (16 kHz mono float32, a view)."""
        return self._buf[: self._n]

    @property
    def stable_reduced_units(self) -> np.ndarray:
        return np.asarray(self._stable_reduced, dtype=np.int64)

    @property
    def stable_frame_units(self) -> np.ndarray:
        return np.concatenate(self._committed) if self._committed else np.zeros(0, dtype=np.int64)

    def provisional_reduced_units(self) -> np.ndarray:
        tail = dedup_units(self._segment.tentative)
        if tail.size and self._stable_reduced and tail[0] == self._stable_reduced[-1]:
            tail = tail[1:]
        return np.concatenate([self.stable_reduced_units, tail])

    # -- input ---------------------------------------------------------------------------------------------------

    def push(self, samples: np.ndarray | torch.Tensor) -> list[ProvisionalUnits]:
        """Append audio (any length); returns the provisional updates this caused (usually 0 or 1)."""
        if self._finished:
            raise RuntimeError("end_of_turn() was called: reset() before pushing a new turn")
        x = samples.detach().cpu().numpy() if torch.is_tensor(samples) else np.asarray(samples)
        if x.ndim != 1:
            raise ValueError(f"push expects 1-D 16 kHz mono samples, got shape {x.shape}")
        x = x.astype(np.float32, copy=False)
        bad = ~np.isfinite(x)
        if bad.any():  # a broken frame must not kill the session: zero it, count it
            self.bad_samples += int(bad.sum())
            x = np.where(bad, np.float32(0.0), x)
        self._append(x)
        events = []
        while True:
            seg = self._segment
            seg_end = seg.start + self.max_chunk
            if self._n >= seg_end:  # the chunk is complete: close it and open the next one
                events.append(self._update(final=True, kind="segment-close"))
                if self.config.finalize_mode == "exact" and self.config.precompute_closed_chunks \
                        and not self.hubert.normalize:
                    self._precompute_exact_chunk(seg.start)
                self._segment = _Segment(start=seg_end)
                continue
            available = num_frames(self._n - seg.start)
            if available - seg.frames_done >= self.config.hop_frames:
                events.append(self._update(final=False, kind="hop"))
            break
        return events

    def _append(self, x: np.ndarray) -> None:
        need = self._n + x.size
        if need > self._buf.size:
            grown = np.zeros(max(need, 2 * self._buf.size), dtype=np.float32)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n:need] = x
        self._n = need
        x64 = x.astype(np.float64)
        self._wave_sum += float(x64.sum())
        self._wave_sumsq += float((x64 * x64).sum())

    # -- the provisional path ------------------------------------------------------------------------------------

    def _wave_norm(self) -> tuple[float, float]:
        """(mean, sqrt(var + 1e-5)) of the turn so far, F.layer_norm's statistics for `normalize` checkpoints."""
        mean = self._wave_sum / max(self._n, 1)
        var = max(self._wave_sumsq / max(self._n, 1) - mean * mean, 0.0)
        return mean, float(np.sqrt(var + 1e-5))

    def _segment_samples(self, seg: _Segment, start: int, stop: int) -> torch.Tensor:
        """Segment-local samples [start, stop) as a float32 [1, 1, n] tensor, waveform-normalised if required."""
        x = torch.from_numpy(self._buf[seg.start + start: seg.start + stop].copy()).to(self.device)
        if self.hubert.normalize:
            mean, std = self._wave_norm()
            x = (x - mean) / std
        return x.view(1, 1, -1)

    def _update_conv0_stats(self, seg: _Segment, seg_samples: int) -> None:
        """Accumulate conv layer 0's per-channel sum / sum of squares over the segment's new conv0 frames."""
        total = 0 if seg_samples < CONV0_KERNEL else (seg_samples - CONV0_KERNEL) // CONV0_STRIDE + 1
        if total <= seg.conv0_frames:
            return
        conv0 = self.hubert.model.feature_extractor.conv_layers[0].conv
        start = seg.conv0_frames * CONV0_STRIDE
        stop = (total - 1) * CONV0_STRIDE + CONV0_KERNEL
        x = torch.from_numpy(self._buf[seg.start + start: seg.start + stop].copy()).to(self.device).view(1, 1, -1)
        z = conv0(x)[0].to(torch.float64)  # raw waveform; a waveform normalisation is applied to the stats later
        if seg.z_sum is None:
            seg.z_sum = torch.zeros(z.shape[0], dtype=torch.float64, device=self.device)
            seg.z_sumsq = torch.zeros_like(seg.z_sum)
        seg.z_sum += z.sum(1)
        seg.z_sumsq += (z * z).sum(1)
        seg.conv0_frames = total

    def _cnn_frames(self, seg: _Segment, first: int, stop: int, use_prior: bool = True) -> torch.Tensor:
        """Projected CNN features [stop-first, E] of segment frames [first, stop) with the running conv0 stats
        (blended with the prior unless `use_prior` is False: at the end of a segment its own statistics are
        complete, exactly the reference's)."""
        layers = self.hubert.model.feature_extractor.conv_layers
        gn = layers[0].layer_norm
        x = self._segment_samples(seg, first * HOP, (stop - 1) * HOP + RECEPTIVE_FIELD)
        count, z_sum, z_sumsq = float(seg.conv0_frames), seg.z_sum, seg.z_sumsq
        prior = self._stats_prior
        if use_prior and prior is not None and self.config.prior_weight_s > 0:
            # the prior counts as prior_weight_s of audio: it steadies the first hops, then the turn dominates
            weight = self.config.prior_weight_s * 16000 / CONV0_STRIDE
            p_count, p_sum, p_sumsq = prior
            scale = weight / p_count
            count, z_sum, z_sumsq = count + weight, z_sum + scale * p_sum, z_sumsq + scale * p_sumsq
        mean = z_sum / count
        var = (z_sumsq / count - mean * mean).clamp_min(0.0)
        if self.hubert.normalize:  # conv0 has no bias: z(ax + b) = a z(x) + b sum(w)
            mu, std = self._wave_norm()
            wsum = layers[0].conv.weight.sum(dim=(1, 2)).to(torch.float64)
            mean, var = (mean - mu * wsum) / std, var / (std * std)
        scale = gn.weight.to(torch.float64) / torch.sqrt(var + gn.eps)
        shift = gn.bias.to(torch.float64) - mean * scale
        h = layers[0].conv(x)
        h = layers[0].activation(h * scale.to(h.dtype)[None, :, None] + shift.to(h.dtype)[None, :, None])
        for layer in layers[1:]:
            h = layer(h)
        out = self.hubert.model.feature_projection(h.transpose(1, 2))
        out = out[0] if isinstance(out, tuple) else out
        return out[0]

    def _encode(self, frames: torch.Tensor) -> torch.Tensor:
        out = self.hubert.model.encoder(frames[None])
        return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])[0]

    @torch.inference_mode()
    def _update(self, final: bool, kind: str) -> ProvisionalUnits:
        cfg, seg = self.config, self._segment
        seg_samples = min(self._n, seg.start + self.max_chunk) - seg.start
        total = num_frames(seg_samples)
        c0 = seg.committed
        w0 = max(0, c0 - cfg.left_frames)
        _sync(self.device)
        t0 = time.perf_counter()
        new_frames = 0
        hidden = None
        if total > c0:
            if cfg.frontend in ("running", "refresh"):
                self._update_conv0_stats(seg, seg_samples)
                if cfg.frontend == "refresh" and kind != "finalize-approximate" and w0 < seg.cnn_frames:
                    # recompute the whole window's CNN frames with the current statistics (the cache then holds
                    # the latest version; the approximate finalize reuses it and computes only new frames)
                    seg.proj = self._cnn_frames(seg, w0, total, use_prior=not final)
                    seg.proj_start, seg.cnn_frames = w0, total
                    new_frames = total - w0
                if total > seg.cnn_frames:
                    new = self._cnn_frames(seg, seg.cnn_frames, total, use_prior=not final)
                    new_frames += total - seg.cnn_frames
                    seg.proj = new if seg.proj is None else torch.cat([seg.proj, new], dim=0)
                    seg.cnn_frames = total
                window = seg.proj[w0 - seg.proj_start: total - seg.proj_start]
                _sync(self.device)
                t1 = time.perf_counter()
                hidden = self._encode(window)
            else:
                # all received samples: the reference's GroupNorm also sees the samples after the last full frame
                x = self._segment_samples(seg, w0 * HOP, seg_samples)
                t1 = time.perf_counter()
                hidden = self.hubert.model(x.view(1, -1)).last_hidden_state[0]
            hidden = hidden[c0 - w0:]
        else:
            t1 = time.perf_counter()
        _sync(self.device)
        t2 = time.perf_counter()
        units = self.extractor.kmeans.assign(hidden) if hidden is not None else np.zeros(0, dtype=np.int64)
        t3 = time.perf_counter()

        commit_to = total if final else max(c0, total - cfg.right_frames)
        newly = units[: commit_to - c0]
        seg.tentative = units[commit_to - c0:]
        seg.committed = commit_to
        seg.frames_done = total
        if cfg.frontend != "window" and seg.proj is not None:  # keep only what future windows can reach
            keep_from = max(0, commit_to - cfg.left_frames)
            if keep_from > seg.proj_start:
                seg.proj = seg.proj[keep_from - seg.proj_start:]
                seg.proj_start = keep_from
        stable_before = len(self._stable_reduced)
        if newly.size:
            self._committed.append(newly)
            values = run_lengths(newly)[0]
            if self._stable_reduced and values[0] == self._stable_reduced[-1]:
                values = values[1:]
            self._stable_reduced.extend(int(v) for v in values)

        record = ComputeRecord(kind, self._n / 16000.0, new_frames, total - w0 if total > c0 else 0, int(newly.size),
                               t1 - t0, t2 - t1, t3 - t2, t3 - t0)
        self.records.append(record)
        stable_frames = sum(a.size for a in self._committed)
        stable_end = (seg.start + (commit_to - 1) * HOP + RECEPTIVE_FIELD) if commit_to else seg.start
        return ProvisionalUnits(
            reduced_units=self.provisional_reduced_units(),
            stable_count=len(self._stable_reduced),
            new_stable=self.stable_reduced_units[stable_before:],
            frame_units=np.concatenate([self.stable_frame_units, seg.tentative]),
            stable_frames=stable_frames,
            audio_seconds=self._n / 16000.0,
            stable_lag_s=max(0, self._n - stable_end) / 16000.0,
            record=record,
        )

    @torch.inference_mode()
    def _precompute_exact_chunk(self, start: int) -> None:
        """Exact features of the completed chunk at `start` (identical to what the reference computes for it)."""
        _sync(self.device)
        t0 = time.perf_counter()
        chunk = self.hubert.prepare(self._buf[start: start + self.max_chunk])
        self._exact_chunks[start] = self.hubert.chunk_features(chunk)
        _sync(self.device)
        dt = time.perf_counter() - t0
        self.records.append(ComputeRecord("exact-chunk", self._n / 16000.0, 0, num_frames(self.max_chunk), 0,
                                          0.0, dt, 0.0, dt))

    # -- end of turn ---------------------------------------------------------------------------------------------

    def end_of_turn(self, mode: Literal["exact", "approximate"] | None = None) -> FinalUnits:
        """Final units of the turn. exact: the reference extraction (bit for bit); approximate: finish the tail."""
        if self._finished:
            raise RuntimeError("end_of_turn() was already called for this turn")
        mode = mode or self.config.finalize_mode
        if mode not in ("exact", "approximate"):
            raise ValueError(f"mode must be 'exact' or 'approximate', got {mode!r}")
        stable = self.stable_reduced_units
        stable_frames = self.stable_frame_units
        provisional = self.provisional_reduced_units()
        if mode == "exact":
            _sync(self.device)
            t0 = time.perf_counter()
            if self._n < RECEPTIVE_FIELD:  # the reference refuses < 25 ms; a turn that short has no units
                frame_units = np.zeros(0, dtype=np.int64)
                hub = km = 0.0
            else:
                cache = self._exact_chunks if not self.hubert.normalize else None
                result = self.extractor.extract_detailed(self.audio, dedup=False, chunk_cache=cache)
                frame_units = result.frame_units
                hub, km = result.timings.hubert_s, result.timings.kmeans_s
            reduced = dedup_units(frame_units)
            total_s = time.perf_counter() - t0
            record = ComputeRecord("finalize-exact", self._n / 16000.0, 0, frame_units.size, 0, 0.0, hub, km, total_s)
            self.records.append(record)
        else:
            t0 = time.perf_counter()
            last = self._update(final=True, kind="finalize-approximate").record
            frame_units = self.stable_frame_units
            reduced = self.stable_reduced_units
            total_s = time.perf_counter() - t0
            record = ComputeRecord("finalize-approximate", last.audio_end_s, last.new_frames, last.window_frames,
                                   last.committed_frames, last.frontend_s, last.encoder_s, last.kmeans_s, total_s)
            self.records[-1] = record
        self._finished = True
        rollback = first_divergence(stable, reduced)
        n = min(stable_frames.size, frame_units.size)
        agreement = float((stable_frames[:n] == frame_units[:n]).mean()) if n else float("nan")
        return FinalUnits(
            frame_units=frame_units,
            reduced_units=reduced,
            mode=mode,
            stable_count=int(stable.size),
            rollback_index=rollback,
            revised_stable=int(stable.size) - rollback,
            provisional_divergence=first_divergence(provisional, reduced),
            stable_frame_agreement=agreement,
            record=record,
        )
