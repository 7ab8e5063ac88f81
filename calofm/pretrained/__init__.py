"""Foundation models that ship inside calofm, so a user adapts one instead of pretraining (CaloDiT-2's point).

Each lives in `calofm/pretrained/<name>/` laid out as `calofm adapt` reads a pretrained model: `edm/` (the EDM
model) and `cd/` (its 1-step consistency student), each a saved model folder (config.json, model.safetensors,
README.md with the model card, metrics.json). `<name>` names the EDM model and `<name>-cd` its student; both load
offline through `load_model(name)` and `CaloDiT.from_pretrained(name)`, and `calofm adapt --pretrained <name>`
takes the pair. A local folder of the same name wins over a shipped model, a shipped model over a Hub repo id.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent
CD_SUFFIX = "-cd"
SHIPPED = "calodit-tiny-standin"  # the default foundation model: what `make demo` adapts


def shipped_models() -> dict[str, Path]:
    """Every shipped model by name: {name: its edm folder, name-cd: its cd folder}."""
    models = {}
    for root in sorted(p for p in ROOT.iterdir() if (p / "edm").is_dir()):
        models[root.name] = root / "edm"
        if (root / "cd").is_dir():
            models[root.name + CD_SUFFIX] = root / "cd"
    return models


def shipped_model(name: str) -> Path | None:
    """The folder of shipped model `name`, or None when `name` is a local path or no shipped model's name."""
    return None if Path(name).expanduser().exists() else shipped_models().get(name)


def shipped_root(name: str) -> Path | None:
    """The `edm/` + `cd/` root of shipped model `name` (its EDM name), or None."""
    path = shipped_model(name)
    return path.parent if path is not None and path.name == "edm" else None
