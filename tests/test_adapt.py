"""Adaptation to a new detector: slot allocation, what each mode trains, LoRA adapter vs merged model, and the
adapted folders as self-contained models (calofm.train.adapt, `calofm adapt`)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from calofm.cli import app
from calofm.config import EDMConfig, load_config
from calofm.data.formats import open_showers
from calofm.data.loader import detector_response, find_detector_files, fit_normalizer
from calofm.data.transforms import N_COND, Normalizer, encode_conditions
from calofm.diffusion.edm import EDMParams
from calofm.hub import load_model
from calofm.models.dit import CaloDiT
from calofm.train.adapt import adapt, allocate_slot, resolve_pretrained, select_trainable
from calofm.train.distill import cd_sampler
from calofm.train.loop import save_model
from calofm.train.pretrain import edm_sampler, training_params

PRETRAINED = {"par04_siw": 0, "par04_scipb": 1, "odd": 2}  # 3 detectors + n_free_slots = 2
FAST = ["train.steps=3", "train.batch_size=8", "train.checkpoint_every=100", "train.log_every=1",
        "adapt.cd_steps=2", "distill.n_boundaries=4", "adapt.lora_rank=2", "adapt.lora_alpha=4"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
    """A folder with edm/ and cd/ models of 5 slots (2 free), weights randomised as if trained."""
    normalizer = fit_normalizer(find_detector_files(data_dir, list(PRETRAINED)))
    torch.manual_seed(0)
    edm = CaloDiT.from_preset("tiny", depth=1, width=48, heads=2, mlp_dim=96, n_slots=5, slot_map=PRETRAINED,
                              normalizer=normalizer.to_dict(), objective="edm", sampler=edm_sampler(EDMParams()),
                              provenance={"stage": "pretrain"})
    with torch.no_grad():
        for p in edm.parameters():  # adaLN-Zero starts at the identity: give every layer a gradient path
            p.add_(0.05 * torch.randn_like(p))
    cd = edm.with_config(objective="cd", sampler=cd_sampler(1, edm), provenance={"stage": "distill"})
    with torch.no_grad():
        for p in cd.parameters():
            p.add_(0.01 * torch.randn_like(p))
    root = tmp_path_factory.mktemp("pretrained")
    save_model(edm, root / "edm")
    save_model(cd, root / "cd")
    return root


def run_adapt(pretrained, data_dir, out, detector="fccee_allegro", mode="conditioning", *extra, resume=False):
    cfg = load_config(None, [f"adapt.pretrained={pretrained}", f"adapt.detector={detector}",
                             f"adapt.data={data_dir / (detector + '.h5')}", f"adapt.mode={mode}",
                             "adapt.n_train=40", f"output_dir={out}", *FAST, *extra])
    return adapt(cfg, resume=resume)


@pytest.fixture(scope="module")
def conditioning_run(pretrained, data_dir, tmp_path_factory):
    return run_adapt(pretrained, data_dir, tmp_path_factory.mktemp("adapt") / "out")


def outputs(model, slot, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 9, 16, 45, generator=g)
    cond = encode_conditions([2e4, 5e4, 9e4], [1.0, 1.5, 2.0], [0.1, 2.0, 4.0], slot, model.n_slots)
    with torch.no_grad():
        return model.eval()(x, torch.tensor([-1.0, 0.0, 1.0]), cond)


def test_allocate_slot_takes_lowest_free_and_refuses_clearly():
    assert allocate_slot({"a": 0, "b": 2}, 4, "new") == 1
    assert allocate_slot({"a": 0, "b": 1}, 4, "new") == 2
    assert allocate_slot({"a": 0, "new": 3}, 4, "new", continue_slot=True) == 3
    with pytest.raises(ValueError, match=r"'new' already has slot 3 in M; .*adapt.continue_slot=true"):
        allocate_slot({"a": 0, "new": 3}, 4, "new", source="M")
    with pytest.raises(ValueError, match=r"no free one-hot slot in M: all 2 slots are taken"):
        allocate_slot({"a": 0, "b": 1}, 2, "new", source="M")


def test_adaptation_trains_with_the_recipes_noise_levels_and_keeps_the_models_sigma_data(pretrained, data_dir,
                                                                                      tmp_path):
    base = EDMParams(sigma_data=0.5, sigma_max=60.0)
    p = training_params(base, EDMConfig(p_mean=-0.4, p_std=1.0), "M")
    assert (p.P_mean, p.P_std, p.sigma_data, p.sigma_max) == (-0.4, 1.0, 0.5, 60.0)
    with pytest.raises(ValueError, match=r"edm.sigma_data=1.0, but M was trained with sigma_data=0.5"):
        training_params(base, EDMConfig(sigma_data=1.0), "M")
    with pytest.raises(ValueError, match=r"edm.sigma_data=0.25, but .*edm was trained with sigma_data=0.5"):
        run_adapt(pretrained, data_dir, tmp_path / "out", "fccee_allegro", "full", "edm.sigma_data=0.25")


def test_resolve_pretrained_layouts(pretrained, tmp_path):
    assert resolve_pretrained(str(pretrained)) == (str(pretrained / "edm"), str(pretrained / "cd"))
    assert resolve_pretrained(str(pretrained / "edm")) == (str(pretrained / "edm"), None)
    assert resolve_pretrained(str(pretrained / "edm"), "x/cd") == (str(pretrained / "edm"), "x/cd")
    (tmp_path / "edm").mkdir()  # a folder with edm/ but no cd/: stage 2 starts from the adapted EDM
    assert resolve_pretrained(str(tmp_path)) == (str(tmp_path / "edm"), None)
    with pytest.raises(ValueError, match="adapt.pretrained is not set"):
        resolve_pretrained("")


def test_lora_trains_only_adapters_and_the_slot_layer(pretrained):
    net = select_trainable(load_model(pretrained / "edm"), "lora", lora_rank=2, lora_alpha=4,
                           lora_targets=["qkv", "proj", "fc1", "fc2", "adaLN"])
    x = torch.randn(4, 9, 16, 45)
    cond = encode_conditions([2e4] * 4, [1.5] * 4, [0.5] * 4, 3, 5)
    net(x, torch.zeros(4), cond).square().mean().backward()
    named = dict(net.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    with_grad = {n for n, p in named.items() if p.grad is not None}
    assert with_grad == trainable
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert sum("lora_A" in n for n in trainable) == 5 + 1  # qkv, proj, fc1, fc2, adaLN of 1 block + final adaLN
    slot_col = named["base_model.model.cond_embed.0.modules_to_save.default.weight"].grad[:, N_COND + 3]
    assert slot_col.abs().sum() > 0  # the new slot's one-hot column learns


def test_lora_adapt_cli_merged_equals_base_plus_adapter_and_generates(pretrained, data_dir, tmp_path):
    from peft import PeftModel

    out = tmp_path / "lora"  # its CD stage saves the student's EMA (distill.weights=ema), a copy of the peft model
    sets = [a for s in [*FAST, "adapt.n_train=40", "distill.weights=ema"] for a in ("--set", s)]
    res = CliRunner().invoke(app, ["adapt", "--pretrained", str(pretrained), "--detector", "fccee_allegro",
                                   "--data", str(data_dir / "fccee_allegro.h5"), "--mode", "lora",
                                   "--out", str(out), *sets])
    assert res.exit_code == 0, res.output
    assert "adapted models saved to" in res.output
    for stage in ("edm", "cd"):
        adapted, base = load_model(out / stage), load_model(pretrained / stage)
        assert adapted.slot_map == {**PRETRAINED, "fccee_allegro": 3}
        assert adapted.normalizer == base.normalizer
        assert adapted.objective == stage
        prov = adapted.provenance
        assert {k: prov[k] for k in ("detector", "mode", "n_train", "base_model")} == {
            "detector": "fccee_allegro", "mode": "lora", "n_train": 40, "base_model": str(pretrained / stage)}
        assert prov["steps"] == (3 if stage == "edm" else 2) and prov["data"].endswith("fccee_allegro.h5")
        assert stage == "edm" or prov["weights"].startswith("power-decay EMA of the student")
        assert (out / "adapters" / stage / "adapter_model.safetensors").is_file()
        with_adapter = PeftModel.from_pretrained(load_model(pretrained / stage), out / "adapters" / stage)
        merged_out = outputs(adapted, 3)
        torch.testing.assert_close(merged_out, outputs(with_adapter, 3), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(merged_out, outputs(base, 3), atol=1e-4)  # the adapter did learn something

    f = tmp_path / "f.h5"
    res = CliRunner().invoke(app, ["generate", "--model", str(out / "cd"), "--detector", "fccee_allegro",
                                   "--n", "10", "--out", str(f)])
    assert res.exit_code == 0, res.output
    with open_showers(f) as h:
        assert len(h) == 10 and h.detector == "fccee_allegro"
        assert h.read().showers.sum() > 0


def test_conditioning_changes_only_conditioning_parameters(pretrained, conditioning_run):
    for stage in ("edm", "cd"):
        before = load_model(pretrained / stage)
        after = load_model(conditioning_run / stage)
        names = set(before.conditioning_parameter_names())
        assert {"cond_embed.0.weight", "blocks.0.adaLN.weight", "final.adaLN.weight"} <= names
        a, b = after.state_dict(), before.state_dict()
        assert a.keys() == b.keys()
        frozen = [k for k in b if k not in names]
        assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)
        assert not torch.equal(a["cond_embed.0.weight"][:, N_COND + 3], b["cond_embed.0.weight"][:, N_COND + 3])
        assert after.slot_map == {**PRETRAINED, "fccee_allegro": 3} and after.normalizer == before.normalizer


def test_second_adaptation_takes_next_slot_and_refusals(pretrained, conditioning_run, data_dir, tmp_path):
    second = run_adapt(conditioning_run, data_dir, tmp_path / "second", "fccee_cld")
    model = load_model(second / "cd")
    assert model.slot_map == {**PRETRAINED, "fccee_allegro": 3, "fccee_cld": 4}
    assert model.provenance["base_model"] == str(conditioning_run / "cd")
    assert load_model(second / "edm").normalizer == load_model(pretrained / "edm").normalizer

    with pytest.raises(ValueError, match=r"'fccee_allegro' already has slot 3 in .*continue_slot"):
        run_adapt(second, data_dir, tmp_path / "taken", "fccee_allegro")
    with pytest.raises(ValueError, match=r"already holds an adapted model; pass --resume"):
        run_adapt(pretrained, data_dir, second, "fccee_cld")
    again = run_adapt(second, data_dir, tmp_path / "again", "fccee_allegro", "conditioning",
                      "adapt.continue_slot=true")
    assert load_model(again / "edm").slot_map == model.slot_map


def test_resume_runs_only_the_missing_stage(pretrained, data_dir, tmp_path):
    out = run_adapt(pretrained / "edm", data_dir, tmp_path / "out", "fccee_allegro", "full", "adapt.cd_steps=0")
    assert (out / "edm").is_dir() and not (out / "cd").exists()  # EDM stage only
    weights = (out / "edm" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds checkpoint|already holds an adapted model"):
        run_adapt(pretrained / "edm", data_dir, out, "fccee_allegro", "full")
    run_adapt(pretrained / "edm", data_dir, out, "fccee_allegro", "full", resume=True)
    assert (out / "edm" / "model.safetensors").read_bytes() == weights
    cd = load_model(out / "cd")  # no pretrained CD given: the student started from the adapted EDM
    assert cd.objective == "cd" and cd.provenance["student_init"].startswith("the adapted EDM")
    assert cd.slot_map == {**PRETRAINED, "fccee_allegro": 3}


def test_detector_response_units_measure_the_new_detector(pretrained, data_dir, tmp_path):
    """With `detector_response` units the frozen transform gains exactly one number: the new detector's response,
    measured on the adaptation showers; the shared mean and std and the other responses stay as pretrained."""
    normalizer = fit_normalizer(find_detector_files(data_dir, list(PRETRAINED)), eps=1e-6, unit="detector_response")
    r = normalizer.response
    assert r["odd"] < r["par04_siw"] < r["par04_scipb"]  # the sampling fractions' order (0.015, 0.02, 0.08)
    base = tmp_path / "base"
    for kind in ("edm", "cd"):
        save_model(load_model(pretrained / kind).with_config(normalizer=normalizer.to_dict()), base / kind)
    out = run_adapt(base, data_dir, tmp_path / "out")
    allegro = detector_response(data_dir / "fccee_allegro.h5", 40)
    assert allegro > r["par04_scipb"]  # ALLEGRO samples 14 %
    for kind in ("edm", "cd"):
        adapted = Normalizer.from_dict(load_model(out / kind).normalizer)
        assert adapted.response == pytest.approx({**r, "fccee_allegro": allegro})
        assert (adapted.unit, adapted.mean, adapted.std) == ("detector_response", normalizer.mean, normalizer.std)


@pytest.mark.parametrize("transfer", [True, False])
def test_cd_student_starts_where_the_edm_stage_moved_the_weights(pretrained, data_dir, tmp_path, transfer):
    out = run_adapt(pretrained, data_dir, tmp_path / "out", "fccee_allegro", "full", "adapt.cd_steps=0")
    # the CD stage alone, at a learning rate of 1e-30: the adapted CD is the student it started from
    run_adapt(pretrained, data_dir, out, "fccee_allegro", "full", "train.lr=1e-30",
              f"adapt.cd_transfer={str(transfer).lower()}", resume=True)
    edm0, edm1 = load_model(pretrained / "edm").state_dict(), load_model(out / "edm").state_dict()
    cd0, cd1 = load_model(pretrained / "cd"), load_model(out / "cd")
    moved = [k for k in edm0 if not torch.equal(edm0[k], edm1[k])]
    assert len(moved) == len(edm0)  # full mode: stage 1 moved every weight
    for name, w in cd0.state_dict().items():
        expected = w + (edm1[name] - edm0[name]) if transfer else w
        torch.testing.assert_close(cd1.state_dict()[name], expected, rtol=0, atol=1e-6)
    assert ("plus the EDM stage's change" in cd1.provenance["student_init"]) == transfer
