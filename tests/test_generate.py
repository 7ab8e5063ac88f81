import numpy as np
import pytest
from typer.testing import CliRunner

from calofm.cli import app
from calofm.data.formats import open_showers, read_showers
from calofm.generate import generate_showers
from calofm.hub import load_model

runner = CliRunner()


def test_generate_cli_fixed_point_lemurs(tiny_edm, tmp_path):
    out = tmp_path / "g.h5"
    r = runner.invoke(app, ["generate", "--model", str(tiny_edm), "--detector", "odd", "--n", "5", "--energy", "20",
                            "--theta", "1.5", "--phi", "0.3", "--steps", "4", "--batch-size", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    s = read_showers(out)
    assert s.showers.shape == (5, 9, 16, 45) and s.showers.dtype == np.float32
    assert np.all(s.energy == 20_000.0) and np.all(s.theta == np.float32(1.5)) and np.all(s.phi == np.float32(0.3))
    assert np.all(s.showers >= 0) and np.isfinite(s.showers).all()
    with open_showers(out) as f:
        assert f.detector == "odd" and "edm" in f.attrs["generated_by"]


def test_generate_cli_takes_conditions_and_writes_calochallenge(tiny_edm, data_dir, tmp_path):
    out = tmp_path / "g_cc.h5"
    r = runner.invoke(app, ["generate", "--model", str(tiny_edm), "--detector", "par04_siw", "--conditions",
                            str(data_dir / "par04_siw.h5"), "--steps", "2", "--format", "calochallenge",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    with open_showers(out) as f:
        assert f.format == "calochallenge" and len(f) == 200
        ref = read_showers(data_dir / "par04_siw.h5")
        np.testing.assert_array_equal(f.read().energy, ref.energy)


def test_batching_and_seed_do_not_change_showers(tiny_edm):
    model = load_model(tiny_edm)
    e, t, p = np.full(4, 5e4), np.full(4, 1.2), np.full(4, 2.0)
    a = generate_showers(model, "odd", e, t, p, steps=3, batch_size=4, seed=1)
    b = generate_showers(model, "odd", e, t, p, steps=3, batch_size=4, seed=1)
    c = generate_showers(model, "odd", e, t, p, steps=3, batch_size=4, seed=2)
    np.testing.assert_array_equal(a.showers, b.showers)
    assert not np.array_equal(a.showers, c.showers)


@pytest.mark.parametrize("args,message", [
    (["--detector", "fccee_allegro"], "no slot in this model"),
    (["--detector", "fccee_cld", "--energy", "500"], "energy"),
    (["--detector", "odd", "--format", "root"], "--format"),
])
def test_generate_errors_are_one_line(tiny_edm, tmp_path, args, message):
    r = runner.invoke(app, ["generate", "--model", str(tiny_edm), "--out", str(tmp_path / "x.h5"), *args])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.h5").exists()


def test_missing_model_folder_is_named(tmp_path):
    r = runner.invoke(app, ["generate", "--model", str(tmp_path / "nope"), "--detector", "odd", "--out",
                            str(tmp_path / "x.h5")])
    assert r.exit_code == 2 and "nope" in r.output


def test_help_exits_zero():
    for cmd in (["--help"], ["generate", "--help"], ["data", "synth", "--help"]):
        r = runner.invoke(app, cmd)
        assert r.exit_code == 0 and "Usage" in r.output and "error" not in r.output
