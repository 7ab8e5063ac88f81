"""Export to the Geant4 Par04 contract: the ONNX and TorchScript graphs against eager PyTorch, layout, units, errors."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from calofm.cli import app
from calofm.data.formats import Showers, read_showers, write_lemurs
from calofm.data.transforms import Normalizer, encode_conditions
from calofm.diffusion import DEPOSIT_STEPS, sample, step_noise_draws
from calofm.export import (
    CONTRACT_KEY,
    CONTRACT_SLOTS,
    INPUT_LAYOUT,
    OUTPUT_THRESHOLD_GEV,
    Par04Generator,
    contract_slots,
    export_model,
    sidecar_path,
    slot_matrix,
)
from calofm.hub import load_model
from calofm.models.dit import CaloDiT
from calofm.train.distill import cd_sampler

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # TorchScript is the contract

PRETRAIN_MAP = {"par04_siw": 0, "par04_scipb": 1, "odd": 2, "fccee_cld": 3}
ADAPTED_MAP = {**PRETRAIN_MAP, "fccee_allegro": 4}
# The CD copy's normaliser (unit `deposit`, the default) draws a total deposit of a few MeV at 64 GeV in ALLEGRO
# and spreads it widely over the cells, most of them under 0.5 keV, with no cut of its own: the contract's 0.5 keV
# cut is what the graph alone must do; the deposit's scale is E_inc x detector response, so the graph must also
# pick the response of the contract slot.
RESPONSE = {"par04_siw": 0.02, "par04_scipb": 0.07, "odd": 0.012, "fccee_cld": 0.017, "fccee_allegro": 0.1}
CUT_TEST_NORMALIZER = {"mean": 0.0, "std": 5.0, "threshold_mev": 0.0, "eps": 1e-12, "unit": "deposit",
                       "response": RESPONSE, "deposit_mean": float(np.log(5e-4)), "deposit_std": 1.0}


def model_copy(model: CaloDiT, **overrides) -> CaloDiT:
    keys = ("preset", "depth", "width", "heads", "mlp_dim", "patch", "n_slots", "slot_map", "normalizer",
            "objective", "sampler", "provenance")
    copy = CaloDiT(**{**{k: getattr(model, k) for k in keys}, **overrides})
    copy.load_state_dict(model.state_dict())
    return copy.eval()


@pytest.fixture(scope="module")
def edm(tiny_edm):
    return load_model(tiny_edm).eval()


@pytest.fixture(scope="module")
def cd_dir(edm, tmp_path_factory):
    """A consistency-objective copy of the EDM weights with an adapted detector in slot 4 (the contract's 'new')."""
    d = tmp_path_factory.mktemp("cd") / "model"
    model_copy(edm, objective="cd", slot_map=ADAPTED_MAP, normalizer=CUT_TEST_NORMALIZER,
               sampler=cd_sampler(1, edm)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def cd(cd_dir):
    return load_model(cd_dir).eval()


def contract_input(energy_gev, phi, theta, slots) -> np.ndarray:
    x = np.zeros((len(slots), len(INPUT_LAYOUT)), np.float32)
    x[:, 0], x[:, 1], x[:, 2] = energy_gev, phi, theta
    x[np.arange(len(slots)), 3 + np.array([CONTRACT_SLOTS.index(s) for s in slots])] = 1.0
    return x


def eager_mev(model, x: np.ndarray, detectors: list[str], noise: torch.Tensor, steps: int,
              deposit_noise: torch.Tensor, step_noise: torch.Tensor | None = None) -> np.ndarray:
    """The eager path (encode_conditions, calofm.diffusion.sample, Normalizer.inverse): (B, 9, 16, 45) MeV."""
    slot = torch.tensor([model.slot_map[d] for d in detectors])
    cond = encode_conditions(x[:, 0] * 1000.0, x[:, 2], x[:, 1], slot, model.n_slots)
    normalizer = Normalizer.from_dict(model.normalizer)
    z, deposit = sample(model, noise, cond, steps=steps, deposit_noise=deposit_noise, step_noise=step_noise)
    unit = normalizer.generated_unit(torch.from_numpy(x[:, 0] * 1000.0), detectors, deposit)
    return normalizer.inverse(z, unit).numpy()


def contract_cut(mev: np.ndarray) -> np.ndarray:
    return np.where(mev < OUTPUT_THRESHOLD_GEV * 1000, 0.0, mev).astype(np.float32)


def assert_matches(out_mev: np.ndarray, ref_mev: np.ndarray) -> None:
    """Equal to 1e-4 of each value plus 1e-4 of the shower's largest cell (exp(std * z) amplifies float32
    rounding in z about 6x in the smallest cells); cells within 0.1% of the cut may fall either side of it."""
    near_cut = np.abs(ref_mev / (OUTPUT_THRESHOLD_GEV * 1000) - 1) < 1e-3
    scale = np.abs(ref_mev).reshape(len(ref_mev), -1).max(1).reshape(-1, 1, 1, 1)
    ok = near_cut | (np.abs(out_mev - ref_mev) <= 1e-4 * np.abs(ref_mev) + 1e-4 * scale)
    assert ok.all(), f"{(~ok).sum()} cells differ; worst {np.abs(out_mev - ref_mev)[~ok].max()} MeV"


def run_exported(path, fmt: str, *inputs: np.ndarray) -> np.ndarray:
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {i.name: a for i, a in zip(session.get_inputs(), inputs, strict=True)})[0]
    return torch.jit.load(str(path))(*map(torch.from_numpy, inputs)).numpy()


def export_quietly(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the EDM-is-slow and unsupported-slot notes
        return export_model(*args, **kwargs)


# --- slot mapping and conditions ----------------------------------------------------------------------------


def test_contract_slots_map_by_name():
    assert contract_slots(PRETRAIN_MAP) == {**{s: s for s in CONTRACT_SLOTS[:-1]}, "new": None}
    assert contract_slots(ADAPTED_MAP)["new"] == "fccee_allegro"
    # a model with its own slot order and only some contract detectors
    slots = contract_slots({"odd": 0, "fccee_allegro": 1, "par04_siw": 2})
    assert slots == {"par04_siw": "par04_siw", "par04_scipb": None, "odd": "odd", "fccee_cld": None,
                     "new": "fccee_allegro"}
    m = slot_matrix({"odd": 0, "fccee_allegro": 1, "par04_siw": 2}, 3, slots)
    assert m.tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 1, 0]]
    two_new = {**PRETRAIN_MAP, "fccee_allegro": 4, "other": 5}
    with pytest.raises(ValueError, match="several detectors.*fccee_allegro, other.*--new-detector"):
        contract_slots(two_new)
    assert contract_slots(two_new, "other")["new"] == "other"
    with pytest.raises(ValueError, match="new detector 'odd' is not an adapted detector"):
        contract_slots(two_new, "odd")


def test_graph_conditions_equal_encode_conditions(cd):
    x = contract_input([1.0, 37.5, 1000.0], [0.0, 2.0, 6.2], [0.87, 1.6, 2.27], ["par04_siw", "fccee_cld", "new"])
    graph = Par04Generator(cd, 1, contract_slots(cd.slot_map))
    ref = encode_conditions(x[:, 0] * 1000.0, x[:, 2], x[:, 1], torch.tensor([0, 3, 4]), cd.n_slots)
    torch.testing.assert_close(graph.model_conditions(torch.from_numpy(x)), ref, rtol=1e-6, atol=1e-7)


# --- the exported graphs against eager PyTorch ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("objective,steps,detector", [("cd", 1, "new"), ("edm", 4, "par04_scipb"),
                                                      ("cd-from-fm", 1, "odd"), ("cd", 3, "odd")])
def test_export_matches_eager(fmt, objective, steps, detector, edm, cd, tmp_path):
    # cd-from-fm: the same weights read as a flow-matching teacher's student (diffusion.denoiser); the EDM (churned,
    # the default) and the 3-step CD add noise on the way: the graph takes it as its step_noise input
    model = {"cd": cd, "edm": edm}.get(objective) or cd.with_config(sampler={**cd.sampler, "teacher_objective": "fm"})
    out = export_quietly(model, tmp_path / f"g.{fmt}", fmt, steps=steps, noise_input=True)
    x = contract_input(64.0, 0.7, 1.3, [detector])
    g = torch.Generator().manual_seed(3)
    noise, dnoise = torch.randn(1, 9, 16, 45, generator=g), torch.randn(1, 1, generator=g)
    draws = step_noise_draws(model, steps)
    assert draws == (steps - 1 if model.objective == "cd" else 2)  # EDM: 2 of its 4 levels lie in [0.05, 50]
    snoise = torch.randn(draws, 1, 9, 16, 45, generator=g) if draws else None
    got = run_exported(out, fmt, x, noise.numpy(), dnoise.numpy(), *([snoise.numpy()] if draws else []))
    assert got.shape == (1, 6480) and got.dtype == np.float32

    eager = eager_mev(model, x, ["fccee_allegro" if detector == "new" else detector], noise, steps, dnoise, snoise)
    # units and index order: GeV, flat r*(16*45) + phi*45 + z, i.e. a C-order reshape to (r, phi, z) * 1000 = MeV
    assert_matches(got.reshape(1, 9, 16, 45) * 1000.0, contract_cut(eager))
    assert got[got > 0].min() >= OUTPUT_THRESHOLD_GEV
    if model.objective == "cd":  # the normaliser cuts nothing here: the graph's own 0.5 keV cut zeroed these cells
        below = (eager > 0) & (eager < OUTPUT_THRESHOLD_GEV * 1000 * 0.999)
        assert below.sum() > 100 and (got.reshape(eager.shape)[below] == 0).all()

    meta = json.loads(sidecar_path(out).read_text())
    assert meta["inputs"][0]["layout"] == list(INPUT_LAYOUT) and meta["inputs"][0]["shape"] == [1, 8]
    assert [s["name"] for s in meta["slots"]] == list(CONTRACT_SLOTS)
    assert meta["output"]["unit"] == "GeV" and meta["output"]["shape"] == [1, 6480]
    assert meta["sampler"] == {"objective": model.objective, "steps": steps,
                               "network_evaluations": steps if model.objective == "cd" else 2 * steps - 1,
                               "deposit_net_evaluations": 2 * DEPOSIT_STEPS - 1}  # the total deposit, drawn first
    assert [i["name"] for i in meta["inputs"]] == ["conditions", "noise", "deposit_noise"] + ["step_noise"] * bool(draws)
    assert meta["noise"] == "all from the noise inputs"
    assert meta["model"]["slot_map"] == model.slot_map
    if fmt == "onnx":
        proto = onnx.load(str(out))
        onnx.checker.check_model(proto, full_check=True)
        assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
        assert json.loads({p.key: p.value for p in proto.metadata_props}[CONTRACT_KEY]) == meta
    else:
        files = {f"{CONTRACT_KEY}.json": ""}
        module = torch.jit.load(str(out), _extra_files=files)
        assert json.loads(files[f"{CONTRACT_KEY}.json"]) == meta
        # device-neutral: no baked-in CPU device and only scalar constants, so the file also runs on CUDA
        code, constants = module.code_with_constants
        assert "cpu" not in code and "prim.device(inputs)" in code
        assert all(c.dim() == 0 for c in constants.const_mapping.values())


def test_export_of_a_model_that_draws_the_centre_matches_eager(edm, tmp_path):
    """A model with the normaliser's `centre` draws three numbers before the shape (deposit, centre x, y): the graph's
    deposit_noise input is (B, 3), and the shape's dipole term (zero at initialisation, so set here) is in it."""
    model = CaloDiT(**{**edm._hub_mixin_config, "normalizer": {**edm.normalizer, "centre": True, "centre_std": 0.5}})
    torch.manual_seed(0)
    torch.nn.init.normal_(model.dipole.weight, std=0.02)
    model.eval()
    out = export_quietly(model, tmp_path / "g.onnx", "onnx", steps=2, noise_input=True, dynamic_batch=True)
    meta = json.loads(sidecar_path(out).read_text())
    assert {i["name"]: i["shape"] for i in meta["inputs"]}["deposit_noise"] == ["batch", 3]
    x = contract_input([64.0, 500.0], [0.7, 2.0], [1.3, 1.8], ["par04_scipb", "odd"])
    g = torch.Generator().manual_seed(3)
    noise, dnoise = torch.randn(2, 9, 16, 45, generator=g), torch.randn(2, 3, generator=g)
    snoise = torch.randn(step_noise_draws(model, 2), 2, 9, 16, 45, generator=g)
    got = run_exported(out, "onnx", x, noise.numpy(), dnoise.numpy(), *([snoise.numpy()] if len(snoise) else []))
    eager = eager_mev(model, x, ["par04_scipb", "odd"], noise, 2, dnoise, snoise if len(snoise) else None)
    assert_matches(got.reshape(2, 9, 16, 45) * 1000.0, contract_cut(eager))
    with torch.no_grad():  # the dipole term is a visible part of what was compared
        model.dipole.weight.zero_()
    without = eager_mev(model, x, ["par04_scipb", "odd"], noise, 2, dnoise, snoise if len(snoise) else None)
    assert np.abs(without - eager).max() > 0.01 * np.abs(eager).max()


def test_batched_layout_through_lemurs_writer(cd, tmp_path):
    """(B, 8) -> (B, 6480): each row is the LEMURS file's (9, 16, 45) MeV shower, flattened, in GeV."""
    x = contract_input([2.0, 150.0, 900.0], [0.1, 3.0, 5.9], [0.9, 1.57, 2.2], ["par04_siw", "odd", "new"])
    g = torch.Generator().manual_seed(5)
    noise, dnoise = torch.randn(3, 9, 16, 45, generator=g), torch.randn(3, 1, generator=g)
    out = export_quietly(cd, tmp_path / "b3.onnx", "onnx", batch=3, noise_input=True)
    got = run_exported(out, "onnx", x, noise.numpy(), dnoise.numpy())
    assert got.shape == (3, 6480)
    eager = contract_cut(eager_mev(cd, x, ["par04_siw", "odd", "fccee_allegro"], noise, 1, dnoise))
    write_lemurs(tmp_path / "eager.h5", Showers(eager, x[:, 0] * 1000.0, x[:, 1], x[:, 2]))
    back = read_showers(tmp_path / "eager.h5")
    assert_matches(got.reshape(back.showers.shape) * 1000.0, back.showers)
    np.testing.assert_allclose(got.sum(1) * 1000.0, back.showers.reshape(3, -1).sum(1), rtol=1e-4)


def test_default_graph_draws_its_own_noise(edm, tmp_path):
    """The contract graph has one input; noise comes from the runtime's RNG; unsupported slots give empty showers."""
    x = contract_input([10.0, 10.0, 10.0, 10.0], [1.0] * 4, [1.2] * 4, ["par04_siw", "par04_siw", "new", "odd"])
    onnx_path = export_quietly(edm, tmp_path / "d.onnx", "onnx", steps=2, dynamic_batch=True)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("conditions", ["batch", 8])]
    a, b = session.run(None, {"conditions": x})[0], session.run(None, {"conditions": x})[0]
    assert a.shape == (4, 6480) and not np.isnan(a).any()
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[0], b[0])  # fresh noise per shower and call
    assert (a[2] == 0).all() and (a[[0, 1, 3]] > 0).any(1).all()  # the model has no 'new' detector

    ts = torch.jit.load(str(export_quietly(edm, tmp_path / "d.pt", "torchscript", steps=2, dynamic_batch=True)))
    x3 = torch.from_numpy(x[[0, 2, 3]])
    torch.manual_seed(0)
    c = ts(x3)
    torch.manual_seed(0)
    torch.testing.assert_close(ts(x3), c, rtol=0, atol=0)  # torch's RNG, so seedable
    assert c.shape == (3, 6480) and not torch.equal(ts(x3), c) and (c[1] == 0).all()


def test_peft_model_exports_merged(cd, tmp_path):
    """A LoRA (peft) model is merged on export; the caller's peft model keeps its adapters."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model_copy(cd), LoraConfig(r=4, target_modules=["qkv", "fc1", "adaLN"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(7))
    out = export_quietly(peft_model, tmp_path / "lora.onnx", "onnx", noise_input=True)
    assert hasattr(peft_model.base_model.model.blocks[0].attn.qkv, "lora_A")

    x = contract_input(30.0, 2.0, 1.8, ["new"])
    g = torch.Generator().manual_seed(9)
    noise, dnoise = torch.randn(1, 9, 16, 45, generator=g), torch.randn(1, 1, generator=g)
    got = run_exported(out, "onnx", x, noise.numpy(), dnoise.numpy()).reshape(1, 9, 16, 45) * 1000.0
    merged = peft_model.merge_and_unload().eval()
    assert_matches(got, contract_cut(eager_mev(merged, x, ["fccee_allegro"], noise, 1, dnoise)))
    base = contract_cut(eager_mev(cd, x, ["fccee_allegro"], noise, 1, dnoise))
    assert np.abs(got - base).max() > 1e-2 * base.max()  # the adapter changed the showers


# --- the command line and bad input --------------------------------------------------------------------------


def test_cli_export(cd_dir, tiny_edm, tmp_path):
    out = tmp_path / "cd.onnx"
    result = CliRunner().invoke(app, ["export", str(cd_dir), "--format", "onnx", "--device", "cuda", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out} (onnx, device cuda, fp32)" in result.output
    meta = json.loads(sidecar_path(out).read_text())
    assert meta["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"] and meta["sampler"]["steps"] == 1
    assert meta["model_source"] == str(cd_dir) and meta["precision"] == "fp32"

    result = CliRunner().invoke(app, ["export", str(tiny_edm), "--format", "torchscript", "--steps", "1",
                                      "--dynamic-batch", "--out", str(tmp_path / "edm.pt")])
    assert result.exit_code == 0, result.output
    assert "warning: exporting an EDM model" in result.output
    assert "warning: the model has no detector for contract slot(s) new" in result.output
    assert json.loads(sidecar_path(tmp_path / "edm.pt").read_text())["inputs"][0]["shape"] == ["batch", 8]


def test_cli_export_int8_is_smaller_and_says_so(cd_dir, tmp_path):
    """onnxruntime's dynamic quantisation of the written graph: int8 weights, a smaller file that still runs."""
    sizes = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / f"{precision}.onnx"
        result = CliRunner().invoke(app, ["export", str(cd_dir), "--format", "onnx", "--precision", precision,
                                          "--dynamic-batch", "--out", str(out)])
        assert result.exit_code == 0, result.output
        meta = json.loads(sidecar_path(out).read_text())
        assert meta["precision"] == precision
        assert json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}[CONTRACT_KEY]) == meta
        sizes[precision] = out.stat().st_size
    assert sizes["int8"] < 0.7 * sizes["fp32"]
    x = contract_input([20.0, 20.0], [1.0, 2.0], [1.5, 1.2], ["odd", "new"])
    got = run_exported(tmp_path / "int8.onnx", "onnx", x)
    assert got.shape == (2, 6480) and np.isfinite(got).all() and got.any()  # this normaliser's cells are mostly cut


def test_cli_export_bad_input(edm, cd_dir, tmp_path):
    def fails(*args: str) -> str:
        result = CliRunner().invoke(app, ["export", *args, "--out", str(tmp_path / "x.onnx")])
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1, result.output
        return result.output

    assert "Invalid value for '--format'" in fails(str(cd_dir), "--format", "savedmodel")
    assert "no such model folder" in fails(str(tmp_path / "nowhere"), "--format", "onnx")
    assert "Invalid value for '--device'" in fails(str(cd_dir), "--format", "onnx", "--device", "tpu")
    assert "exclude each other" in fails(str(cd_dir), "--format", "onnx", "--batch", "2", "--dynamic-batch")
    assert "int8 export is ONNX only" in fails(str(cd_dir), "--format", "torchscript", "--precision", "int8")
    assert "Invalid value for '--precision'" in fails(str(cd_dir), "--format", "onnx", "--precision", "bf16")
    adapter = tmp_path / "adapters" / "cd"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    assert f"{adapter}: a LoRA adapter alone" in fails(str(adapter), "--format", "onnx")
    bare = tmp_path / "bare"
    CaloDiT(patch=edm.patch, n_slots=edm.n_slots, slot_map=edm.slot_map).save_pretrained(bare)  # no normaliser
    msg = fails(str(bare), "--format", "onnx")
    assert str(bare) in msg and "no normaliser" in msg and "'normalizer'" in msg
    assert not (tmp_path / "x.onnx").exists() and not sidecar_path(tmp_path / "x.onnx").exists()
