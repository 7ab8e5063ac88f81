"""Training checkpoints that a crash, a full disk or a damaged file cannot turn into a bad resume.

A checkpoint is a folder `checkpoints/step_NNNNNNN` holding Accelerate's state (model.safetensors, optimizer.bin,
random_states_<rank>.pkl, all loaded by Accelerate with `weights_only=True`), calofm's own state as JSON
(`state.json`: step, skipped steps, world size, the LR scheduler) and safetensors (`ema_<i>.safetensors`: the EMA
and any target network), and last `manifest.json`: every file's size and sha256. Nothing in it is unpickled
beyond tensors, so a folder from elsewhere cannot run code. It is written into `.tmp-step_*` and renamed into place
only when complete; `--resume` takes the newest checkpoint whose files match its manifest and says why it passed
over any newer one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_model, save_model
from torch import nn

MANIFEST, STATE = "manifest.json", "state.json"


def checkpoints(out: str | Path) -> list[Path]:
    """The run's checkpoint folders, newest first."""
    return sorted((Path(out) / "checkpoints").glob("step_*"), reverse=True)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digest(manifest: dict) -> str:
    """The manifest's own checksum: of its canonical JSON without the checksum itself."""
    body = {k: v for k, v in manifest.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def damage(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be resumed from (missing manifest or file, size or checksum mismatch), or None."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = manifest["files"]
        if manifest["sha256"] != _digest(manifest):
            return f"{MANIFEST} does not match its own checksum (corrupted)"
        expected = [(name, int(meta["size"]), str(meta["sha256"])) for name, meta in files.items()]
    except FileNotFoundError:
        return f"no {MANIFEST} (an incomplete write, or a checkpoint from calofm < 0.2)"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    for name, size, sha256 in expected:
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size} (truncated?)"
        if _sha256(path) != sha256:
            return f"{name} does not match its sha256 in the manifest (corrupted)"
    return None


def step_of(ckpt: Path) -> int:
    """The training step a checkpoint folder `step_NNNNNNN` was written at."""
    return int(ckpt.name.removeprefix("step_"))


def last_good(out: str | Path) -> Path | None:
    """The newest checkpoint that matches its manifest, or None: what an error message points the user to."""
    return next((c for c in checkpoints(out) if damage(c) is None), None)


def resume_point(out: str | Path, say=print) -> Path | None:
    """The newest intact checkpoint; each newer damaged one is named with its reason. None if there is none at
    all; an error if all are damaged."""
    found, reasons = checkpoints(out), []
    for ckpt in found:
        reason = damage(ckpt)
        if reason is None:
            if reasons:
                say(f"resuming from {ckpt.name}, the newest intact checkpoint")
            return ckpt
        reasons.append(f"{ckpt.name}: {reason}")
        say(f"warning: skipping checkpoint {ckpt}: {reason}")
    if found:
        raise ValueError(f"{Path(out) / 'checkpoints'}: no intact checkpoint to resume from ({'; '.join(reasons)}); "
                         "start again in a new output_dir")
    return None


def clean_stale(out: str | Path) -> None:
    """Remove `.tmp-step_*` folders that a killed or failed checkpoint write left behind."""
    for tmp in (Path(out) / "checkpoints").glob(".tmp-step_*"):
        shutil.rmtree(tmp, ignore_errors=True)


def nonfinite(modules: Sequence[nn.Module]) -> str | None:
    """The first floating tensor with a NaN or inf among the modules' states, or None."""
    for m in modules:
        for name, t in m.state_dict().items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                return name
    return None


def save(accelerator: Accelerator, out: Path, state: dict, emas: Sequence[nn.Module], keep: int) -> Path:
    """Write checkpoint `state['step']` atomically: every process writes into one temporary folder, the main
    process adds calofm's state and the manifest, renames it into place and prunes to the newest `keep`.

    A failed write (a full disk) removes the temporary folder and says which checkpoint is still good."""
    root, step = out / "checkpoints", state["step"]
    tmp, final = root / f".tmp-step_{step:07d}", root / f"step_{step:07d}"
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE).write_text(json.dumps(state))
            for i, m in enumerate(emas):
                save_model(m, str(tmp / f"ema_{i}.safetensors"))
            files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
            manifest = {"step": step, "files": files}
            (tmp / MANIFEST).write_text(json.dumps({**manifest, "sha256": _digest(manifest)}, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in checkpoints(out)[keep:]:
                shutil.rmtree(old)
    except (OSError, RuntimeError) as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        good = last_good(out)
        raise OSError(f"writing checkpoint {final} failed ({str(e).splitlines()[0] if str(e) else type(e).__name__}"
                      f"); {f'the last good checkpoint is {good}' if good else 'no earlier checkpoint'}: free "
                      "space and run again with --resume") from e
    accelerator.wait_for_everyone()
    return final


def load(accelerator: Accelerator, ckpt: Path, emas: Sequence[nn.Module]) -> dict:
    """Restore Accelerate's state and the EMAs from `ckpt`; returns calofm's state dict (step, ...)."""
    accelerator.load_state(str(ckpt))
    for i, m in enumerate(emas):
        load_model(m, str(ckpt / f"ema_{i}.safetensors"), device=str(accelerator.device))
    return json.loads((ckpt / STATE).read_text())
