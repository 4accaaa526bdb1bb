"""k-means units: the joblib release format read without sklearn, assignment = sklearn predict, dedup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch

from streaming.fairseq_pickle import UnpicklingRefused
from streaming.kmeans import (
    KMeansQuantizer,
    dedup_units,
    load_kmeans,
    run_lengths,
    save_converted_kmeans,
)
from streaming.tiny_parts import tiny_centers, write_tiny_kmeans

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def km_file(tmp_path_factory) -> Path:
    return write_tiny_kmeans(tmp_path_factory.mktemp("km") / "tiny_km1000.bin", seed=3, dim=48)


def test_release_format_loads_to_the_centres(km_file):
    quantizer = load_kmeans(km_file)
    assert quantizer.centers.shape == (1000, 48) and quantizer.centers.dtype == np.float32
    assert np.array_equal(quantizer.centers, tiny_centers(3, 48))
    estimator = joblib.load(km_file)  # it really is a joblib-pickled sklearn MiniBatchKMeans
    assert type(estimator).__name__ == "MiniBatchKMeans"
    assert np.array_equal(estimator.cluster_centers_, quantizer.centers)


@pytest.mark.parametrize("case", [(0, 500, 1.0, 0.0), (1, 64, 0.3, 0.0), (2, 1000, 0.5, 2.0), (3, 1, 1.0, 0.0)])
def test_assignment_equals_sklearn_predict(km_file, case):
    seed, frames, scale, offset = case
    features = (scale * np.random.default_rng(seed).standard_normal((frames, 48)) + offset).astype(np.float32)
    expected = joblib.load(km_file).predict(features)
    quantizer = load_kmeans(km_file)
    assert np.array_equal(quantizer.assign(features), expected)
    assert np.array_equal(quantizer.assign(torch.from_numpy(features)), expected)
    # and the float64 brute-force nearest centre
    d = ((features[:, None, :].astype(np.float64) - quantizer.centers[None].astype(np.float64)) ** 2).sum(-1)
    assert np.array_equal(quantizer.assign(features), d.argmin(1))


def test_assign_checks_shapes(km_file):
    quantizer = load_kmeans(km_file)
    with pytest.raises(ValueError, match=r"\[T, 48\]"):
        quantizer.assign(np.zeros((4, 47), dtype=np.float32))
    assert quantizer.assign(np.zeros((0, 48), dtype=np.float32)).shape == (0,)


def test_converted_centres_roundtrip(km_file, tmp_path):
    quantizer = load_kmeans(km_file)
    out = save_converted_kmeans(quantizer, tmp_path / "conv")
    assert out.name == "centers.npy"
    features = np.random.default_rng(8).standard_normal((300, 48)).astype(np.float32)
    for source in (out, out.parent):
        converted = load_kmeans(source)
        assert np.array_equal(converted.centers, quantizer.centers)
        assert np.array_equal(converted.assign(features), quantizer.assign(features))


def test_loading_needs_no_sklearn(km_file):
    script = textwrap.dedent(f"""
        import json, sys
        from streaming.kmeans import load_kmeans
        q = load_kmeans({str(km_file)!r})
        print(json.dumps({{"sklearn": any(m.split(".")[0] == "sklearn" for m in sys.modules), "k": q.num_units}}))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"sklearn": False, "k": 1000}


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_foreign_globals_in_a_joblib_file_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    joblib.dump({"cluster_centers_": np.zeros((2, 2), np.float32), "x": _Evil(marker)}, path)
    with pytest.raises(UnpicklingRefused, match=r"posix\.system|os\.system") as info:
        load_kmeans(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_object_arrays_in_a_joblib_file_are_refused(tmp_path):
    path = tmp_path / "objects.bin"
    joblib.dump(np.array([{"a": 1}, None], dtype=object), path)
    with pytest.raises(UnpicklingRefused, match="object array"):
        load_kmeans(path)


def test_bad_files_name_themselves(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="garbage.bin"):
        load_kmeans(garbage)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_kmeans(tmp_path / "missing.bin")
    not_kmeans = tmp_path / "dict.bin"
    joblib.dump({"a": 1}, not_kmeans)
    with pytest.raises(ValueError, match="dict.bin"):
        load_kmeans(not_kmeans)
    with pytest.raises(ValueError, match="NaN"):
        KMeansQuantizer(np.full((3, 2), np.nan, np.float32))


@pytest.mark.parametrize(
    "units, values, lengths",
    [
        ([5, 5, 7, 7, 7, 5, 9], [5, 7, 5, 9], [2, 3, 1, 1]),
        ([1], [1], [1]),
        ([], [], []),
        ([3, 3, 3], [3], [3]),
        ([0, 1, 0, 1], [0, 1, 0, 1], [1, 1, 1, 1]),
    ],
)
def test_run_lengths_and_dedup(units, values, lengths):
    got_values, got_lengths = run_lengths(np.array(units, dtype=np.int64))
    assert got_values.tolist() == values and got_lengths.tolist() == lengths
    assert dedup_units(np.array(units, dtype=np.int64)).tolist() == values
    assert got_values.dtype == np.int64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dedup_properties(seed):
    units = np.random.default_rng(seed).integers(0, 4, size=200)
    values, lengths = run_lengths(units)
    assert np.array_equal(np.repeat(values, lengths), units)
    assert np.all(values[1:] != values[:-1])
    assert np.array_equal(dedup_units(units), values)


def test_estimator_with_a_random_state_object_loads(tmp_path):
    from sklearn.cluster import MiniBatchKMeans

    data = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    km = MiniBatchKMeans(n_clusters=8, n_init=1, random_state=np.random.RandomState(0), batch_size=32).fit(data)
    path = tmp_path / "rng.bin"
    joblib.dump(km, path)
    assert np.array_equal(load_kmeans(path).centers, km.cluster_centers_)
