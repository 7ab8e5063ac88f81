"""Pretraining end to end: the loss falls, a killed run resumes bit for bit, two CPU processes share the data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calofm.models.dit import CaloDiT
from calofm.train.schedule import wsd

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "calofm.cli", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def pretrain_args(data_dir, out, steps=40, every=5):
    return ["pretrain", "recipes/pretrain-tiny.yaml", "--set", f"data.dir={data_dir}", "--set", f"output_dir={out}",
            "--set", f"train.steps={steps}", "--set", "train.batch_size=8", "--set", f"train.checkpoint_every={every}",
            "--set", "train.log_every=1"]


def test_wsd_schedule_shape():
    lr = [wsd(s, 100) for s in range(100)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == 1.0  # 10% linear warm-up
    assert all(v == 1.0 for v in lr[10:60]) and lr[60] < 1  # 50% constant
    assert lr[99] == 0.0 and all(a >= b for a, b in zip(lr[60:], lr[61:]))  # 40% sqrt decay to 0
    assert lr[80] == pytest.approx(1 - (20 / 40) ** 0.5, abs=0.03)


def test_loss_falls_and_model_is_saved(tiny_edm):
    rows = [json.loads(r) for r in (tiny_edm.parent / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    first = sum(r["loss"] for r in rows[:8]) / 8
    last = sum(r["loss"] for r in rows[-8:]) / 8
    assert last < 0.8 * first, (first, last)
    model = CaloDiT.from_pretrained(tiny_edm)
    assert model.objective == "edm" and model.sampler["steps"] == 32
    assert model.slot_map == {"par04_siw": 0, "par04_scipb": 1, "odd": 2, "fccee_cld": 3} and model.n_slots == 5
    assert set(model.normalizer) == {"mean", "std", "threshold_mev", "eps", "log_max", "unit", "response",
                                     "deposit_mean", "deposit_std", "centre", "centre_std"}
    assert not model.normalizer["centre"] and model.dipole is None  # data.centre is asked for (recipes, README)
    assert model.normalizer["unit"] == "deposit" and model.deposit_net is not None  # the default
    assert (tiny_edm.parent / "config.yaml").exists()


def test_edm_section_of_the_recipe_is_what_trains_and_samples(data_dir, tmp_path):
    """`edm.sigma_data` reaches the loss (another value, another first loss) and the saved sampler config."""
    from calofm.config import load_config
    from calofm.train.pretrain import pretrain

    losses = {}
    for sd in (0.5, 1.0):
        cfg = load_config(None, [f"data.dir={data_dir}", f"output_dir={tmp_path / str(sd)}", "train.steps=2",
                                 "train.batch_size=8", "model.patch=[3,4,5]", f"edm.sigma_data={sd}",
                                 "edm.p_mean=-0.4", "edm.p_std=1.0", "train.log_every=1"])
        model = CaloDiT.from_pretrained(pretrain(cfg))
        assert model.sampler["sigma_data"] == sd
        losses[sd] = json.loads((tmp_path / str(sd) / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert losses[0.5] != pytest.approx(losses[1.0], rel=1e-3)


def test_warm_restart_starts_from_the_model_and_keeps_its_normaliser(tiny_edm, data_dir, tmp_path):
    """`model.init_from`: the run starts at the given model's weights (a lower first loss than from scratch on the
    same batch; at lr ~0 the saved model is those weights) and trains on its normaliser, not a refit of the data."""
    from safetensors.torch import load_file as load

    from calofm.config import load_config
    from calofm.train.pretrain import pretrain

    base = [f"data.dir={data_dir}", "train.steps=2", "train.batch_size=8", "model.patch=[3,4,5]", "train.log_every=1",
            "data.max_per_detector=50", "deposit.epochs=0"]

    def run(name, *extra):
        out = pretrain(load_config(None, [*base, f"output_dir={tmp_path / name}", *extra]))
        first = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["loss"]
        return out, first

    _, scratch = run("scratch")
    warm, warm_loss = run("warm", f"model.init_from={tiny_edm}")
    assert warm_loss < 0.8 * scratch, (warm_loss, scratch)
    frozen, _ = run("frozen", f"model.init_from={tiny_edm}", "train.lr=1e-30")
    start, saved = load(tiny_edm / "model.safetensors"), load(frozen / "model.safetensors")
    assert start.keys() == saved.keys() and all(torch.equal(start[k], saved[k]) for k in start)
    model, given = CaloDiT.from_pretrained(warm), CaloDiT.from_pretrained(tiny_edm)
    assert model.normalizer == given.normalizer  # 50 showers a detector would refit other mean and std
    assert model.provenance["init_from"] == str(tiny_edm) and model.provenance["init_steps"] == 40
    again, _ = run("again", f"model.init_from={warm}")  # a warm restart of a warm restart: 40 + 2 steps seen
    assert CaloDiT.from_pretrained(again).provenance["init_steps"] == 42
    with pytest.raises(ValueError, match=r"model.init_from=.*data.detectors"):
        run("fewer", f"model.init_from={tiny_edm}", "data.detectors=[par04_siw,odd]")
    with pytest.raises(ValueError, match=r"model.init_from=.*data.log_eps=1e-07.*1e-05"):
        run("eps", f"model.init_from={tiny_edm}", "data.log_eps=1e-5")
    with pytest.raises(ValueError, match=r"model.init_from=.*do not fit the recipe's model"):
        run("patch", f"model.init_from={tiny_edm}", "model.patch=[3,2,3]")

    # `data.centre` added to a model without it: the widened model computes what the start did, whatever centre it
    # is given (`with_centre`), on the start's normaliser plus the centre's fitted scale; the reverse is refused
    from calofm.diffusion import denoiser, deposit_denoiser, sampler_params

    centred, _ = run("centre", f"model.init_from={tiny_edm}", "data.centre=true", "train.lr=1e-30")
    model = CaloDiT.from_pretrained(centred).eval()
    assert model.normalizer == {**given.normalizer, "centre": True, "centre_std": model.normalizer["centre_std"]}
    assert 0.3 < model.normalizer["centre_std"] < 30  # mm x sqrt(GeV): the core's wander, 0.1 R_M at 1 GeV
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(4, 9, 16, 45, generator=g), torch.randn(4, given.n_cond, generator=g)
    y, centre = torch.randn(4, 1, generator=g), 3 * torch.randn(4, 2, generator=g)
    sigma = torch.tensor([0.01, 0.5, 5.0, 50.0])
    with torch.no_grad():
        torch.testing.assert_close(denoiser(model, sampler_params(model))(x, sigma, torch.cat([cond, y, centre], 1)),
                                   denoiser(given, sampler_params(given))(x, sigma, torch.cat([cond, y], 1)))
        torch.testing.assert_close(deposit_denoiser(model)(torch.cat([y, centre], 1), sigma, cond)[:, :1],
                                   deposit_denoiser(given)(y, sigma, cond))
    with pytest.raises(ValueError, match=r"model.init_from=.*data.centre=True.*False"):
        run("uncentred", f"model.init_from={centred}")


def test_killed_run_resumes_to_identical_weights(data_dir, tmp_path):
    reference = cli(*pretrain_args(data_dir, tmp_path / "a"))
    killed = cli(*pretrain_args(data_dir, tmp_path / "b"))
    ckpt = tmp_path / "b" / "checkpoints" / "step_0000010"
    deadline = time.time() + 120
    while not ckpt.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert killed.poll() is None, "run finished before it could be killed: " + killed.stdout.read()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "b" / "model").exists()
    # without --resume the run refuses to overwrite the checkpoints
    refused = cli(*pretrain_args(data_dir, tmp_path / "b"))
    assert refused.wait() == 2 and "pass --resume" in refused.stdout.read()
    resumed = cli(*pretrain_args(data_dir, tmp_path / "b"), "--resume")
    out = resumed.communicate()[0]
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    rows = [json.loads(r)["step"] for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 41))  # no rows repeated between the checkpoint and the kill
    assert reference.wait() == 0
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a finished run resumed again returns its model: no deposit refit, nothing rewritten
    saved = (tmp_path / "b" / "model" / "model.safetensors").stat().st_mtime_ns
    again = cli(*pretrain_args(data_dir, tmp_path / "b"), "--resume")
    out = again.communicate()[0]
    assert again.returncode == 0 and "already finished its 40 steps" in out, out
    assert (tmp_path / "b" / "model" / "model.safetensors").stat().st_mtime_ns == saved


RANK_PROBE = """
import json, sys
from calofm.config import load_config
from calofm.data.loader import ShowerStream, find_detector_files
from calofm.data.transforms import Normalizer
from calofm.geometry import default_slot_map
from calofm.train.loop import make_accelerator
cfg = load_config(None, ["data.dir=" + sys.argv[1]])
acc = make_accelerator(cfg)
files = find_detector_files(cfg.data.dir, cfg.data.detectors)
s = ShowerStream(files, default_slot_map(cfg.data.detectors), 5, Normalizer(0.0, 1.0), 8, chunk_size=25,
                 rank=acc.process_index, world_size=acc.num_processes)
it = iter(s)
energies = [float(e) for _ in range(10) for e in next(it)["cond"][:, 0]]
json.dump({"n": acc.num_processes, "rank": acc.process_index, "e": energies},
          open(sys.argv[2] + f"/rank{acc.process_index}.json", "w"))
it.close()
"""


def torchrun(*args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_two_cpu_processes_see_different_data(data_dir, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(RANK_PROBE)
    r = torchrun(str(probe), str(data_dir), str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [x["n"] for x in ranks] == [2, 2] and [x["rank"] for x in ranks] == [0, 1]
    assert not set(ranks[0]["e"]) & set(ranks[1]["e"])


def test_pretrain_under_torchrun(data_dir, tmp_path):
    r = torchrun("-m", "calofm.cli", *pretrain_args(data_dir, tmp_path / "ddp", steps=6, every=3))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(row["processes"] == 2 for row in rows)
    assert CaloDiT.from_pretrained(tmp_path / "ddp" / "model").slot_map["odd"] == 2
    # one process cannot continue a 2-process run bit for bit (here lengthened to 9 steps, since a finished run
    # resumed returns its model): an error, unless allowed (then a warning)
    one = cli(*pretrain_args(data_dir, tmp_path / "ddp", steps=9, every=3), "--resume")
    log = one.communicate()[0]
    assert one.returncode == 2 and "written by 2 process(es), this run has 1" in log, log
    assert "train.allow_world_size_change=true" in log and "Traceback" not in log
    one = cli(*pretrain_args(data_dir, tmp_path / "ddp", steps=9, every=3), "--resume", "--set",
              "train.allow_world_size_change=true")
    log = one.communicate()[0]
    assert one.returncode == 0 and "warning: " in log and "no longer bit-exact" in log, log


def test_accelerate_launch_mixed_precision_is_honoured(data_dir, tmp_path):
    """The recipe leaves mixed_precision unset, so `accelerate launch --mixed_precision bf16` decides; the saved
    config and the metrics log record what ran."""
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                        "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
                        "-m", "calofm.cli", *pretrain_args(data_dir, tmp_path / "bf16", steps=2, every=2)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import yaml

    assert yaml.safe_load((tmp_path / "bf16" / "config.yaml").read_text())["train"]["mixed_precision"] == "bf16"
    rows = [json.loads(x) for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert [row["mixed_precision"] for row in rows] == ["bf16", "bf16"]
    # without launch and without a recipe value: full precision
    plain = cli(*pretrain_args(data_dir, tmp_path / "fp32", steps=1, every=1))
    assert plain.wait() == 0
    assert json.loads((tmp_path / "fp32" / "metrics.jsonl").read_text())["mixed_precision"] == "no"
