"""Showers in MeV from a saved model: conditions in, physics units out, batched, split over processes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from calofm.data.formats import Showers
from calofm.data.transforms import Normalizer, encode_conditions
from calofm.diffusion import sample, sampler_steps, step_noise_draws
from calofm.export import CONTRACT_SLOTS, INPUT_LAYOUT
from calofm.export import PRECISIONS as EXPORT_PRECISIONS
from calofm.geometry import SHAPE
from calofm.memory import keep_freed_memory
from calofm.particles import PARTICLES, PHOTON, particle_code, particle_slots

PRECISIONS = ("fp32", "bf16", "int8")
# Showers per forward pass: on a CPU the cost per shower is flat from batch 16 to 256, but at 256 the allocator's
# page faults cost half the compute again in system time (benchmarks/generation.md); raise it on a GPU.
DEFAULT_BATCH = 64
BACKENDS = ("torch", "onnxruntime")
# what each backend runs: onnxruntime runs the exported graph, so the precisions it can be exported at
BACKEND_PRECISIONS = {"torch": PRECISIONS, "onnxruntime": EXPORT_PRECISIONS}


def with_precision(model, precision: str):
    """The model to sample with at `precision`: itself for fp32 and bf16 (bf16 is autocast at sampling time);
    for int8 a copy whose Linear layers are dynamically quantised (torch.ao `quantize_dynamic`: int8 weights,
    activations quantised per batch). Quantising an already quantised model returns it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "int8" or getattr(model, "calofm_int8", False):
        return model
    import copy
    import warnings

    with warnings.catch_warnings():
        # torch.ao's deprecation notices (its successor, torchao, is not a calofm dependency): it works in 2.13
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model).eval(), {torch.nn.Linear},
                                                           dtype=torch.qint8)
    quantized.calofm_int8 = True
    return quantized


def detector_slot(model, detector: str) -> int:
    if detector not in model.slot_map:
        raise ValueError(f"detector {detector!r} has no slot in this model; its slot map is {model.slot_map}")
    return model.slot_map[detector]


class OrtGenerator:
    """A model exported once (`calofm.export.onnx_graph`: the Par04 graph with noise inputs, a free batch axis and
    its `steps` unrolled) into an in-memory onnxruntime session; build it once and pass it to `generate_showers`
    again and again, as `with_precision`'s model is. fp32 runs the graph as exported; int8 runs onnxruntime's
    dynamic quantisation of it (int8 weights, activations quantised per batch)."""

    def __init__(self, model, precision: str = "fp32", steps: int | None = None, new_detector: str | None = None):
        import onnxruntime as ort

        from calofm.export import ORT_PROVIDERS, onnx_graph

        if precision not in BACKEND_PRECISIONS["onnxruntime"]:
            raise ValueError(f"precision {precision} is not supported by the onnxruntime backend "
                             f"({', '.join(BACKEND_PRECISIONS['onnxruntime'])}); use backend torch for it")
        self.model, self.precision, self.steps = model, precision, sampler_steps(model, steps)
        graph, self.slots = onnx_graph(model, steps=self.steps, new_detector=new_detector, precision=precision)
        on_cuda = next(model.parameters()).is_cuda and "CUDAExecutionProvider" in ort.get_available_providers()
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # so --threads sets both backends
        self.session = ort.InferenceSession(graph, options, providers=ORT_PROVIDERS["cuda" if on_cuda else "cpu"])

    def contract_slot(self, detector: str) -> int:
        """The contract one-hot index the graph generates `detector` with."""
        for i, name in enumerate(CONTRACT_SLOTS):
            if self.slots[name] == detector:
                return i
        raise ValueError(f"detector {detector!r} has no slot in this ONNX graph's Par04 contract "
                         f"({self.slots}); build the graph for it (with_backend(..., detector={detector!r}))")

    def __call__(self, conditions: np.ndarray, noise: torch.Tensor, deposit_noise: torch.Tensor,
                 step_noise: torch.Tensor | None) -> np.ndarray:
        """(B, 8) contract conditions -> (B, 6480) GeV, from this noise (`shower_noise`'s)."""
        feeds = {"conditions": conditions, "noise": noise.numpy(), "deposit_noise": deposit_noise.numpy(),
                 "step_noise": None if step_noise is None else step_noise.numpy()}
        return self.session.run(None, {i.name: feeds[i.name] for i in self.session.get_inputs()})[0]


def with_backend(model, backend: str = "torch", precision: str = "fp32", steps: int | None = None,
                 detector: str | None = None):
    """What `generate_showers` samples with: for torch, `with_precision(model, precision)`; for onnxruntime, an
    `OrtGenerator` (its graph unrolls `steps`; an adapted `detector` takes the contract's 'new' slot). An
    OrtGenerator of the same precision and steps is returned as it is, so the model is exported once."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    base = model.model if isinstance(model, OrtGenerator) else model
    if backend == "torch":
        return with_precision(base, precision)
    if isinstance(model, OrtGenerator) and (model.precision, model.steps) == (precision, sampler_steps(base, steps)):
        return model
    adapted = detector if detector is not None and detector not in CONTRACT_SLOTS[:-1] else None
    return OrtGenerator(base, precision, steps, new_detector=adapted)


def shower_noise(seed: int, index: np.ndarray, draws: int, device, drawn: int = 1) -> tuple[torch.Tensor, ...]:
    """All the Gaussian noise of showers `index`, each drawn from its own generator keyed by (seed, index): the
    starting noise (B, 9, 16, 45), the deposit's (B, `drawn`: `drawn_dim`) and `draws` more of a shower's shape that the sampler adds
    on the way ((draws, B, ...), `calofm.diffusion.step_noise_draws`; None when 0). So a shower is the same
    whatever the batch it is generated in, or the process."""
    parts = []
    for i in index:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, int(i)]).generate_state(1)[0]))
        parts.append((torch.randn(SHAPE, generator=g), torch.randn(drawn, generator=g),
                      torch.randn((draws, *SHAPE), generator=g)))
    noise, deposit, steps = (torch.stack(p).to(device) for p in zip(*parts))
    return noise, deposit, steps.transpose(0, 1) if draws else None


def drawn_dim(model) -> int:
    """How many numbers the model's deposit net draws a shower (1: E_dep; 3: with the centre); 1 without one."""
    return model.deposit_net.dim if model.deposit_net is not None else 1


@torch.no_grad()
def generate_showers(model, detector: str, energy, theta, phi, *, steps: int | None = None,
                     batch_size: int = DEFAULT_BATCH, seed: int = 0, first_index: int = 0, precision: str = "fp32",
                     backend: str = "torch", progress: Callable[[int], None] | None = None,
                     pdg=PARTICLES[PHOTON]) -> Showers:
    """One shower per (energy MeV, theta, phi[, pdg: the particle's PDG code, one or one a shower]); the model's
    own sampler (EDM Heun, FM or CD) and step default.
    Shower i's noise depends only on (seed, first_index + i). `precision`: fp32, bf16 (autocast) or int8
    (`with_precision`). `backend` onnxruntime runs the exported Par04 graph on the same noise (fp32 or int8;
    cells under its 0.5 keV cut are zero).
    Calling repeatedly, pass `with_backend`'s result, so the model is quantised or exported once."""
    base = model.model if isinstance(model, OrtGenerator) else model
    if base.normalizer is None:
        raise ValueError("model has no normaliser in its config; it was not trained by calofm")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    energy, theta, phi = (np.asarray(a, dtype=np.float32).reshape(-1) for a in (energy, theta, phi))
    pdg = np.broadcast_to(np.asarray(pdg, dtype=np.int32).reshape(-1), energy.shape)
    slot = detector_slot(base, detector)
    particles = particle_slots(base.particle_map, base.n_particle_slots, pdg, "this model")
    if backend == "onnxruntime" and base.n_particle_slots:
        raise ValueError("the onnxruntime backend runs the Par04 graph, which is the photon contract; use the "
                         "torch backend for a model with particle slots")
    model = with_backend(model, backend, precision, steps, detector)
    if isinstance(model, OrtGenerator):
        return _generate_ort(model, detector, energy, theta, phi, batch_size, seed, first_index, progress)
    normalizer = Normalizer.from_dict(model.normalizer)
    device = next(model.parameters()).device
    model.eval()
    steps = sampler_steps(model, steps)
    draws = step_noise_draws(model, steps)
    out = []
    for start in range(0, len(energy), batch_size):
        sl = slice(start, start + batch_size)
        cond = encode_conditions(energy[sl], theta[sl], phi[sl], slot, model.n_slots, particles[sl],
                                 model.n_particle_slots).to(device)
        index = first_index + np.arange(start, start + cond.shape[0])
        noise, deposit_noise, step_noise = shower_noise(seed, index, draws, device, drawn_dim(model))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            z, deposit = sample(model, noise, cond, steps=steps, deposit_noise=deposit_noise, step_noise=step_noise)
        unit = normalizer.generated_unit(torch.from_numpy(energy[sl]).to(device), detector, deposit)
        out.append(normalizer.inverse(z.float(), unit).cpu().numpy())
        if progress is not None:
            progress(cond.shape[0])
    showers = np.concatenate(out) if out else np.zeros((0, *SHAPE), np.float32)
    return Showers(showers.astype(np.float32), energy, phi, theta, pdg)


def _generate_ort(run: OrtGenerator, detector: str, energy: np.ndarray, theta: np.ndarray, phi: np.ndarray,
                  batch_size: int, seed: int, first_index: int, progress: Callable[[int], None] | None) -> Showers:
    """`generate_showers` through the graph: contract conditions (GeV, phi, theta, one-hot) in, GeV out."""
    slot = run.contract_slot(detector)
    draws = step_noise_draws(run.model, run.steps)
    out = []
    for start in range(0, len(energy), batch_size):
        sl = slice(start, start + batch_size)
        x = np.zeros((len(energy[sl]), len(INPUT_LAYOUT)), np.float32)
        x[:, 0], x[:, 1], x[:, 2], x[:, 3 + slot] = energy[sl] / 1000.0, phi[sl], theta[sl], 1.0
        index = first_index + np.arange(start, start + len(x))
        out.append(run(x, *shower_noise(seed, index, draws, "cpu", drawn_dim(run.model))).reshape(-1, *SHAPE) * 1000.0)
        if progress is not None:
            progress(len(x))
    showers = np.concatenate(out) if out else np.zeros((0, *SHAPE), np.float32)
    return Showers(showers.astype(np.float32), energy, phi, theta)


def _conditions_of(path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(energy, phi, theta, pdg) of every shower in a file, read and validated chunk by chunk (bounded memory)."""
    from calofm.data.formats import open_showers

    parts = []
    with open_showers(path) as f:
        for s in f.iter_chunks(4096):
            parts.append((s.energy, s.phi, s.theta, s.pdg))
    return tuple(np.concatenate(a) for a in zip(*parts))


def generate_to_file(model_ref: str, detector: str, out, *, n: int = 1000, energy_gev: float | None = None,
                     theta: float | None = None, phi: float | None = None, conditions=None,
                     steps: int | None = None, batch_size: int = DEFAULT_BATCH, seed: int = 0, fmt: str = "lemurs",
                     precision: str = "fp32", backend: str = "torch", particle: str = PHOTON):
    """The `calofm generate` job: conditions, split over processes (torchrun), streamed into one file. The model
    is quantised or exported (`with_backend`) once, before the first batch.

    Each batch is written as soon as it is made (`write_stream`), so memory does not grow with `n`; under
    torchrun each process streams its share into a hidden part file beside `out`, and the main process streams
    the parts into `out`. Every file appears under its name only once complete (atomic rename). The particle is
    `particle`, or with `conditions` each shower's own (a file without particle codes: photons)."""
    from accelerate import PartialState

    from calofm.data.formats import FORMATS, open_showers, write_stream
    from calofm.data.synthetic import conditions as sample_conditions
    from calofm.hub import load_model
    from calofm.progress import progress

    keep_freed_memory()
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    model = load_model(model_ref)
    detector_slot(model, detector)
    if conditions is not None:
        e, p, t, pdg = _conditions_of(conditions)
    else:  # checked against the detector's ranges before any work is done
        e, p, t = sample_conditions(detector, n, np.random.default_rng(seed),
                                    None if energy_gev is None else energy_gev * 1000.0, phi, theta)
        pdg = np.full(len(e), particle_code(particle), np.int32)
    particle_slots(model.particle_map, model.n_particle_slots, pdg, str(model_ref))

    state = PartialState(cpu=not torch.cuda.is_available())
    model = model.to(state.device)
    attrs = {"detector": detector, "generated_by": f"calofm {model.objective} ({model_ref})",
             "sampler_steps": sampler_steps(model, steps), "precision": precision, "backend": backend}
    model = with_backend(model, backend, precision, steps, detector)
    out = Path(out)
    with state.split_between_processes(list(range(len(e)))) as mine:  # a list: Accelerate splits no ndarray
        mine = np.asarray(mine, dtype=np.int64)
        first = int(mine[0]) if len(mine) else 0
        target = out if state.num_processes == 1 else out.with_name(f".{out.name}.part{state.process_index}.h5")
        bar = progress(state.is_main_process, total=len(mine), desc=f"generate {detector}", unit="shower")
        batches = (generate_showers(model, detector, e[mine[i:i + batch_size]], t[mine[i:i + batch_size]],
                                    p[mine[i:i + batch_size]], steps=steps, batch_size=batch_size, seed=seed,
                                    first_index=first + i, precision=precision, backend=backend,
                                    progress=bar.update, pdg=pdg[mine[i:i + batch_size]])
                   for i in range(0, len(mine), batch_size))
        if len(mine):
            write_stream(target, fmt, len(mine), attrs, batches)
        elif target != out:
            target.unlink(missing_ok=True)  # no share: no part file, not even one from an earlier run
        bar.close()
    if state.num_processes == 1:
        return out
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    parts = [out.with_name(f".{out.name}.part{r}.h5") for r in range(state.num_processes)]
    parts = [q for q in parts if q.exists()]

    def chunks():
        for q in parts:
            with open_showers(q) as f:
                yield from f.iter_chunks(batch_size)

    write_stream(out, fmt, len(e), attrs, chunks())
    for q in parts:
        q.unlink()
    return out
