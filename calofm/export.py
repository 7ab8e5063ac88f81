"""Export a model to one self-contained graph with Geant4's Par04 contract (README.md, "Export to Geant4"): ONNX or TorchScript.

The graph takes (B, 8) = [E GeV, phi, theta, one-hot over the contract's 5 slots] and returns (B, 6480) cell energies
in GeV, flat index r*(16*45) + phi*45 + z. Everything between is inside it: the contract-to-model slot mapping,
the condition encoding, the Gaussian noise, the model's own sampler unrolled (`calofm.diffusion.sample`, so the
graph runs the very code eager generation runs), the inverse preprocessing and the 0.5 keV cut.

Both formats come from one trace (`torch.jit.trace`; ONNX through torch's TorchScript-based exporter): the sampler
loop unrolls into constants, which torch.export cannot do for the Heun step's branch on its noise level.

`precision` int8 (ONNX only) is onnxruntime's dynamic quantisation of the graph: int8 weights, activations
quantised per batch at run time. `onnx_graph` builds the same graph in memory for `calofm generate --backend
onnxruntime`.

Contract slots a model has no detector for (a pretrained model has no 'new' detector) give empty showers
(all zeros) rather than showers from an untrained one-hot; the export warns and the contract JSON marks them.
"""

from __future__ import annotations

import copy
import io
import json
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from calofm.data.transforms import Normalizer, kinematics
from calofm.diffusion import DEPOSIT_STEPS, network_evaluations, sample, sampler_steps, step_noise_draws
from calofm.geometry import DR_MM, DZ_MM, E_MIN_MEV, EMAX_GLOBAL_MEV, N_CELLS, PHI_RANGE, SHAPE, THETA_RANGE
from calofm.io import atomic_path, atomic_write_text
from calofm.particles import PHOTON

CONTRACT_SLOTS = ("par04_siw", "par04_scipb", "odd", "fccee_cld", "new")
INPUT_LAYOUT = ("energy_gev", "phi_rad", "theta_rad", *(f"onehot_{s}" for s in CONTRACT_SLOTS))
OUTPUT_THRESHOLD_GEV = 0.5e-6  # cells under 0.5 keV are zero in the contract's output
FORMATS = ("onnx", "torchscript")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("fp32", "int8")  # int8: onnxruntime's dynamic quantisation of the ONNX graph
ONNX_OPSET = 17  # the first opset with LayerNormalization; runs on every onnxruntime since 1.11
ORT_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
CONTRACT_KEY = "calofm_contract"  # the contract JSON, also embedded in the exported file


def contract_slots(slot_map: dict[str, int], new_detector: str | None = None) -> dict[str, str | None]:
    """Contract slot -> the model's detector in it (None: the model has no such detector).

    The first four contract slots are detectors by name; 'new' is the one detector of the slot map outside them
    (an adapted model's), or `new_detector` when there are several.
    """
    others = sorted(d for d in slot_map if d not in CONTRACT_SLOTS[:-1])
    if new_detector is not None:
        if new_detector not in others:
            raise ValueError(f"new detector {new_detector!r} is not an adapted detector of this model; "
                             f"its slot map is {slot_map}")
        others = [new_detector]
    if len(others) > 1:
        raise ValueError(f"the model has several detectors for the contract's 'new' slot ({', '.join(others)}): "
                         "pick one with --new-detector")
    named = {s: (s if s in slot_map else None) for s in CONTRACT_SLOTS[:-1]}
    return {**named, "new": others[0] if others else None}


def slot_matrix(slot_map: dict[str, int], n_slots: int, slots: dict[str, str | None]) -> torch.Tensor:
    """(5, n_slots) 0/1 matrix taking the contract one-hot to the model's one-hot; unsupported slots are zero rows."""
    m = torch.zeros(len(CONTRACT_SLOTS), n_slots)
    for i, name in enumerate(CONTRACT_SLOTS):
        if slots[name] is not None:
            m[i, slot_map[slots[name]]] = 1.0
    return m


class Par04Generator(nn.Module):
    """The exported graph: contract conditions (B, 8) [+ noise (B, 9, 16, 45) [+ deposit noise (B, 1 or 3) [+ step noise
    (k, B, 9, 16, 45)]]] -> (B, 6480) energies in GeV. Step noise is what a stochastic sampler adds on the way
    (`calofm.diffusion.step_noise_draws`: k re-noisings of a multistep CD sampler or churned EDM steps)."""

    def __init__(self, model: nn.Module, steps: int, slots: dict[str, str | None]):
        super().__init__()
        self.model = model
        self.steps = steps
        self.normalizer = Normalizer.from_dict(model.normalizer)
        m = slot_matrix(model.slot_map, model.n_slots, slots)
        self.register_buffer("slot_matrix", m, persistent=False)
        self.register_buffer("supported", m.sum(1), persistent=False)
        # per contract slot, in units of E_inc: the detector response (units detector_response, deposit), or 1
        n = self.normalizer
        response = [n.response[slots[s]] if n.uses_response and slots[s] else 1.0 for s in CONTRACT_SLOTS]
        self.register_buffer("slot_response", torch.tensor(response), persistent=False)
        # the contract is photons: a model with particle slots gets its photon one-hot
        photon = torch.zeros(1, model.n_particle_slots)
        if model.n_particle_slots:
            if PHOTON not in model.particle_map:
                raise ValueError(f"the Par04 contract is photons, but the model has no photon slot; its particles: "
                                 f"{model.particle_map}")
            photon[0, model.particle_map[PHOTON]] = 1.0
        self.register_buffer("photon", photon, persistent=False)

    def model_conditions(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's condition vector, laid out as `calofm.data.transforms.encode_conditions` lays it out."""
        k = kinematics(inputs[:, 0] * 1000.0, inputs[:, 2], inputs[:, 1])
        parts = [k, inputs[:, 3:] @ self.slot_matrix]
        if self.photon.shape[1]:  # a constant of the model: the traced graph has no branch
            parts.append(self.photon.expand(inputs.shape[0], -1))
        return torch.cat(parts, 1)

    @property
    def noise_names(self) -> list[str]:
        """The graph's noise inputs when it takes them (`noise_input`): its step noise only for a model that draws
        the deposit, as the inputs are positional (a model without one draws its step noise inside the graph)."""
        names = ["noise"]
        if self.model.deposit_net is not None:
            names.append("deposit_noise")
            if step_noise_draws(self.model, self.steps):
                names.append("step_noise")
        return names

    def noise_shapes(self, batch) -> dict[str, list]:
        """Each noise input's shape (`noise_names`), for a batch size or the free axis's name."""
        drawn = self.model.deposit_net.dim if self.model.deposit_net is not None else 1
        shapes = {"noise": [batch, *SHAPE], "deposit_noise": [batch, drawn],
                  "step_noise": [step_noise_draws(self.model, self.steps), batch, *SHAPE]}
        return {name: shapes[name] for name in self.noise_names}

    def forward(self, inputs: torch.Tensor, noise: torch.Tensor | None = None,
                deposit_noise: torch.Tensor | None = None, step_noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:  # randn_like follows the input's device, so one graph serves CPU and CUDA
            noise = torch.randn_like(inputs[:, :1, None, None].expand(-1, *SHAPE))
        if deposit_noise is None and self.model.deposit_net is not None:
            deposit_noise = torch.randn_like(inputs[:, :1].expand(-1, self.model.deposit_net.dim))
        z, deposit = sample(self.model, noise, self.model_conditions(inputs), steps=self.steps,
                            deposit_noise=deposit_noise, step_noise=step_noise)
        n = self.normalizer
        # E_inc (x response) in MeV; a product and sum, not a MatMul, which int8 export would quantise (by 24%)
        scale = inputs[:, 0] * 1000.0 * (inputs[:, 3:] * self.slot_response).sum(1)
        unit = None if n.unit == "mev" else n.decode_deposit(deposit, scale) if n.has_deposit else scale
        gev = n.inverse(z, unit) / 1000.0
        unsupported = (inputs[:, 3:] @ self.supported < 0.5).view(-1, 1, 1, 1)
        return torch.where((gev < OUTPUT_THRESHOLD_GEV) | unsupported, torch.zeros_like(gev), gev).flatten(1)


def model_config(model: nn.Module) -> dict:
    keys = ("preset", "depth", "width", "heads", "mlp_dim", "patch", "n_slots", "slot_map", "normalizer",
            "objective", "sampler", "provenance")
    return {k: getattr(model, k) for k in keys}


def contract(model: nn.Module, fmt: str, device: str, batch: int | None, steps: int,
             slots: dict[str, str | None], noise_shapes: dict[str, list], source: str | None,
             precision: str = "fp32") -> dict:
    """What a Geant4 user needs to call the graph, as JSON; `noise_shapes`: its noise inputs
    (`Par04Generator.noise_shapes`; none: drawn inside)."""
    batch_dim = batch if batch is not None else "batch"
    evaluations = network_evaluations(model, steps)
    deposit_evaluations = 2 * DEPOSIT_STEPS - 1 if model.deposit_net is not None else 0
    draws = step_noise_draws(model, steps)
    inputs = [dict(name="conditions", shape=[batch_dim, len(INPUT_LAYOUT)], dtype="float32",
                   layout=list(INPUT_LAYOUT),
                   units=dict(energy="GeV", phi="rad", theta="rad"),
                   ranges=dict(energy_gev=[E_MIN_MEV / 1000, EMAX_GLOBAL_MEV / 1000], phi_rad=list(PHI_RANGE),
                               theta_rad=list(THETA_RANGE)))]
    described = {"noise": "unit Gaussian start of the sampler (for validation against PyTorch)",
                 "deposit_noise": "unit Gaussian start of the sampler of the total deposit [and transverse centre]",
                 "step_noise": "unit Gaussian noise the sampler adds on the way (multistep re-noising or EDM "
                               "churn), one tensor a step that adds it"}
    inputs += [dict(name=n, shape=shape, dtype="float32", description=described[n])
               for n, shape in noise_shapes.items()]
    noise = ("drawn inside the graph" if not noise_shapes else "all from the noise inputs"
             if not draws or "step_noise" in noise_shapes
             else "the sampler starts from the 'noise' input; its step noise is drawn inside the graph")
    return dict(
        contract="geant4-par04",
        format=fmt,
        device=device,
        precision=precision,
        **({"opset": ONNX_OPSET, "providers": ORT_PROVIDERS[device]} if fmt == "onnx" else {}),
        inputs=inputs,
        slots=[dict(index=i, name=name, model_detector=slots[name],
                    model_slot=model.slot_map[slots[name]] if slots[name] is not None else None)
               for i, name in enumerate(CONTRACT_SLOTS)],
        unsupported_slots="an empty shower (all zeros)",
        output=dict(name="energies", shape=[batch_dim, N_CELLS], dtype="float32", unit="GeV",
                    index="r*(16*45) + phi*45 + z", mesh=dict(zip(("r", "phi", "z"), SHAPE, strict=True)),
                    dr_mm=DR_MM, dz_mm=DZ_MM, dphi_rad=2 * math.pi / SHAPE[1], threshold_gev=OUTPUT_THRESHOLD_GEV),
        noise=noise,
        sampler=dict(objective=model.objective, steps=steps, network_evaluations=evaluations,
                     deposit_net_evaluations=deposit_evaluations),
        model_source=source,
        model=model_config(model),
    )


def sidecar_path(out: str | Path) -> Path:
    """The contract JSON beside an exported file: model.onnx -> model.onnx.json."""
    out = Path(out)
    return out.with_name(out.name + ".json")


@contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence what tracing says by design: the unrolled loop's constants, and that torch prefers torch.export
    (which cannot unroll the Heun step's branch on its noise level; Geant4 needs TorchScript and ONNX)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _trace(graph: Par04Generator, example: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    """torch.jit.trace with device constants replaced by the input's device, so the file runs on CPU or CUDA."""
    with _quiet_tracing():
        traced = torch.jit.trace(graph, example, check_trace=False)
    g = traced.graph
    torch._C._jit_pass_inline(g)  # one flat graph, so every device constant can see the input
    conditions = list(g.inputs())[1]
    for node in list(g.findAllNodes("prim::Constant")):
        if node.output().type().kind() == "DeviceObjType":
            device = g.create("prim::device", [conditions])
            device.output().setType(node.output().type())
            device.insertBefore(node)
            node.output().replaceAllUsesWith(device.output())
            node.destroy()
    return traced


def _write_torchscript(graph: Par04Generator, example: tuple, path: Path, meta: str) -> None:
    buf = io.BytesIO()  # not saved to `path` directly: the archive's folder would be named after the temporary file
    with _quiet_tracing():
        torch.jit.save(_trace(graph, example), buf, _extra_files={f"{CONTRACT_KEY}.json": meta})
    path.write_bytes(buf.getvalue())


def _onnx_proto(graph: Par04Generator, example: tuple, meta: str, dynamic_batch: bool, precision: str):
    """The graph as an ONNX ModelProto with the contract in its metadata; int8: `_quantize_int8` of it."""
    import onnx

    names = ["conditions", *graph.noise_names][: len(example)]
    axes = {n: {1 if n == "step_noise" else 0: "batch"} for n in [*names, "energies"]}
    buf = io.BytesIO()
    with _quiet_tracing():  # the TorchScript-based exporter: it unrolls the sampler as torch.jit.trace does
        torch.onnx.export(graph, example, buf, dynamo=False, opset_version=ONNX_OPSET, input_names=names,
                          output_names=["energies"], dynamic_axes=axes if dynamic_batch else None)
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name = "calofm"
    onnx.checker.check_model(proto, full_check=True)
    if precision == "int8":
        proto = _quantize_int8(proto)
    onnx.helper.set_model_props(proto, {CONTRACT_KEY: meta})
    return proto


def _quantize_int8(proto):
    """onnxruntime's recommended CPU recipe: `quant_pre_process` (shape inference, graph optimisation), then
    `quantize_dynamic` with int8 weights (QInt8) and uint8 activations quantised batch by batch at run time, so
    no calibration data is needed."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="calofm-int8-") as tmp:  # both steps write only to files
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(proto, pre)
        quantize_dynamic(pre, out, weight_type=QuantType.QInt8)
        return onnx.load(str(out))


def _write_onnx(graph: Par04Generator, example: tuple, path: Path, meta: str, dynamic_batch: bool,
                precision: str) -> None:
    import onnx

    onnx.save(_onnx_proto(graph, example, meta, dynamic_batch, precision), str(path))


def _check_runs(fmt: str, path: Path, device: str, example: tuple[torch.Tensor, ...]) -> None:
    """Load the written file back and run it once (on CUDA when asked for and present, else on CPU)."""
    if fmt == "onnx":
        import onnxruntime as ort

        providers = [p for p in ORT_PROVIDERS[device] if p in ort.get_available_providers()]
        session = ort.InferenceSession(str(path), providers=providers)
        feeds = {i.name: t.cpu().numpy() for i, t in zip(session.get_inputs(), example, strict=True)}
        out = torch.from_numpy(session.run(None, feeds)[0])
    else:
        run_on = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
        with _quiet_tracing():
            module = torch.jit.load(str(path), map_location=run_on)
        with torch.no_grad():
            out = module(*(t.to(run_on) for t in example)).cpu()
    if out.shape != (example[0].shape[0], N_CELLS) or out.isnan().any():
        raise RuntimeError(f"{path}: the exported graph returned shape {tuple(out.shape)}"
                           f"{' with NaN' if out.isnan().any() else ''}; expected ({example[0].shape[0]}, {N_CELLS})")


def check_options(fmt: str, device: str = "cpu", batch: int = 1, steps: int | None = None,
                  precision: str = "fp32") -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown export precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if precision == "int8" and fmt != "onnx":
        raise ValueError("int8 export is ONNX only (onnxruntime's dynamic quantisation); TorchScript is fp32")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def _prepare(model: nn.Module, steps: int | None, new_detector: str | None,
             source: str | None) -> tuple[Par04Generator, dict[str, str | None]]:
    """The Par04 graph of a frozen copy of `model` (a peft model merged), and its contract slots."""
    model = copy.deepcopy(model)  # the caller's model keeps its mode, gradients and adapters
    if hasattr(model, "merge_and_unload"):  # a peft model: LoRA deltas folded into plain Linear weights
        model = model.merge_and_unload()
    if getattr(model, "normalizer", None) is None:
        raise ValueError(f"{source or 'model'}: no normaliser in the model config (config.json key 'normalizer'); "
                         "only models trained by calofm can be exported")
    if getattr(model, "calofm_int8", False):
        raise ValueError("a torch-quantised (int8) model cannot be exported; export the fp32 model with "
                         "precision int8 (onnxruntime's own quantisation)")
    slots = contract_slots(model.slot_map, new_detector)
    model.eval().requires_grad_(False)  # the saved graph then never builds autograd state, whoever runs it
    return Par04Generator(model, sampler_steps(model, steps), slots).eval(), slots


def _example(graph: Par04Generator, batch: int, noise_input: bool) -> tuple[torch.Tensor, ...]:
    """Inputs to trace with, on the model's device."""
    device = next(graph.model.parameters()).device
    conditions = torch.tensor([[50.0, 1.0, 1.5, 1.0, 0.0, 0.0, 0.0, 0.0]], device=device)
    example = (conditions.expand(batch, -1).contiguous(),)
    if noise_input:
        example += tuple(torch.randn(shape, device=device) for shape in graph.noise_shapes(batch).values())
    return example


def onnx_graph(model: nn.Module, *, steps: int | None = None, new_detector: str | None = None,
               precision: str = "fp32") -> tuple[bytes, dict[str, str | None]]:
    """`model` as an in-memory ONNX graph (serialised) with noise inputs and a free batch axis, and its contract
    slots: what `calofm generate --backend onnxruntime` opens, without a file."""
    check_options("onnx", steps=steps, precision=precision)
    graph, slots = _prepare(model, steps, new_detector, None)
    meta = json.dumps(contract(graph.model, "onnx", "cpu", None, graph.steps, slots, graph.noise_shapes("batch"), None,
                               precision))
    with torch.no_grad():
        proto = _onnx_proto(graph, _example(graph, 2, True), meta, True, precision)
    return proto.SerializeToString(), slots


def export_model(model: nn.Module, out: str | Path, fmt: str = "onnx", *, device: str = "cpu", batch: int = 1,
                 dynamic_batch: bool = False, steps: int | None = None, new_detector: str | None = None,
                 noise_input: bool = False, source: str | None = None, precision: str = "fp32") -> Path:
    """Write `model` (a CaloDiT, or a peft-wrapped one: merged first) as one Par04 graph, plus its contract JSON.

    `batch` fixes the batch size (1 in the contract); `dynamic_batch` makes it a free axis instead. `noise_input`
    adds the sampler's starting noise as a second input, so the graph can be compared with eager PyTorch.
    `precision` int8 (ONNX only) quantises the graph with onnxruntime's `quantize_dynamic`: int8 weights, smaller
    file, activations quantised per batch at run time.
    Returns the path of the exported file; the contract lands at `sidecar_path(out)`.
    """
    check_options(fmt, device, batch, steps, precision)
    graph, slots = _prepare(model, steps, new_detector, source)
    model, steps = graph.model, graph.steps
    if model.objective != "cd":
        warnings.warn(f"exporting an {model.objective.upper()} model: {network_evaluations(model, steps)} network "
                      f"evaluations per shower ({steps} {model.sampler.get('name', 'heun')} steps) "
                      "make the graph slow; distil it to a consistency model (calofm distill) for Geant4",
                      stacklevel=2)
    missing = [s for s, d in slots.items() if d is None]
    if missing:
        warnings.warn(f"the model has no detector for contract slot(s) {', '.join(missing)}: "
                      "those one-hots give empty showers", stacklevel=2)

    example = _example(graph, 2 if dynamic_batch else batch, noise_input)  # a traced size-1 axis could be specialised
    batch_dim = "batch" if dynamic_batch else batch
    meta = json.dumps(contract(model, fmt, device, None if dynamic_batch else batch, steps, slots,
                               graph.noise_shapes(batch_dim) if noise_input else {}, source, precision), indent=2)

    out = Path(out)
    with atomic_path(out) as tmp, torch.no_grad():
        if fmt == "onnx":
            _write_onnx(graph, example, tmp, meta, dynamic_batch, precision)
        else:
            _write_torchscript(graph, example, tmp, meta)
        _check_runs(fmt, tmp, device, example)
    atomic_write_text(sidecar_path(out), meta + "\n")
    return out


def export(path_or_repo: str | Path, out: str | Path, fmt: str = "onnx", *, device: str = "cpu", batch: int = 1,
           dynamic_batch: bool = False, steps: int | None = None, new_detector: str | None = None,
           noise_input: bool = False, precision: str = "fp32") -> Path:
    """The `calofm export` job: load a model folder or Hub repo, then `export_model`."""
    from calofm.hub import load_model

    check_options(fmt, device, batch, steps, precision)  # before the (possibly long) load
    path = Path(path_or_repo)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        # its base would be the pretrained model, whose slot map lacks the adapted detector: merging is adapt's job
        raise ValueError(f"{path}: a LoRA adapter alone, not a model; export the merged model folder that "
                         "`calofm adapt` writes (OUT/edm or OUT/cd), or pass a merged or peft model to "
                         "calofm.export.export_model")
    return export_model(load_model(path_or_repo), out, fmt, device=device, batch=batch, dynamic_batch=dynamic_batch,
                        steps=steps, new_detector=new_detector, noise_input=noise_input, source=str(path_or_repo),
                        precision=precision)
