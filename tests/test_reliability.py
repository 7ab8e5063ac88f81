"""A failed run never ships bad weights; a damaged checkpoint never stops a resume (real subprocess runs)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calofm.train.checkpoint import MANIFEST, damage

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}

# Runs the CLI with one library function patched: the loss is NaN at step K, or a checkpoint write fails as on a
# full disk. sys.argv[1] is the patch, sys.argv[2] its step, the rest the calofm arguments.
PATCHED_CLI = """
import errno, sys, torch
patch, k = sys.argv[1], int(sys.argv[2])
if patch == "nan":
    from calofm.train import pretrain
    loss, calls = pretrain.PretrainObjective.loss, [0]
    def nan_at_k(self, *a):
        calls[0] += 1
        return loss(self, *a) * (float("nan") if calls[0] == k else 1.0)
    pretrain.PretrainObjective.loss = nan_at_k
elif patch == "disk-full":
    save = torch.save
    def full(obj, f, *a, **kw):
        if f"step_{k:07d}" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return save(obj, f, *a, **kw)
    torch.save = full
from calofm.cli import app
app(sys.argv[3:], prog_name="calofm")
"""


def run(*args, patch=None, k=0):
    cmd = [sys.executable, "-c", PATCHED_CLI, patch, str(k)] if patch else [sys.executable, "-m", "calofm.cli"]
    r = subprocess.run([*cmd, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def pretrain_args(data_dir, out, steps=6, *extra):
    return ["pretrain", "recipes/pretrain-tiny.yaml", "--set", f"data.dir={data_dir}", "--set", f"output_dir={out}",
            "--set", f"train.steps={steps}", "--set", "train.batch_size=8", "--set", "train.checkpoint_every=2",
            "--set", "train.keep_checkpoints=3", "--set", "train.log_every=1", *extra]


def weights(folder):
    return load_file(Path(folder) / "model.safetensors")


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("reference") / "run"
    rc, log = run(*pretrain_args(data_dir, out))
    assert rc == 0, log
    return out


def test_nan_at_step_k_stops_the_run_and_keeps_checkpoint_k_minus_1(data_dir, tmp_path):
    out = tmp_path / "run"
    rc, log = run(*pretrain_args(data_dir, out, 6, "--set", "train.checkpoint_every=1", "--set",
                                 "train.max_nonfinite_steps=0"), patch="nan", k=3)
    assert rc == 2, log
    assert "step 3: non-finite loss or gradient" in log and "Traceback" not in log
    assert "Last good checkpoint:" in log and "step_0000002" in log
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step_0000001", "step_0000002"], kept
    assert not (out / "model").exists()
    for name, t in load_file(out / "checkpoints" / "step_0000002" / "model.safetensors").items():
        assert torch.isfinite(t).all(), name
    for name, t in load_file(out / "checkpoints" / "step_0000002" / "ema_0.safetensors").items():
        assert torch.isfinite(t).all(), name


def test_a_nan_step_within_the_limit_is_skipped(data_dir, tmp_path, reference):
    out = tmp_path / "run"
    rc, log = run(*pretrain_args(data_dir, out), patch="nan", k=3)
    assert rc == 0, log
    assert "step 3: non-finite loss or gradient" in log and "step skipped (1 of at most 10)" in log
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [0, 0, 1, 1, 1, 1]
    model = weights(out / "model")
    assert all(torch.isfinite(t).all() for t in model.values())
    # the skipped step changed nothing in the checkpoint before it and made the run differ after it
    assert_identical(load_file(out / "checkpoints" / "step_0000002" / "model.safetensors"),
                     load_file(reference / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert any(not torch.equal(model[k], v) for k, v in weights(reference / "model").items())


def _truncate(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(ckpt):
    f = ckpt / "optimizer.bin"
    data = bytearray(f.read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 8])
    f.write_bytes(bytes(data))


def _incomplete(ckpt):
    (ckpt / MANIFEST).unlink()  # the state of a write killed before its manifest


@pytest.mark.parametrize("harm, reason", [(_truncate, "truncated"), (_flip, "corrupted"),
                                          (_incomplete, "no manifest.json")])
def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one(data_dir, tmp_path, reference, harm, reason):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "model")
    shutil.rmtree(out / "checkpoints" / "step_0000006")  # as if killed after step 4's checkpoint
    harm(out / "checkpoints" / "step_0000004")
    assert reason in damage(out / "checkpoints" / "step_0000004")
    rc, log = run(*pretrain_args(data_dir, out), "--resume")
    assert rc == 0, log
    assert "skipping checkpoint" in log and reason in log
    assert "resumed from" in log and "step_0000002 at step 2" in log
    assert_identical(weights(out / "model"), weights(reference / "model"))
    rows = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]  # the rows after the checkpoint were dropped, then written again


def test_a_full_disk_leaves_the_previous_checkpoint_resumable(data_dir, tmp_path, reference):
    out = tmp_path / "run"
    rc, log = run(*pretrain_args(data_dir, out), patch="disk-full", k=4)
    assert rc == 2, log
    assert "writing checkpoint" in log and "No space left on device" in log and "Traceback" not in log
    assert "the last good checkpoint is" in log and "step_0000002" in log
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]  # no .tmp-step_* left
    rc, log = run(*pretrain_args(data_dir, out), "--resume")
    assert rc == 0, log
    assert_identical(weights(out / "model"), weights(reference / "model"))


def test_all_checkpoints_damaged_is_one_clear_error(data_dir, tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for ckpt in (out / "checkpoints").iterdir():
        _incomplete(ckpt)
    rc, log = run(*pretrain_args(data_dir, out, 8), "--resume")
    assert rc == 2 and "no intact checkpoint to resume from" in log and "Traceback" not in log, log


# ------------------------------------------------------------------ one-line errors for bad files and options


def cli_error(*args):
    from typer.testing import CliRunner

    from calofm.cli import app

    r = CliRunner().invoke(app, list(args))
    assert r.exit_code == 2 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    return r.output


def test_a_pickle_named_model_safetensors_is_one_line(tiny_edm, tmp_path):
    bad = tmp_path / "model"
    shutil.copytree(tiny_edm, bad)
    torch.save({"w": torch.zeros(2)}, bad / "model.safetensors")
    out = cli_error("info", str(bad))
    assert out.startswith("error: ") and "model.safetensors: not a readable safetensors file" in out
    assert len(out.strip().splitlines()) == 1


def test_weights_of_another_network_are_one_line(tiny_edm, tmp_path):
    """A folder whose weights do not fit the network its config.json builds (an older calofm's, or a mix-up)."""
    from safetensors.torch import save_file

    bad = tmp_path / "model"
    shutil.copytree(tiny_edm, bad)
    weights = load_file(bad / "model.safetensors")
    weights["cond_embed.0.weight"] = weights["cond_embed.0.weight"][:, :10].contiguous()
    save_file(weights, str(bad / "model.safetensors"))
    out = cli_error("info", str(bad))
    assert out.startswith("error: ") and "model.safetensors: the weights do not fit the network" in out
    assert "cond_embed.0.weight" in out and len(out.strip().splitlines()) == 1


def test_an_unknown_key_in_config_json_is_refused(tiny_edm, tmp_path):
    bad = tmp_path / "model"
    shutil.copytree(tiny_edm, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "sigma_maxx": 80}))
    out = cli_error("info", str(bad))
    assert f"{bad}/config.json: unknown key 'sigma_maxx'" in out and len(out.strip().splitlines()) == 1


def test_a_corrupted_hdf5_chunk_names_file_key_and_showers(data_dir, tmp_path):
    import h5py

    bad = tmp_path / "odd.h5"
    shutil.copy(data_dir / "odd.h5", bad)
    with h5py.File(bad) as f:
        info = f["showers"].id.get_chunk_info(1)
        rows = f["showers"].chunks[0]
    with open(bad, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        f.write(b"\xff" * 64)
    from calofm.data.formats import open_showers

    with open_showers(bad) as f:
        f.read(0, rows)  # the first chunk is intact
        with pytest.raises(OSError, match=rf"{bad}: key 'showers', showers {rows}-{2 * rows - 1}: cannot be read"):
            f.read(rows, 2 * rows)
    out = cli_error("data", "inspect", str(bad))
    assert f"{bad}: key 'showers'" in out and "the file is damaged" in out


@pytest.mark.parametrize("option, value", [("--n", "-5"), ("--steps", "-3"), ("--steps", "0"),
                                           ("--batch-size", "0")])
def test_bad_generate_options_name_the_option(tiny_edm, tmp_path, option, value):
    out = cli_error("generate", "--model", str(tiny_edm), "--detector", "odd", option, value,
                    "--out", str(tmp_path / "g.h5"))
    assert "Invalid value for" in out and f"'{option}'" in out and not (tmp_path / "g.h5").exists()


@pytest.mark.parametrize("override, message", [("train.steps=-3", "train.steps must be >= 1, got -3"),
                                               ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
                                               ("train.lr=nan", "train.lr must be a finite number"),
                                               ("train.max_nonfinite_steps=-1", "train.max_nonfinite_steps must")])
def test_bad_training_options_name_the_key(data_dir, tmp_path, override, message):
    out = cli_error("pretrain", "recipes/pretrain-tiny.yaml", "--set", f"data.dir={data_dir}",
                    "--set", f"output_dir={tmp_path / 'run'}", "--set", override)
    assert message in out and not (tmp_path / "run").exists()
