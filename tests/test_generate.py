import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from calofm.cli import app
from calofm.data.formats import open_showers, read_showers
from calofm.diffusion import sampler_label
from calofm.generate import generate_showers
from calofm.hub import load_model
from calofm.train.distill import cd_sampler, student_from

runner = CliRunner()


def test_generate_cli_fixed_point_lemurs(tiny_edm, tmp_path):
    out = tmp_path / "g.h5"
    r = runner.invoke(app, ["generate", str(tiny_edm), "--detector", "odd", "--n", "5", "--energy", "20",
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


def test_showers_do_not_depend_on_batching_or_process_split(tiny_edm):
    model = load_model(tiny_edm)
    cd = student_from(model, sampler=cd_sampler(2, model))  # multistep CD re-noises: per shower too
    rng = np.random.default_rng(0)
    e, t, p = rng.uniform(1e4, 1e5, 5), rng.uniform(1.0, 2.0, 5), rng.uniform(0.0, 6.0, 5)
    for m in (model, cd):
        a = generate_showers(m, "odd", e, t, p, steps=3 if m is model else 2, batch_size=5, seed=1)
        b = generate_showers(m, "odd", e, t, p, steps=3 if m is model else 2, batch_size=2, seed=1)
        tail = generate_showers(m, "odd", e[3:], t[3:], p[3:], steps=3 if m is model else 2, batch_size=1, seed=1,
                                first_index=3)  # what the second of two processes generates
        c = generate_showers(m, "odd", e, t, p, steps=3 if m is model else 2, batch_size=5, seed=2)
        np.testing.assert_allclose(a.showers, b.showers, rtol=1e-3, atol=1e-3)  # float rounding of batch-shaped GEMMs
        np.testing.assert_allclose(a.showers[3:], tail.showers, rtol=1e-3, atol=1e-3)  # float rounding of batch-shaped GEMMs
        other_seed, other_batch = np.abs(a.showers - c.showers).max(), np.abs(a.showers - b.showers).max()
        assert other_seed > max(0.1, 100 * other_batch), (other_seed, other_batch)  # MeV: another seed, other showers


def test_the_saved_sampler_config_is_what_runs(tiny_edm, tmp_path):
    config = json.loads((tiny_edm / "config.json").read_text())
    assert {k: config["sampler"][k] for k in ("sigma_data", "sigma_min", "sigma_max", "rho", "steps")} == {
        "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "steps": 32}
    e, t, p = np.full(3, 5e4), np.full(3, 1.2), np.full(3, 2.0)

    def showers(sampler: dict) -> np.ndarray:
        folder = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_edm, folder)
        (folder / "config.json").write_text(json.dumps({**config, "sampler": sampler}))
        return generate_showers(load_model(folder), "odd", e, t, p, steps=3, seed=1).showers

    assert config["sampler"]["churn"] == {"S_churn": 10.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}
    assert sampler_label(load_model(tiny_edm)) == "32 Heun steps, churn S_churn 10"  # what reports call it
    saved = showers(config["sampler"])
    assert np.abs(showers({**config["sampler"], "sigma_max": 20.0}) - saved).max() > 0.1  # MeV; float noise is 0
    deterministic = {k: v for k, v in config["sampler"].items() if k != "churn"}  # as saved before the key
    assert np.abs(showers(deterministic) - saved).max() > 0.1
    with pytest.raises(ValueError, match="sampler.churn: unknown key 'S_chrun'"):
        showers({**config["sampler"], "churn": {"S_chrun": 10.0}})
    old = {k: v for k, v in config["sampler"].items() if k not in ("sigma_data", "sigma_min", "sigma_max", "rho")}
    np.testing.assert_array_equal(showers(old), saved)  # a folder saved before these keys: EDM's defaults


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


def test_version_and_the_model_given_once(tiny_edm, tmp_path):
    import calofm

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"calofm {calofm.__version__}"
    r = runner.invoke(app, ["generate", str(tiny_edm), "--model", str(tiny_edm), "--detector", "odd", "--out",
                            str(tmp_path / "x.h5")])
    assert r.exit_code == 2 and "give the model once" in r.output


def test_generate_to_file_streams_batch_by_batch(tiny_edm, tmp_path, monkeypatch):
    """Each batch goes to the file as it is made (memory independent of --n), and the file equals the showers
    generated in one go."""
    import calofm.data.formats as formats
    from calofm.generate import generate_to_file

    sizes, write_stream = [], formats.write_stream

    def recording(path, fmt, n, attrs, parts):
        return write_stream(path, fmt, n, attrs, (sizes.append(len(s)) or s for s in parts))

    monkeypatch.setattr(formats, "write_stream", recording)
    out = generate_to_file(str(tiny_edm), "odd", tmp_path / "g.h5", n=7, energy_gev=30, steps=2, batch_size=3, seed=4)
    assert sizes == [3, 3, 1]
    written = read_showers(out)
    whole = generate_showers(load_model(tiny_edm), "odd", written.energy, written.theta, written.phi, steps=2,
                             batch_size=7, seed=4)
    np.testing.assert_allclose(written.showers, whole.showers, rtol=1e-3, atol=1e-3)
    assert [p.name for p in tmp_path.iterdir()] == ["g.h5"]  # nothing else left beside it


def test_two_processes_write_the_same_file_as_one(tiny_edm, tmp_path):
    """Under torchrun each process streams its share into a hidden part file; the main process streams the
    parts into one file, equal to a single process's, and removes them."""
    import os
    import subprocess
    import sys

    args = ["-m", "calofm.cli", "generate", str(tiny_edm), "--detector", "odd", "-n", "5", "--energy", "40",
            "--steps", "2", "--batch-size", "2", "--seed", "3", "--out"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args, str(tmp_path / "two.h5")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = runner.invoke(app, args[2:] + [str(tmp_path / "one.h5")])
    assert one.exit_code == 0, one.output
    a, b = read_showers(tmp_path / "one.h5"), read_showers(tmp_path / "two.h5")
    np.testing.assert_array_equal(a.energy, b.energy)
    np.testing.assert_allclose(a.showers, b.showers, rtol=1e-3, atol=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.h5", "two.h5"]


def test_precisions_change_the_arithmetic_not_the_physics():
    """bf16 and int8 sample other numbers than fp32, with the same mean deposit at one fixed condition (64 showers
    of the shipped CD model, same noise)."""
    from calofm.generate import with_precision

    model = load_model("calodit-tiny-standin-cd")
    e, t, p = np.full(64, 5e4), np.full(64, 1.57), np.full(64, 0.1)
    ref = generate_showers(model, "odd", e, t, p, seed=1).showers
    for precision in ("bf16", "int8"):
        run = with_precision(model, precision)
        assert with_precision(run, precision) is run  # quantised once
        got = generate_showers(run, "odd", e, t, p, seed=1, precision=precision).showers
        assert np.abs(got - ref).max() > 1e-3, precision
        assert got.sum() / ref.sum() == pytest.approx(1.0, abs=0.01), precision
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, int8"):
        generate_showers(model, "odd", e, t, p, precision="fp16")


def assert_same_showers(got: np.ndarray, ref: np.ndarray, rtol: float) -> None:
    """Equal to `rtol` of each cell (measured: 2e-6 at EDM 32 steps and CD 1; a 2- or 3-step EDM sampler's coarse
    steps amplify float rounding to 1e-3-2e-3); cells within 0.1% of the graph's 0.5 keV cut may fall either side of it,
    and under it the graph gives zeros."""
    cut = 0.5e-3  # MeV
    above = ref >= cut * 1.001
    np.testing.assert_allclose(got[above], ref[above], rtol=rtol, atol=0)
    assert not got[ref < cut * 0.999].any()


def test_onnxruntime_backend_gives_the_torch_showers(tiny_edm):
    """The exported graph fed the same per-shower noise: the same showers to float rounding, for the (churned) EDM
    and 1- and 2-step CD: the noise they add on the way is the graph's step_noise input."""
    from calofm.generate import with_backend

    model = load_model(tiny_edm)
    cd = student_from(model, sampler=cd_sampler(1, model))
    rng = np.random.default_rng(0)
    e, t, p = rng.uniform(1e4, 1e5, 5), rng.uniform(1.0, 2.0, 5), rng.uniform(0.0, 6.0, 5)
    for m, steps, rtol in ((model, 8, 1e-4), (cd, 1, 2e-5), (cd, 2, 2e-5)):
        ref = generate_showers(m, "odd", e, t, p, steps=steps, seed=1).showers
        run = with_backend(m, "onnxruntime", "fp32", steps)
        assert with_backend(run, "onnxruntime", "fp32", steps) is run  # exported once
        got = generate_showers(run, "odd", e, t, p, steps=steps, batch_size=2, seed=1, backend="onnxruntime").showers
        assert_same_showers(got, ref, rtol)
        assert np.abs(got - generate_showers(run, "odd", e, t, p, steps=steps, seed=2,
                                             backend="onnxruntime").showers).max() > 1.0  # the seed matters


def test_onnxruntime_int8_keeps_the_mean_deposit():
    """onnxruntime's dynamic int8 quantisation of the graph: other numbers than fp32, the same mean deposit
    (measured 0.03% off over 32 showers of the shipped CD model, same noise)."""
    model = load_model("calodit-tiny-standin-cd")
    e, t, p = np.full(32, 5e4), np.full(32, 1.57), np.full(32, 0.1)
    ref = generate_showers(model, "odd", e, t, p, seed=1).showers
    got = generate_showers(model, "odd", e, t, p, seed=1, backend="onnxruntime", precision="int8").showers
    assert np.abs(got - ref).max() > 1e-3
    assert got.sum() / ref.sum() == pytest.approx(1.0, abs=0.01)


def test_backend_errors_name_the_problem(tiny_edm):
    from calofm.generate import with_backend

    model = load_model(tiny_edm)
    e = np.full(2, 5e4)
    with pytest.raises(ValueError, match="precision bf16 is not supported by the onnxruntime backend"):
        generate_showers(model, "odd", e, e * 0 + 1.5, e * 0, backend="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="backend must be one of torch, onnxruntime, got 'tensorrt'"):
        generate_showers(model, "odd", e, e * 0 + 1.5, e * 0, backend="tensorrt")
    with pytest.raises(ValueError, match="a torch-quantised \\(int8\\) model cannot be exported"):
        with_backend(with_backend(model, "torch", "int8"), "onnxruntime", "int8")
    run = with_backend(model, "onnxruntime", "fp32", 1)
    with pytest.raises(ValueError, match="detector 'fccee_allegro' has no slot in this ONNX graph"):
        run.contract_slot("fccee_allegro")  # this model has no adapted detector for the contract's 'new' slot


def test_generate_to_file_exports_once(tiny_edm, tmp_path, monkeypatch):
    """--backend onnxruntime: one export for the whole file, not one per batch; the backend is recorded."""
    import calofm.export as export
    from calofm.generate import generate_to_file

    calls, onnx_graph = [], export.onnx_graph
    monkeypatch.setattr(export, "onnx_graph", lambda *a, **k: calls.append(1) or onnx_graph(*a, **k))
    r = runner.invoke(app, ["generate", str(tiny_edm), "--detector", "odd", "-n", "5", "--energy", "30", "--steps",
                            "2", "--batch-size", "2", "--backend", "onnxruntime", "--out", str(tmp_path / "o.h5")])
    assert r.exit_code == 0, r.output
    assert calls == [1]
    with open_showers(tmp_path / "o.h5") as f:
        assert f.attrs["backend"] == "onnxruntime" and f.attrs["precision"] == "fp32"
    torch_file = generate_to_file(str(tiny_edm), "odd", tmp_path / "t.h5", n=5, energy_gev=30, steps=2, seed=0)
    # 2 Heun steps amplify float rounding (measured up to 2.2e-3 in 1 cell of 16,680); a wrong graph is off by O(1)
    assert_same_showers(read_showers(tmp_path / "o.h5").showers, read_showers(torch_file).showers, 5e-3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("settings, reused", [("1", True), ("0", False)])
def test_freed_batch_buffers_are_reused_without_page_faults(settings, reused):
    """`keep_freed_memory` keeps freed 64 MiB buffers (over glibc's mmap ceiling, as a paper-preset batch's are) in
    the heap: once the heap has grown, allocating one again faults no fresh pages; glibc's defaults fault every
    page every time. In a fresh process, as `calofm generate` runs it."""
    import resource  # POSIX only, as the skip says

    code = ("import resource, torch\nfrom calofm.memory import keep_freed_memory\nkeep_freed_memory()\n"
            "for _ in range(24):\n    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "    torch.ones(16 << 20)\n    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "CALOFM_MALLOPT": settings},
                         capture_output=True, text=True, check=True)
    last = [int(x) for x in out.stdout.split()[-6:]]  # once the heap has grown (within ~10 buffers)
    pages = (64 << 20) // resource.getpagesize()
    assert (sum(last) < pages // 10) if reused else all(f > pages // 2 for f in last), last
