import json

import pytest
import torch

from calofm.data.transforms import N_COND
from calofm.models.dit import PRESETS, CaloDiT


@pytest.mark.parametrize("preset,tokens", [("tiny", 360), ("small", 360), ("paper", 360)])
def test_presets_shapes_and_tokens(preset, tokens):
    model = CaloDiT.from_preset(preset)
    assert model.pos_embed.shape == (tokens, model.width)
    model.final.linear.weight.data.normal_()  # leave adaLN-Zero so the output depends on the input
    model.final.adaLN.bias.data.fill_(0.1)
    x = torch.randn(2, 9, 16, 45)
    y = model(x, torch.zeros(2), torch.zeros(2, N_COND + model.n_slots))
    assert y.shape == x.shape and torch.isfinite(y).all() and y.abs().sum() > 0


def test_paper_preset_is_the_papers_model():
    m = CaloDiT.from_preset("paper")
    assert (m.depth, m.width, m.heads, m.mlp_dim, m.patch) == (6, 384, 6, 1536, (3, 2, 3))
    assert 20e6 < sum(p.numel() for p in m.parameters()) < 25e6


def test_bad_configuration_errors_name_the_value():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        CaloDiT.from_preset("huge")
    with pytest.raises(ValueError, match=r"patch \(2, 2, 3\) does not tile"):
        CaloDiT.from_preset("tiny", patch=(2, 2, 3))
    with pytest.raises(ValueError, match="objective"):
        CaloDiT.from_preset("tiny", objective="ddpm")
    with pytest.raises(ValueError, match="slots outside"):
        CaloDiT.from_preset("tiny", slot_map={"odd": 7})


def test_save_and_load_pretrained_roundtrip(tmp_path):
    model = CaloDiT.from_preset("tiny", slot_map={"par04_siw": 0}, normalizer={"mean": -5.0, "std": 3.0},
                                objective="cd", sampler={"steps": 1})
    for p in model.parameters():
        p.data.normal_()
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["objective"] == "cd" and cfg["slot_map"] == {"par04_siw": 0} and cfg["depth"] == PRESETS["tiny"]["depth"]
    loaded = CaloDiT.from_pretrained(tmp_path / "m")
    assert loaded.objective == "cd" and loaded.normalizer == {"mean": -5.0, "std": 3.0}
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_from_pretrained_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    CaloDiT.from_preset("tiny").save_pretrained(tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    weights.pop("final.linear.bias")
    save_file(weights, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="do not fit.*final.linear.bias"):
        CaloDiT.from_pretrained(tmp_path / "m")


def test_models_and_diffusion_import_nothing_of_files_hub_cli_or_accelerate():
    """Imports flow one way: the model and the math know nothing of calofm.hub (and its jinja2 cards), the CLI,
    the training loop, Accelerate or HDF5."""
    import subprocess
    import sys

    probe = ("import sys, calofm.models, calofm.models.dit, calofm.models.summary, calofm.diffusion; "
             "print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
                 .stdout.split())
    assert "calofm.models.dit" in loaded
    for name in ("calofm.hub", "jinja2", "calofm.cli", "typer", "calofm.train.loop", "accelerate", "h5py",
                 "calofm.data.formats"):
        assert name not in loaded, name
