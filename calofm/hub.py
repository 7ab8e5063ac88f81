"""The Hugging Face Hub side of calofm: model and dataset cards, loading by folder or repo id, pushing.

A saved model is a folder (config.json + model.safetensors + README.md); CaloDiT's PyTorchModelHubMixin writes
the first two and asks `model_card` for the third. Cards are Jinja templates shipped inside the package
(calofm/templates/*.md.j2, package data; `calofm.templates`), so they are found from a wheel install too. Pretrained and adapted
models use distinct templates; an adapted model is one whose provenance names a `base_model`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx2
from huggingface_hub import (
    CommitOperationAdd,
    DatasetCard,
    DatasetCardData,
    EvalResult,
    HfApi,
    ModelCard,
    ModelCardData,
    get_token,
)
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

from calofm.data.sources import hub_dataset, is_repo_id
from calofm.io import atomic_write_text
from calofm.templates import num, render

if TYPE_CHECKING:
    from calofm.models.dit import CaloDiT

MODEL_FILES = ("config.json", "model.safetensors")
METRICS_FILE = "metrics.json"
DATA_SUFFIXES = (".h5", ".hdf5")
DATASET_LICENSE = "cc-by-4.0"

OBJECTIVES = {"edm": "EDM (Karras et al. 2022), Heun sampler",
              "cd": "consistency distillation (Song et al. 2023), 1-step or multistep sampler",
              "fm": "flow matching, conditional OT paths (Lipman et al. 2023), Euler or Heun sampler"}
OBJECTIVE_TAGS = {"edm": "edm", "cd": "consistency-model", "fm": "flow-matching"}
ADAPT_MODES = {"full": "fine-tuning all weights",
               "lora": "LoRA fine-tuning of the attention, MLP and adaLN linears (merged into the weights)",
               "conditioning": "training only the condition embedding and the adaLN modulation layers"}
# The Hub's size_categories buckets, by upper bound.
SIZE_CATEGORIES = ((1e3, "n<1K"), (1e4, "1K<n<10K"), (1e5, "10K<n<100K"), (1e6, "100K<n<1M"),
                   (1e7, "1M<n<10M"), (1e8, "10M<n<100M"), (1e9, "100M<n<1B"), (math.inf, "n>1B"))


# ------------------------------------------------------------------------------------------------ model cards


def read_metrics(metrics: dict | str | Path | None) -> dict | None:
    """Evaluation figures given as a dict or a JSON file (e.g. the metrics.json of `calofm evaluate`)."""
    if metrics is None or isinstance(metrics, dict):
        return metrics
    path = Path(metrics)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such metrics file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of metrics, got {type(data).__name__}")
    return data


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _figure(value) -> str | None:
    """A number, {value, error} (`calofm evaluate`) or [value, error] (`calofm.evaluate.fidelity.card_metrics`)
    as text; None for anything else."""
    if _is_number(value):
        return num(value)
    if isinstance(value, dict) and _is_number(value.get("value")) and _is_number(value.get("error")):
        return f"{num(value['value'])} ± {num(value['error'])}"
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_number, value)):
        return f"{num(value[0])} ± {num(value[1])}"
    return None


def metric_rows(metrics: dict, prefix: str = "") -> list[tuple[str, str]]:
    """(name, figure) rows of evaluation figures. A `calofm evaluate` metrics.json names its metrics in `metrics`:
    only those are read (not its settings, conditions or timings); per-bin lists and notes are left to its
    report. Nested figures (per detector, PRDC) become "outer / inner" rows."""
    names = metrics["metrics"] if isinstance(metrics.get("metrics"), list) else list(metrics)
    rows = []
    for key in names:
        value, name = metrics.get(key), f"{prefix}{key}"
        figure = _figure(value)
        if figure is not None:
            rows.append((name, figure))
        elif isinstance(value, dict):
            rows += metric_rows({k: v for k, v in value.items() if k != "metrics"}, f"{name} / ")
    return rows


def setting_rows(settings: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(name, value) rows of a settings dict (provenance, normaliser); nested dicts become "outer / inner" rows,
    None values are left out."""
    rows = []
    for key, value in sorted(settings.items()):
        if isinstance(value, dict):
            rows += setting_rows(value, f"{prefix}{key} / ")
        elif value is not None:
            rows.append((f"{prefix}{key}", value))
    return rows


def eval_results(rows: list[tuple[str, str]], dataset: str) -> list[EvalResult]:
    """The model-index entries of the Hub's front matter: one per figure."""
    return [EvalResult(task_type="other", task_name="calorimeter shower generation", dataset_type=dataset,
                       dataset_name=dataset, metric_type=name.replace(" / ", "/"), metric_name=name,
                       metric_value=figure) for name, figure in rows]


def model_card(model: CaloDiT, *, metrics: dict | str | Path | None = None, repo_id: str | None = None,
               datasets: list[str] | None = None, notes: str | None = None) -> ModelCard:
    """The README.md of a saved model: Hub metadata plus the model's architecture, slots, training and metrics,
    and free-text `notes` (markdown: how the model was made, what its figures mean)."""
    metrics = read_metrics(metrics)
    provenance = dict(model.provenance or {})
    adapted = bool(provenance.get("base_model"))
    base_model = str(provenance.get("base_model", ""))
    data = str(provenance.get("data", ""))
    if datasets is None and data.startswith("hf://"):  # recorded by canonical_source: unambiguous
        datasets = [hub_dataset(data)[0]]
    rows = metric_rows(metrics or {})

    # Class-level metadata declared on CaloDiT (library_name, license, tags), extended per model.
    card_data = ModelCardData(**model._hub_mixin_info.model_card_data.to_dict())
    card_data.library_name = card_data.library_name or "calofm"
    card_data.license = card_data.license or "apache-2.0"
    card_data.tags = sorted({*(card_data.tags or []), OBJECTIVE_TAGS.get(model.objective, model.objective),
                             *(["adaptation"] if adapted else [])})
    card_data.datasets = datasets
    card_data.metrics = sorted({name.split(" / ")[0] for name, _ in rows}) or None
    card_data.pipeline_tag = "other"  # no Hub task fits shower generation
    if rows:
        card_data.model_name = repo_id or "CaloDiT"
        card_data.eval_results = eval_results(rows, str(
            (metrics or {}).get("detector") or provenance.get("detector") or "held-out showers"))
    base_on_hub = adapted and is_repo_id(base_model) and not Path(base_model).exists()
    if base_on_hub:
        card_data.base_model = base_model
        card_data.base_model_relation = "finetune"

    slots = sorted((slot, name) for name, slot in (model.slot_map or {}).items())
    detector = provenance.get("detector") or (slots[0][1] if slots else "NAME")
    context = dict(
        card_data=card_data.to_yaml(),
        title=f"{repo_id or 'CaloDiT'}: {'adapted to ' + str(detector) if adapted else 'pretrained'} "
              f"({model.objective.upper()})",
        model_id=repo_id or "path/to/model",
        arch=dict(preset=model.preset, depth=model.depth, width=model.width, heads=model.heads,
                  mlp_dim=model.mlp_dim, patch=" x ".join(map(str, model.patch)), tokens=math.prod(model.grid),
                  n_params=sum(p.numel() for p in model.parameters())),
        objective=OBJECTIVES.get(model.objective, model.objective),
        objective_key=model.objective,
        sampler=sorted((model.sampler or {}).items()),
        slots=slots,
        free_slots=model.n_slots - len(slots),
        normalizer=setting_rows(model.normalizer or {}),
        training=setting_rows({k: v for k, v in provenance.items() if k != "base_model"}),
        metrics=rows,
        example_detector=detector,
        notes=notes,
    )
    if adapted:
        mode = provenance.get("mode")
        context.update(adapted_detector=detector, base_model=base_model, base_model_on_hub=base_on_hub,
                       mode_text=ADAPT_MODES.get(mode, f"`{mode}` adaptation"))
    return ModelCard(render("adapted.md.j2" if adapted else "pretrained.md.j2", **context))


def write_model_card(model_dir: str | Path, *, metrics: dict | str | Path | None = None, repo_id: str | None = None,
                     model: CaloDiT | None = None, notes: str | None = None) -> Path:
    """(Re)write README.md of a saved model folder, with the figures of `metrics` or of a metrics.json beside it."""
    model_dir = Path(model_dir)
    model = model if model is not None else load_model(model_dir)
    if metrics is None and (model_dir / METRICS_FILE).is_file():
        metrics = model_dir / METRICS_FILE
    path = model_dir / hf_constants.REPOCARD_NAME
    atomic_write_text(path, str(model_card(model, metrics=metrics, repo_id=repo_id, notes=notes)))
    return path


# ------------------------------------------------------------------------------------------------ loading


def load_model(path_or_repo: str | Path, *, revision: str | None = None, **kwargs) -> CaloDiT:
    """A saved model from a local folder, a model shipped with calofm (`calofm.pretrained`, by name, offline) or a
    Hub repo id (downloaded once into the Hugging Face cache).

    huggingface_hub takes any path that does not exist for a repo id, so the local path is checked first.
    """
    from calofm.models.dit import CaloDiT
    from calofm.pretrained import shipped_model, shipped_models

    text = str(path_or_repo)
    path = shipped_model(text) or Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path}: a model is a folder holding {' and '.join(MODEL_FILES)}, not a file")
        missing = [name for name in MODEL_FILES if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: not a saved model folder (no {', '.join(missing)})")
        return CaloDiT.from_pretrained(path, **kwargs)
    if not is_repo_id(text):
        raise FileNotFoundError(f"{text}: no such model folder, shipped model ({', '.join(shipped_models())}) "
                                "or Hub repo id OWNER/NAME")
    try:
        return CaloDiT.from_pretrained(text, revision=revision, **kwargs)
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{text}: no such local folder, and no model {text!r} on the Hub at "
                                f"{hf_constants.ENDPOINT} (if it is private, set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(f"{text}: no such local folder, and model {text!r} is not in the Hugging Face cache "
                                "while the Hub cannot be reached (HF_HUB_OFFLINE set, or no connection)") from None


# ------------------------------------------------------------------------------------------------ pushing


def require_token(token: str | None, repo_id: str) -> str:
    """The write token: passed in, HF_TOKEN, or the one `hf auth login` stored."""
    token = token or get_token()
    if not token:
        raise PermissionError(f"pushing to {repo_id} needs a Hugging Face token: set HF_TOKEN or run "
                              "`hf auth login` (create a write token at https://huggingface.co/settings/tokens)")
    return token


@contextmanager
def _hub_errors(action: str) -> Iterator[None]:
    """Hub HTTP errors as one line that says what failed and where."""
    try:
        yield
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        detail = e.server_message or str(e).strip().splitlines()[0]
        raise OSError(f"{action} failed: HTTP {status} from {hf_constants.ENDPOINT}: {detail.strip()}") from e
    except httpx2.TransportError as e:  # huggingface_hub's HTTP client: no connection, DNS, proxy, timeout
        raise OSError(f"{action} failed: cannot reach {hf_constants.ENDPOINT} ({e})") from e


def _prepare_repo(api: HfApi, repo_id: str, repo_type: str, private: bool | None, revision: str | None) -> str:
    repo_id = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True).repo_id
    if revision:
        api.create_branch(repo_id, repo_type=repo_type, branch=revision, exist_ok=True)
    return repo_id


def push_model(model_dir: str | Path, repo_id: str, *, private: bool | None = None, revision: str | None = None,
               metrics: dict | str | Path | None = None, keep_card: bool = False, token: str | None = None) -> str:
    """Upload a saved model folder to a model repo (created if needed); returns the commit URL.

    The card is rendered again for `repo_id`, with `metrics` or the folder's metrics.json, unless `keep_card`
    and the folder already has a README.md.
    """
    token = require_token(token, repo_id)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model folder")
    model = load_model(model_dir)
    if not (keep_card and (model_dir / hf_constants.REPOCARD_NAME).is_file()):
        write_model_card(model_dir, metrics=metrics, repo_id=repo_id, model=model)
    api = HfApi(token=token)
    with _hub_errors(f"pushing {model_dir} to {repo_id}"):
        repo_id = _prepare_repo(api, repo_id, "model", private, revision)
        info = api.upload_folder(repo_id=repo_id, folder_path=model_dir, revision=revision,
                                 commit_message=f"Upload {model_dir.name} with calofm")
    return info.commit_url


def describe_data(data_dir: str | Path) -> list[dict]:
    """One summary per shower file directly in `data_dir` (opening each validates its structure)."""
    from calofm.data.formats import open_showers

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise NotADirectoryError(f"{data_dir}: not a folder of shower files")
    paths = sorted(p for p in data_dir.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{data_dir}: no shower files ({', '.join(DATA_SUFFIXES)}) to share")
    files = []
    for path in paths:
        with open_showers(path) as f:
            files.append(dict(path=path, name=path.name, detector=f.detector or "unknown", format=f.format, n=len(f),
                              size=f"{path.stat().st_size / 1e6:.1f} MB", synthetic=bool(f.attrs.get("synthetic")),
                              generator=str(f.attrs.get("generator") or "a synthetic generator")))
    return files


def dataset_card(files: list[dict], repo_id: str, license: str = DATASET_LICENSE) -> DatasetCard:
    """The README.md of a shower dataset repo; synthetic stand-in files are labelled as such."""
    synthetic = [f for f in files if f["synthetic"]]
    n = sum(f["n"] for f in files)
    detectors = sorted({f["detector"] for f in files})
    card_data = DatasetCardData(
        license=license, pretty_name=f"Calorimeter showers: {', '.join(detectors)}",
        size_categories=[next(label for bound, label in SIZE_CATEGORIES if n < bound)],
        tags=sorted({"physics", "particle-physics", "calorimeter", "calofm", *(["synthetic"] if synthetic else [])}))
    text = render("dataset.md.j2", card_data=card_data.to_yaml(), title=repo_id, repo_id=repo_id, files=files,
                  n_showers=n, detectors=detectors, synthetic_files=[f["name"] for f in synthetic],
                  generators=sorted({f["generator"] for f in synthetic}))
    return DatasetCard(text)


def push_dataset(data_dir: str | Path, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                 license: str = DATASET_LICENSE, token: str | None = None) -> str:
    """Share a folder of shower files as a Hub dataset repo with a dataset card, in one commit; returns its URL."""
    token = require_token(token, repo_id)
    files = describe_data(data_dir)
    card = dataset_card(files, repo_id, license)
    operations = [CommitOperationAdd(path_in_repo=f["name"], path_or_fileobj=str(f["path"])) for f in files]
    operations.append(CommitOperationAdd(path_in_repo=hf_constants.REPOCARD_NAME, path_or_fileobj=str(card).encode()))
    api = HfApi(token=token)
    with _hub_errors(f"pushing {data_dir} to dataset {repo_id}"):
        repo_id = _prepare_repo(api, repo_id, "dataset", private, revision)
        info = api.create_commit(repo_id, operations, repo_type="dataset", revision=revision,
                                 commit_message=f"Upload {len(files)} shower files with calofm")
    return info.commit_url
