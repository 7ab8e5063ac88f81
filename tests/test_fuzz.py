"""Fuzzing the edges a user's files and options reach: every case ends in success or the documented one-line error
(naming the file, key or option) within a time bound; never another exception, a hang or a partial output file.

Cases and the distinct errors reached are counted; `pytest -s tests/test_fuzz.py` prints them, and
CALOFM_FUZZ_REPORT=FILE writes them as JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from calofm.config import ConfigError, RunConfig, load_config
from calofm.data.formats import ShowerFormatError, Showers, convert, open_showers, write_showers
from calofm.train.checkpoint import damage, resume_point

FUZZ = settings(max_examples=100, deadline=5000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CASES: Counter = Counter()
ERRORS: set[str] = set()


def record(kind: str, error: BaseException | None = None) -> None:
    CASES[kind] += 1
    if error is not None:  # numbers, quoted values and paths vary; the message's kind does not
        ERRORS.add(re.sub(r"'[^']*'|\"[^\"]*\"|/\S+|-?\d[\d.e+-]*", "_", str(error).splitlines()[0])[:120])


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    report = {"cases": dict(CASES), "total": sum(CASES.values()), "distinct_errors": sorted(ERRORS)}
    print(f"\nfuzz: {report['total']} cases {dict(CASES)}, {len(ERRORS)} distinct error messages:")
    for e in report["distinct_errors"]:
        print("  ", e)
    if os.environ.get("CALOFM_FUZZ_REPORT"):
        Path(os.environ["CALOFM_FUZZ_REPORT"]).write_text(json.dumps(report, indent=1))


def showers(n: int, seed: int = 0) -> Showers:
    rng = np.random.default_rng(seed)
    x = rng.exponential(1.0, (n, 9, 16, 45)) * (rng.random((n, 9, 16, 45)) < 0.2)
    return Showers(x, rng.uniform(1e3, 1e5, n), rng.uniform(0, 6.28, n), rng.uniform(0.9, 2.2, n))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-files")
    out = {}
    for fmt in ("lemurs", "calochallenge"):
        out[fmt] = d / f"{fmt}.h5"
        write_showers(out[fmt], showers(70), fmt=fmt, attrs={"detector": "odd"})
    return out


def read_all(path: Path, kind: str) -> None:
    """Read every shower, or fail with an error that names the file."""
    try:
        with open_showers(path) as f:
            for _ in f.iter_chunks(32):
                pass
        record(kind)
    except (ShowerFormatError, OSError) as e:
        assert str(path) in str(e), e
        record(kind, e)


@FUZZ
@given(fmt=st.sampled_from(["lemurs", "calochallenge"]), data=st.data())
def test_damaged_shower_files(files, tmp_path, fmt, data):
    raw = bytearray(files[fmt].read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= data.draw(st.integers(1, 255))
    path = tmp_path / f"damaged-{fmt}.h5"
    path.write_bytes(bytes(raw))
    read_all(path, f"shower file, {how}")
    dst = tmp_path / "converted.h5"
    dst.unlink(missing_ok=True)
    try:
        convert(path, dst, "lemurs" if fmt == "calochallenge" else "calochallenge")
    except (ShowerFormatError, OSError) as e:
        assert not dst.exists(), "a failed conversion left an output file"
        assert str(path) in str(e), e
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".converted")], "temporary file left"


VALUES = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True, width=32),
                   st.booleans(), st.none(), st.text(max_size=5))


@FUZZ
@given(fmt=st.sampled_from(["lemurs", "calochallenge"]), key=st.sampled_from(["showers", "energy", "phi", "theta"]),
       n=st.integers(0, 4), shape_tail=st.lists(st.integers(0, 50), max_size=3),
       dtype=st.sampled_from(["f4", "f8", "i4", "u1", "S3"]), value=VALUES)
def test_random_shapes_dtypes_and_values(tmp_path, fmt, key, n, shape_tail, dtype, value):
    """Each dataset of a valid file replaced by one of random shape, dtype and fill (NaN, inf, negatives, ...)."""
    path = tmp_path / f"random-{fmt}.h5"
    write_showers(path, showers(4), fmt=fmt, attrs={"detector": "odd"})
    with h5py.File(path, "r+") as h5:
        name = {"showers": "showers", "energy": "incident_energy" if fmt == "lemurs" else "incident_energies",
                "phi": "incident_phi", "theta": "incident_theta"}[key]
        if name not in h5:
            return
        del h5[name]
        fill = 0 if value is None or isinstance(value, str) and dtype != "S3" else value
        try:
            with np.errstate(invalid="ignore", over="ignore"):
                h5[name] = np.full((n, *shape_tail), fill).astype(dtype)
        except (ValueError, OverflowError, TypeError):
            h5[name] = np.zeros((n, *shape_tail), dtype)
    read_all(path, "random dataset")


@FUZZ
@given(fmt=st.sampled_from(["lemurs", "calochallenge"]), key=st.sampled_from(["showers", "energy", "phi", "theta"]),
       index=st.integers(0, 3), value=st.floats(allow_nan=True, allow_infinity=True, width=32))
def test_random_values_in_valid_files(tmp_path, fmt, key, index, value):
    """One entry of a valid file set to any float (NaN, inf, negative, out of the detector's range)."""
    path = tmp_path / f"values-{fmt}.h5"
    write_showers(path, showers(4), fmt=fmt, attrs={"detector": "odd"})
    with h5py.File(path, "r+") as h5:
        name = {"showers": "showers", "energy": "incident_energy" if fmt == "lemurs" else "incident_energies",
                "phi": "incident_phi", "theta": "incident_theta"}[key]
        data = h5[name][()]
        data.reshape(len(data), -1)[index, 0] = value
        h5[name][...] = data
    read_all(path, "random value")


def _schema(cls=RunConfig, prefix=""):
    import dataclasses

    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            yield from _schema(f.default_factory, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


KEYS = sorted(_schema()) + ["train.nonsense", "nosection.key", "train"]


@FUZZ
@given(key=st.sampled_from(KEYS), value=st.one_of(VALUES.map(repr), st.sampled_from(
    ["-3", "0", "1e8", "nan", "-inf", "[1, 2]", "[]", "{a: 1}", "abc", "true", "''", "1e-4", "0.999"])))
def test_random_set_values(key, value):
    """`--set key=value`: a valid config, or a ConfigError naming the key."""
    try:
        load_config(None, [f"{key}={value}"])
        record("--set")
    except ConfigError as e:
        assert key.split(".")[-1] in str(e) or key.split(".")[0] in str(e), (key, value, e)
        record("--set", e)


@pytest.fixture(scope="module")
def checkpoint_run(data_dir, tmp_path_factory):
    from calofm.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("fuzz-ckpt")
    cfg = load_config(None, [f"data.dir={data_dir}", f"output_dir={out}", "train.steps=4", "train.batch_size=4",
                             "train.checkpoint_every=2", "train.keep_checkpoints=2", "model.patch=[3,4,5]"])
    pretrain(cfg)
    return out


@FUZZ
@given(data=st.data())
def test_damaged_checkpoints_are_detected_and_passed_over(checkpoint_run, tmp_path, data):
    out = tmp_path / "run"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(checkpoint_run / "checkpoints", out / "checkpoints")
    newest = out / "checkpoints" / "step_0000004"
    name = data.draw(st.sampled_from(sorted(p.name for p in newest.iterdir())))
    raw = bytearray((newest / name).read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip", "delete"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    if how == "delete":
        (newest / name).unlink()
    else:
        (newest / name).write_bytes(bytes(raw))
    reason = damage(newest)
    if reason is None:  # only a change that leaves the manifest's content as it was may pass (JSON whitespace)
        assert name == "manifest.json" and how == "flip"
        assert json.loads(raw) == json.loads((checkpoint_run / "checkpoints" / "step_0000004" / name).read_text())
        record(f"checkpoint, {how}, harmless")
        return
    said = []
    assert resume_point(out, say=said.append) == out / "checkpoints" / "step_0000002"
    assert reason in said[0] and str(newest) in said[0]
    record(f"checkpoint, {how}", ValueError(reason))
