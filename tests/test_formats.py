"""LEMURS / CaloChallenge-DS2 files: round trips, layout, streaming, validation, inspect summary and CLI."""

from __future__ import annotations

import math
import re

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from calofm.cli import app
from calofm.data.formats import (
    ShowerFile,
    ShowerFormatError,
    Showers,
    convert,
    open_showers,
    read_showers,
    write_calochallenge,
    write_lemurs,
    write_showers,
)
from calofm.data.inspect import PLOTS, summarize
from calofm.geometry import N_CELLS, THRESHOLD_MEV

N = 20
FIELDS = ("showers", "energy", "phi", "theta")


def make_showers(n: int = N, seed: int = 0, emax: float = 1e6) -> Showers:
    rng = np.random.default_rng(seed)
    x = rng.exponential(1.0, (n, 9, 16, 45)) * (rng.random((n, 9, 16, 45)) < 0.3)
    return Showers(x, rng.uniform(1e3, emax, n), rng.uniform(0, 2 * math.pi, n), rng.uniform(0.87, 2.27, n))


def assert_equal(a: Showers, b: Showers) -> None:
    for k in FIELDS:
        assert getattr(a, k).dtype == np.float32
        assert np.array_equal(getattr(a, k), getattr(b, k)), k


ATTRS = {"detector": "odd", "synthetic": True, "generator": "GFlash-parametrised stand-in, not Geant4"}


@pytest.fixture
def lemurs(tmp_path):
    s = make_showers()
    path = tmp_path / "odd.h5"
    write_lemurs(path, s, ATTRS)
    return path, s


def test_lemurs_round_trip(lemurs):
    path, s = lemurs
    with open_showers(path) as f:
        assert (f.format, f.detector, len(f), f.attrs) == ("lemurs", "odd", N, ATTRS)
        assert_equal(f.read(), s)
        assert_equal(f.read(3, 11), s[3:11])
        assert_equal(f.read(-4), s[16:])
    assert_equal(read_showers(path), s)


def test_lemurs_calochallenge_round_trip_is_bit_exact(lemurs, tmp_path):
    path, s = lemurs
    convert(path, tmp_path / "cc.h5", to="calochallenge")
    convert(tmp_path / "cc.h5", tmp_path / "back.h5", to="lemurs")
    for p, fmt in ((tmp_path / "cc.h5", "calochallenge"), (tmp_path / "back.h5", "lemurs")):
        with open_showers(p) as f:
            assert (f.format, f.attrs) == (fmt, ATTRS)
            assert_equal(f.read(), s)
    with h5py.File(path) as a, h5py.File(tmp_path / "back.h5") as b:
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k][:], b[k][:])


def test_pointcloud_round_trip_is_exact_and_hits_sit_at_cell_centres(lemurs, tmp_path):
    """LEMURS -> point cloud -> LEMURS in chunks smaller than the file (the hits dimension grows as showers with
    more hits arrive): every cell and condition bit-exact, so the total energy is too; `events` holds one hit per
    lit cell at its centre, then zero padding."""
    path, s = lemurs
    convert(path, tmp_path / "pc.h5", to="pointcloud", chunk_size=3)
    convert(tmp_path / "pc.h5", tmp_path / "back.h5", to="lemurs")
    with open_showers(tmp_path / "pc.h5") as f:
        assert (f.format, f.attrs) == ("pointcloud", ATTRS)
        assert_equal(f.read(), s)
        assert_equal(f.read_indices([7, 2, 7]), s[[7, 2, 7]])
    assert_equal(read_showers(tmp_path / "back.h5"), s)
    lit = (s.showers > 0).reshape(N, -1).sum(1)
    with h5py.File(tmp_path / "pc.h5") as h5:
        events = h5["events"][:]
    assert events.shape == (N, 4, lit.max()) and events.dtype == np.float32
    assert ((events[:, 3] > 0).sum(1) == lit).all()  # hits first, then only padding
    assert (events[:, 3].sum(1, dtype=np.float64) == s.showers.reshape(N, -1).sum(1, dtype=np.float64)).all()
    r, phi, z = np.argwhere(s.showers[0] > 0)[-1]  # that cell's hit: x = r cos(phi), y = r sin(phi), at its centre
    hit = events[0, :, lit[0] - 1]  # the last hit in (r, phi, z) order
    rc, phic = (r + 0.5) * 4.65, (phi + 0.5) * math.pi / 8
    assert hit == pytest.approx([rc * math.cos(phic), rc * math.sin(phic), (z + 0.5) * 3.4, s.showers[0, r, phi, z]],
                                rel=1e-6, abs=1e-5)


def test_points_anywhere_in_a_cell_are_summed_there_and_points_outside_are_refused(tmp_path):
    from calofm.data.pointcloud import from_points

    events = np.zeros((2, 4, 3), np.float32)
    events[0, :, 0] = [0.1, 0.1, 0.2, 1.0]        # r 0.14 mm, phi pi/4, z 0.2 mm: cell (0, 2, 0)
    events[0, :, 1] = [0.5, 0.6, 3.3, 2.5]        # the same cell
    events[1, :, 0] = [-20.0, -0.5, 152.0, 4.0]   # r 20.0 mm -> 4, phi 3.17 rad -> 8, z 152 mm -> 44
    x = from_points(events)
    assert x[0, 0, 2, 0] == 3.5 and x[1, 4, 8, 44] == 4.0 and x.sum() == 7.5
    events[1, :, 1] = [0.0, 50.0, 1.0, 1.0]       # r 50 mm: beyond the 9 x 4.65 mm mesh
    with pytest.raises(ValueError, match=r"E: shower 1, hit 1 at \(x, y, z\) = \(0, 50, 1\) mm lies outside the mesh"):
        from_points(events, "E")
    s = make_showers(2)
    write_showers(tmp_path / "pc.h5", s, "pointcloud", ATTRS)
    with h5py.File(tmp_path / "pc.h5", "a") as h5:
        h5["events"][1, 2, 0] = -1.0               # a hit in front of the calorimeter
    with open_showers(tmp_path / "pc.h5") as f, pytest.raises(ShowerFormatError, match=r"pc.h5: key 'events': "
                                                                 r"shower 1, hit 0 .* lies outside the mesh"):
        f.read()


def test_particle_codes_round_trip_every_format_and_a_file_without_them_holds_photons(tmp_path):
    s = make_showers()
    s.pdg = np.resize(np.array([22, 11, 211], np.int32), N)
    write_lemurs(tmp_path / "a.h5", s, ATTRS)
    for fmt in ("calochallenge", "pointcloud", "lemurs"):
        convert(tmp_path / "a.h5", tmp_path / f"{fmt}.h5", to=fmt)
        assert np.array_equal(read_showers(tmp_path / f"{fmt}.h5").pdg, s.pdg)
    with h5py.File(tmp_path / "a.h5", "a") as h5:
        del h5["incident_pdg"]
    assert (read_showers(tmp_path / "a.h5").pdg == 22).all()
    s.pdg[3] = 2212
    with pytest.raises(ShowerFormatError, match=r"b.h5: incident_pdg\[3\] = 2212 is not a known particle's PDG code; "
                                                r"known: 22 \(photon\), 11 \(electron\), 211 \(pion\)"):
        write_lemurs(tmp_path / "b.h5", s, ATTRS)
    assert not (tmp_path / "b.h5").exists()


def test_calochallenge_layout(tmp_path):
    s = make_showers()
    path = tmp_path / "cc.h5"
    write_calochallenge(path, s, {"detector": "par04_siw"})
    with h5py.File(path) as f:
        layout = {k: (f[k].shape, f[k].dtype) for k in f}
        assert layout == {
            "incident_energies": ((N, 1), np.float64),
            "showers": ((N, N_CELLS), np.float32),
            "incident_phi": ((N,), np.float32),
            "incident_theta": ((N,), np.float32),
            "incident_pdg": ((N,), np.int32),  # calofm's writers always say which particle; absent: photons
        }
        assert f["showers"].compression == "gzip" and f["showers"].chunks[0] <= 256
        flat = f["showers"][:]
        i, r, phi, z = 7, 5, 11, 33
        assert flat[i, z * 144 + phi * 9 + r] == s.showers[i, r, phi, z]
        assert np.array_equal(flat.reshape(N, 45, 16, 9), s.showers.transpose(0, 3, 2, 1))
        assert np.array_equal(f["incident_energies"][:, 0], s.energy.astype(np.float64))
        assert f.attrs["detector"] == "par04_siw"


def test_real_dataset2_file_defaults_to_normal_incidence(tmp_path):
    s = make_showers()
    path = tmp_path / "dataset_2_1.hdf5"
    with h5py.File(path, "w") as f:
        f["incident_energies"] = s.energy.astype(np.float64)[:, None]
        f["showers"] = s.showers.transpose(0, 3, 2, 1).reshape(N, N_CELLS)
    with open_showers(path) as f:
        assert (f.format, f.detector) == ("calochallenge", None)
        t = f.read()
    assert np.array_equal(t.showers, s.showers) and np.array_equal(t.energy, s.energy)
    assert np.all(t.theta == np.float32(math.pi / 2)) and np.all(t.phi == 0)


def test_iter_chunks_concatenated_equals_full_read(lemurs):
    path, s = lemurs
    with open_showers(path) as f:
        chunks = list(f.iter_chunks(chunk_size=7))
        assert [len(c) for c in chunks] == [7, 7, 6]
        assert_equal(Showers.concat(chunks), f.read())


def test_read_indices(lemurs):
    path, s = lemurs
    idx = np.array([5, -1, 3, 3, 0, 12, 13, 14])
    with open_showers(path) as f:
        assert_equal(f.read_indices(idx), s[idx])
        assert len(f.read_indices([])) == 0
        with pytest.raises(IndexError, match="index 20 out of range"):
            f.read_indices([1, 20])


def test_showers_container():
    s = make_showers(5)
    assert len(s[2]) == 1 and s[-1].energy[0] == s.energy[4]
    assert_equal(Showers.concat([s[:2], s[2:]]), s)
    with pytest.raises(ValueError, match=r"Showers.showers has shape \(5, 9, 16, 44\)"):
        Showers(s.showers[..., :44], s.energy, s.phi, s.theta)
    with pytest.raises(ValueError, match=r"Showers.theta has shape \(4,\); expected \(5,\)"):
        Showers(s.showers, s.energy, s.phi, s.theta[:4])


def test_writer_validates_and_leaves_no_file(tmp_path):
    s = make_showers()
    s.showers[4, 0, 0, 0] = np.nan
    path = tmp_path / "bad.h5"
    with pytest.raises(ShowerFormatError, match=r"bad.h5: showers\[4\] has deposit nan"):
        write_showers(path, s, "calochallenge")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unknown shower format 'root'"):
        write_showers(path, make_showers(), "root")


# --- one test per bad input: a valid LEMURS file edited with h5py -------------------------------------------


def corrupt(tmp_path, edit, attrs=None):
    path = tmp_path / "broken.h5"
    write_lemurs(path, make_showers(emax=1e5), attrs)
    with h5py.File(path, "a") as f:
        edit(f)
    return path


def replace(key, fn):
    def edit(f):
        data = fn(f[key][:])
        del f[key]
        f[key] = data
    return edit


def set_value(key, index, value):
    def edit(f):
        f[key][index] = value
    return edit


def expect_error(path, pattern, at_open=True):
    """The error names the file and matches `pattern`; value errors only surface when the rows are read."""
    match = re.escape(str(path)) + ".*" + pattern
    if at_open:
        with pytest.raises(ShowerFormatError, match=match):
            ShowerFile(path)
    else:
        with open_showers(path) as f:
            with pytest.raises(ShowerFormatError, match=match):
                f.read()


def test_missing_key(tmp_path):
    path = corrupt(tmp_path, lambda f: f.__delitem__("incident_theta"))
    expect_error(path, r"lacks key 'incident_theta'.*expected \[.*'incident_theta'.*found \['incident_energy', "
                       r"'incident_pdg', 'incident_phi', 'showers'\]")


def test_not_a_shower_file(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.zeros(3)
    expect_error(path, r"expected keys .*'incident_energy'.*'incident_energies'.*found \['data'\]")
    (tmp_path / "text.h5").write_text("not hdf5")
    expect_error(tmp_path / "text.h5", "not a readable HDF5 file")


def test_wrong_shape(tmp_path):
    path = corrupt(tmp_path, replace("showers", lambda x: x[..., :44]))
    expect_error(path, r"'showers' has shape \(20, 9, 16, 44\); expected \(20, 9, 16, 45\)")


def test_wrong_dtype(tmp_path):
    path = corrupt(tmp_path, replace("incident_energy", lambda e: e.astype(np.int64)))
    expect_error(path, "'incident_energy' has dtype int64; expected floating point")


def test_nan_deposit(tmp_path):
    path = corrupt(tmp_path, set_value("showers", (3, 1, 2, 3), np.nan))
    expect_error(path, r"showers\[3\] has deposit nan MeV at \(r, phi, z\) = \(1, 2, 3\): not finite", at_open=False)
    with open_showers(path) as f:  # validation is per read: rows before the bad one stream fine
        assert len(f.read(0, 3)) == 3


def test_inf_condition(tmp_path):
    path = corrupt(tmp_path, set_value("incident_phi", 6, np.inf))
    expect_error(path, r"incident_phi\[6\] = inf rad is outside", at_open=False)


def test_negative_deposit(tmp_path):
    path = corrupt(tmp_path, set_value("showers", (17, 8, 15, 44), -0.5))
    expect_error(path, r"showers\[17\] has deposit -0.5 MeV at \(r, phi, z\) = \(8, 15, 44\): negative",
                 at_open=False)


def test_negative_incident_energy(tmp_path):
    path = corrupt(tmp_path, set_value("incident_energy", 2, -5.0))
    expect_error(path, r"incident_energy\[2\] = -5.0 MeV is outside \[999, ", at_open=False)


def test_energy_above_detector_emax(tmp_path):
    # fccee_cld stops at 100 GeV: 200 GeV is out of range there (it would be fine for an unknown detector)
    path = corrupt(tmp_path, set_value("incident_energy", 4, 2e5), attrs={"detector": "fccee_cld"})
    expect_error(path, r"incident_energy\[4\] = 200000.0 MeV is outside \[999, 100100\] MeV", at_open=False)
    with h5py.File(path, "a") as f:
        del f.attrs["detector"]
    assert len(read_showers(path)) == N


def test_theta_out_of_range(tmp_path):
    path = corrupt(tmp_path, set_value("incident_theta", 9, 0.5))
    expect_error(path, r"incident_theta\[9\] = 0.5 rad is outside \[0.8699, 2.2701\]", at_open=False)


def test_phi_out_of_range(tmp_path):
    path = corrupt(tmp_path, set_value("incident_phi", 11, 7.0))
    expect_error(path, r"incident_phi\[11\] = 7.0 rad is outside \[-0.0001, 6.28329\] rad", at_open=False)


def test_length_mismatch(tmp_path):
    path = corrupt(tmp_path, replace("incident_phi", lambda p: p[:-1]))
    expect_error(path, "'incident_phi' has 19 entries but 'showers' has 20")


def test_unknown_detector_attribute(tmp_path):
    path = corrupt(tmp_path, lambda f: f.attrs.__setitem__("detector", "atlas"))
    expect_error(path, "attribute 'detector' = 'atlas' is not a known detector")
    with pytest.raises(ShowerFormatError, match="'detector' = 'atlas'"):
        write_lemurs(tmp_path / "new.h5", make_showers(), {"detector": "atlas"})


# --- inspect ----------------------------------------------------------------------------------------------------


@pytest.fixture
def hand_built(tmp_path):
    """4 showers with a few known cells; one sub-threshold cell that every statistic must ignore."""
    x = np.zeros((4, 9, 16, 45), np.float32)
    x[0, 0, 0, 10] = 40.0
    x[1, 1, 3, 10] = 100.0
    x[1, 8, 15, 44] = 0.5 * THRESHOLD_MEV
    x[2, 0, 5, 20] = x[2, 2, 5, 20] = 150.0
    x[3, 0, 0, 12] = 5000.0
    s = Showers(x, [2e3, 5e3, 2e4, 5e5], [0.0, 1.0, 2.0, 6.0], [0.9, 1.2, 1.6, 2.2])
    path = tmp_path / "hand.h5"
    write_lemurs(path, s, {"detector": "par04_siw"})
    return path


def test_inspect_summary_numbers(hand_built):
    s = summarize(hand_built, n_energy_bins=3, chunk_size=3)
    response = np.array([0.02, 0.02, 0.015, 0.01])
    assert (s["format"], s["detector"], s["synthetic"], s["n"]) == ("lemurs", "par04_siw", False, 4)
    assert s["energy_mev"] == [2e3, 5e5]
    assert s["theta"] == pytest.approx([0.9, 2.2]) and s["phi"] == [0.0, 6.0]
    assert s["response_mean"] == pytest.approx(response.mean())
    assert s["response_std"] == pytest.approx(response.std())
    bins = np.array([[b[k] for k in ("e_lo_mev", "e_hi_mev", "n", "mean", "std")] for b in s["response_bins"]])
    np.testing.assert_allclose(bins, [[1e3, 1e4, 2, 0.02, 0], [1e4, 1e5, 1, 0.015, 0], [1e5, 1e6, 1, 0.01, 0]],
                               rtol=1e-6, atol=1e-9)
    assert s["sparsity"] == pytest.approx(5 / (4 * N_CELLS))
    expected_long = np.zeros(45)
    expected_long[[10, 12, 20]] = [140 / 4, 5000 / 4, 300 / 4]
    assert s["longitudinal_mev"] == pytest.approx(expected_long.tolist())
    assert s["radial_mev"] == pytest.approx([5190 / 4, 100 / 4, 150 / 4, 0, 0, 0, 0, 0, 0])
    assert s["shower_max_layer"] == 12
    assert s["longitudinal_centroid"] == pytest.approx((10.5 * 140 + 12.5 * 5000 + 20.5 * 300) / 5440)
    assert s["radial_centroid"] == pytest.approx((0.5 * 5190 + 1.5 * 100 + 2.5 * 150) / 5440)


# --- CLI --------------------------------------------------------------------------------------------------------


def test_cli_convert(lemurs, tmp_path):
    path, s = lemurs
    out = tmp_path / "out" / "odd_cc.h5"
    result = CliRunner().invoke(app, ["data", "convert", str(path), str(out), "--to", "calochallenge"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 20 showers, format calochallenge, detector odd" in result.output
    with open_showers(out) as f:
        assert f.format == "calochallenge" and f.attrs == ATTRS
        assert_equal(f.read(), s)
    result = CliRunner().invoke(app, ["data", "convert", str(path), str(out), "--to", "root"])
    assert result.exit_code == 2 and "Invalid value for '--to'" in result.output and "'calochallenge'" in result.output


def test_cli_inspect_plot(hand_built, tmp_path):
    plots = tmp_path / "plots"
    result = CliRunner().invoke(app, ["data", "inspect", str(hand_built), "--plot", str(plots)])
    assert result.exit_code == 0, result.output
    assert re.search(r"^N\s+4$", result.output, re.M)
    assert re.search(r"^detector\s+par04_siw$", result.output, re.M)
    assert re.search(r"^E_dep/E_inc\s+0.01625 ", result.output, re.M)
    for name in PLOTS:
        png = plots / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
