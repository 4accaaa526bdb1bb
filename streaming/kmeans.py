"""k-means 1000 unit assignment (mHuBERT L11 km1000) without scikit-learn at run time.

The release file `mhubert_base_vp_en_es_fr_it3_L11_km1000.bin` is a joblib pickle of an sklearn `MiniBatchKMeans`;
only `cluster_centers_` ([1000, 768] float32) is used. It is read with a restricted joblib unpickler: the
estimator class becomes an inert stand-in (no sklearn import, no code from the file runs), arrays are allowed,
object arrays and every other global are refused. `centers.npy` is the converted format.

Assignment = fairseq `ApplyKmeans`: argmin_k ||x||^2 - 2 x.c_k + ||c_k||^2 in fp32 (= sklearn `predict` up to
ties). Dedup = run-length collapse of consecutive identical ids ("reduced units").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from streaming.fairseq_pickle import InertStandIn, UnpicklingRefused, is_standin, resolve_global, standin_class
from streaming.load_errors import unreadable

CENTERS_FILE = "centers.npy"
NUM_UNITS = 1000

# Estimator classes a unit k-means file may contain (replaced by stand-ins; only their state is read).
_KMEANS_CLASSES = {("sklearn.cluster._kmeans", "MiniBatchKMeans"), ("sklearn.cluster._kmeans", "KMeans"),
                   ("sklearn.cluster.k_means_", "MiniBatchKMeans"), ("sklearn.cluster.k_means_", "KMeans")}


class KMeansQuantizer:
    """Nearest-centre assignment in fp32 on a torch device."""

    def __init__(self, centers: np.ndarray, device: str | torch.device = "cpu", source: str = "<centers>"):
        centers = np.asarray(centers)
        if centers.ndim != 2 or centers.shape[0] < 1:
            raise ValueError(f"{source}: cluster centres must be [K, D], got shape {centers.shape}")
        if not np.all(np.isfinite(centers)):
            raise ValueError(f"{source}: cluster centres contain NaN/Inf")
        self.source = source
        self.centers = np.ascontiguousarray(centers, dtype=np.float32)
        self.device = torch.device(device)
        self._centers_t = torch.from_numpy(self.centers).to(self.device)  # [K, D]
        self._centers_sq = (self._centers_t ** 2).sum(1)  # [K]

    @property
    def num_units(self) -> int:
        return int(self.centers.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centers.shape[1])

    @torch.inference_mode()
    def assign(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """Unit ids (int64 [T]) of features [T, D]."""
        x = features if torch.is_tensor(features) else torch.from_numpy(np.asarray(features, dtype=np.float32))
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must be [T, {self.dim}] for {self.source}, got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return np.zeros(0, dtype=np.int64)
        x = x.to(device=self._centers_t.device, dtype=torch.float32)
        dist = (x ** 2).sum(1, keepdim=True) - 2.0 * (x @ self._centers_t.T) + self._centers_sq[None, :]
        return dist.argmin(dim=1).to("cpu", torch.int64).numpy()


def run_lengths(units: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths) of the runs of identical consecutive ids."""
    units = np.asarray(units, dtype=np.int64).reshape(-1)
    if units.size == 0:
        return units.copy(), np.zeros(0, dtype=np.int64)
    starts = np.concatenate([[0], np.flatnonzero(units[1:] != units[:-1]) + 1])
    lengths = np.diff(np.concatenate([starts, [units.size]]))
    return units[starts], lengths.astype(np.int64)


def dedup_units(units: np.ndarray) -> np.ndarray:
    """Reduced units: consecutive duplicates collapsed (durations dropped), as SpeechGPT's prompt uses them."""
    return run_lengths(units)[0]


# ----------------------------------------------------------------------------------------------------------------
# Loading


# An estimator fitted with random_state=RandomState(...) pickles that generator: numpy's own constructors for it
# only build an RNG from a named bit generator and its state.
_NUMPY_RNG_GLOBALS = {("numpy.random._pickle", "__randomstate_ctor"), ("numpy.random._pickle", "__bit_generator_ctor"),
                      ("numpy.random._pickle", "__generator_ctor"), ("numpy.random._mt19937", "MT19937"),
                      ("numpy.random.mtrand", "RandomState"), ("numpy.random", "__RandomState_ctor")}


def _joblib_find_class(module: str, name: str, source: str) -> Any:
    if (module, name) in _KMEANS_CLASSES:
        return standin_class(module, name)
    if (module, name) in _NUMPY_RNG_GLOBALS:
        import importlib

        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise UnpicklingRefused(module, name, source) from exc
    if (module, name) == ("joblib.numpy_pickle", "NumpyArrayWrapper"):
        return _safe_array_wrapper()
    obj = resolve_global(module, name, source)  # the checkpoint allow-list (numpy arrays, inert builtins...)
    if isinstance(obj, type) and issubclass(obj, InertStandIn):  # fairseq/omegaconf have no business here
        raise UnpicklingRefused(module, name, source)
    return obj


_SAFE_WRAPPER: type | None = None


def _safe_array_wrapper() -> type:
    """joblib's array placeholder, refusing object arrays (joblib would read those with plain pickle.load)."""
    global _SAFE_WRAPPER
    if _SAFE_WRAPPER is None:
        from joblib.numpy_pickle import NumpyArrayWrapper

        class SafeNumpyArrayWrapper(NumpyArrayWrapper):
            def read(self, unpickler, *args, **kwargs):
                if np.dtype(self.dtype).hasobject:
                    raise UnpicklingRefused("numpy", "object array", getattr(unpickler, "filename", "<joblib>"))
                return super().read(unpickler, *args, **kwargs)

        _SAFE_WRAPPER = SafeNumpyArrayWrapper
    return _SAFE_WRAPPER


def _restricted_joblib_load(path: Path) -> Any:
    import inspect

    import joblib.numpy_pickle as jnp

    source = str(path)

    class RestrictedNumpyUnpickler(jnp.NumpyUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            return _joblib_find_class(module, name, source)

    takes_byte_order = "ensure_native_byte_order" in inspect.signature(jnp.NumpyUnpickler.__init__).parameters
    with open(path, "rb") as raw:
        with jnp._validate_fileobject_and_memmap(raw, source, None) as opened:
            fobj = opened[0] if isinstance(opened, tuple) else opened
            if takes_byte_order:
                unpickler = RestrictedNumpyUnpickler(source, fobj, True)
            else:  # pragma: no cover - joblib < 1.4
                unpickler = RestrictedNumpyUnpickler(source, fobj)
            return unpickler.load()


def centers_from_joblib(path: str | Path) -> np.ndarray:
    """`cluster_centers_` of a joblib-pickled sklearn (MiniBatch)KMeans, read without importing sklearn."""
    path = Path(path)
    try:
        obj = _restricted_joblib_load(path)
    except UnpicklingRefused:
        raise
    except Exception as exc:  # corrupt / not a joblib pickle
        raise unreadable(path, "joblib k-means pickle", exc) from exc
    if not is_standin(obj):
        raise ValueError(f"{path}: expected a pickled sklearn KMeans/MiniBatchKMeans, got {type(obj).__name__}")
    centers = obj.standin_dict.get("cluster_centers_")
    if not isinstance(centers, np.ndarray):
        raise ValueError(f"{path}: the k-means object has no cluster_centers_ array (was it fitted?)")
    return centers


def load_kmeans(path: str | Path, device: str | torch.device = "cpu") -> KMeansQuantizer:
    """The release joblib `.bin`, a `centers.npy`, or a directory holding `centers.npy`."""
    path = Path(path)
    if path.is_dir():
        path = path / CENTERS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no k-means file (.bin joblib pickle or {CENTERS_FILE}) here")
    if path.suffix == ".npy":
        try:
            centers = np.load(path, allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:  # numpy's messages do not name the file
            raise unreadable(path, ".npy array file", exc) from exc
    else:
        centers = centers_from_joblib(path)
    return KMeansQuantizer(centers, device, source=str(path))


def save_converted_kmeans(quantizer: KMeansQuantizer | np.ndarray, out_dir: str | Path) -> Path:
    """Write `centers.npy` (float32 [K, D]) into `out_dir`; returns its path."""
    centers = quantizer.centers if isinstance(quantizer, KMeansQuantizer) else np.asarray(quantizer, np.float32)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / CENTERS_FILE
    np.save(out, np.ascontiguousarray(centers, dtype=np.float32), allow_pickle=False)
    return out
