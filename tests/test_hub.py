"""Hub publishing against a local in-memory Hub (tests/hub_server.py): models, cards, datasets, offline cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, configure_client
from huggingface_hub import DatasetCard, ModelCard
from huggingface_hub import constants as hf_constants

from calofm.data.sources import canonical_source, resolve
from calofm.hub import load_model, model_card, push_dataset, push_model, write_model_card
from calofm.models.dit import CaloDiT

NORMALIZER = {"mean": -9.5, "std": 4.25, "threshold_mev": 0.01515, "eps": 1e-6}
SLOTS = {"par04_siw": 0, "par04_scipb": 1, "odd": 2, "fccee_cld": 3}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A local Hub, with huggingface_hub pointed at it, a dummy token and a fresh HF_HOME."""
    with HubServer() as server:
        configure_client(monkeypatch, server.url, tmp_path / "hf_home")
        yield server


def tiny_model(**provenance) -> CaloDiT:
    torch.manual_seed(0)
    model = CaloDiT.from_preset("tiny", slot_map=SLOTS, normalizer=NORMALIZER, sampler={"steps": 32, "rho": 7},
                                provenance=provenance or {"stage": "pretrain", "steps": 1500, "data": "data/synthetic"})
    with torch.no_grad():  # adaLN-Zero starts many weights at zero: make every tensor distinctive
        for p in model.parameters():
            p.normal_()
    return model


def assert_same_model(a: CaloDiT, b: CaloDiT, tmp: Path) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    a.save_pretrained(tmp / "a")
    b.save_pretrained(tmp / "b")
    assert json.loads((tmp / "a/config.json").read_text()) == json.loads((tmp / "b/config.json").read_text())


def calofm_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calofm.cli", *args], capture_output=True, text=True,
                          env=env or dict(os.environ), timeout=120)


def test_push_to_hub_and_from_pretrained_give_identical_model(hub, tmp_path):
    model = tiny_model()
    url = model.push_to_hub("owner/tiny", model_card_kwargs={"repo_id": "owner/tiny"})
    assert url.startswith(f"{hub.url}/owner/tiny/commit/")
    stored = hub.repos[("model", "owner/tiny")]
    assert {"config.json", "model.safetensors", "README.md"} <= set(stored.commits[stored.refs["main"]])

    loaded = CaloDiT.from_pretrained("owner/tiny")
    assert_same_model(model, loaded, tmp_path)
    assert (loaded.slot_map, loaded.normalizer, loaded.sampler, loaded.patch) == (SLOTS, NORMALIZER,
                                                                                 {"steps": 32, "rho": 7}, (3, 2, 3))
    assert_same_model(model, load_model("owner/tiny"), tmp_path / "helper")


def test_load_from_offline_cache_makes_no_request(hub, tmp_path, monkeypatch):
    model = tiny_model()
    model.push_to_hub("owner/cached")
    load_model("owner/cached")  # fills the cache under HF_HOME
    n_requests = len(hub.requests)

    r = calofm_cli("info", "owner/cached", env={**os.environ, "HF_HUB_OFFLINE": "1"})  # the variable, read at import
    assert r.returncode == 0, r.stderr
    assert f"parameters  {sum(p.numel() for p in model.parameters()):,}" in r.stdout
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert_same_model(model, load_model("owner/cached"), tmp_path)
    assert len(hub.requests) == n_requests
    with pytest.raises(FileNotFoundError, match="'owner/never-pushed' is not in the Hugging Face cache"):
        load_model("owner/never-pushed")


def test_load_model_says_what_a_missing_path_is(hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model 'owner/absent' on the Hub"):
        load_model("owner/absent")
    with pytest.raises(FileNotFoundError, match=r"\./runs/model: no such model folder"):
        load_model("./runs/model")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="weights.bin"):
        load_model(tmp_path / "weights.bin")
    (tmp_path / "half").mkdir()
    (tmp_path / "half/config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(tmp_path / "half")


def test_cli_push_renders_card_with_metrics_on_a_branch(hub, tmp_path):
    model_dir = tmp_path / "model"
    model = tiny_model()
    model.save_pretrained(model_dir)
    (model_dir / "metrics.json").write_text(json.dumps({"fpd": 0.0201, "auc": {"low": 0.594, "high": 0.56}}))

    r = calofm_cli("push", str(model_dir), "--repo-id", "owner/cli-model", "--revision", "dev")
    assert r.returncode == 0, r.stderr
    repo = hub.repos[("model", "owner/cli-model")]
    files = repo.commits[repo.refs["dev"]]
    assert "model.safetensors" not in repo.commits[repo.refs["main"]]  # pushed to the branch only
    assert files["model.safetensors"] == (model_dir / "model.safetensors").read_bytes()
    card = ModelCard(files["README.md"].decode())
    assert card.data.metrics == ["auc", "fpd"]
    assert "| auc / low | 0.594 |" in card.text and "| fpd | 0.0201 |" in card.text
    assert 'load_model("owner/cli-model")' in card.text
    assert_same_model(model, load_model("owner/cli-model", revision="dev"), tmp_path)


def test_cli_push_card_from_a_real_evaluate_metrics_json(hub, data_dir, tmp_path):
    """`calofm evaluate`'s metrics.json, as `calofm push --metrics` takes it: only its metrics reach the card,
    each as value ± error, and the front matter is Hub model-index metadata."""
    from calofm.data.formats import read_showers
    from calofm.evaluate.report import evaluate

    showers = read_showers(data_dir / "odd.h5")
    result = evaluate(showers[:100], showers[100:], tmp_path / "eval", metrics=["response", "fpd", "kpd", "auc_high",
                                                                                "prdc"], detector="odd")
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    r = calofm_cli("push", str(model_dir), "--repo-id", "owner/evaluated", "--metrics",
                   str(tmp_path / "eval" / "metrics.json"))
    assert r.returncode == 0, r.stderr
    repo = hub.repos[("model", "owner/evaluated")]
    card = ModelCard(repo.commits[repo.refs["main"]]["README.md"].decode())
    assert card.data.metrics == ["auc_high", "fpd", "kpd", "prdc"] and card.data.pipeline_tag == "other"
    figures = {e.metric_type: e.metric_value for e in card.data.eval_results}
    assert set(figures) == {"fpd", "kpd", "auc_high", "prdc/precision", "prdc/recall", "prdc/density",
                            "prdc/coverage"}
    fpd = result["fpd"]
    assert figures["fpd"] == f"{fpd['value']:.4g} ± {fpd['error']:.4g}"
    assert all(e.dataset_name == "odd" for e in card.data.eval_results)
    for absent in ("settings", "timing_s", "conditions", "definition", "reference", "response"):
        assert absent not in str(card.data.to_dict()), absent
    assert f"| fpd | {fpd['value']:.4g} ± {fpd['error']:.4g} |" in card.text


def test_cli_push_without_token_is_a_clear_error(hub, tmp_path):
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    r = calofm_cli("push", str(model_dir), "--repo-id", "owner/x", env=env)
    assert r.returncode == 2
    assert r.stderr.startswith("error: pushing to owner/x needs a Hugging Face token: set HF_TOKEN or run "
                               "`hf auth login`")
    assert len(r.stderr.strip().splitlines()) == 1
    assert hub.requests == []


def test_cards_render_real_values_and_parse_as_hub_metadata(tmp_path):
    pretrained = tiny_model(stage="pretrain", steps=1500, deposit_fit={"lr": 1e-3, "epochs": 1000.0, "data": None})
    adapted = tiny_model(base_model="owner/base", detector="fccee_allegro", mode="conditioning",
                         data=canonical_source("hf://datasets/owner/lemurs"), steps=5000)
    metrics = {"fpd": 0.0201, "kpd": [8.9e-5, 1.2e-5], "auc": {"low": 0.594, "high": 0.56}, "skipped": None}
    for model, name in ((pretrained, "pretrained"), (adapted, "adapted")):
        text = str(model_card(model, metrics=metrics, repo_id=f"owner/{name}"))
        assert "{{" not in text and "{%" not in text
        assert "None" not in text
        assert "| kpd | 8.9e-05 ± 1.2e-05 |" in text
        assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} |" in text
        assert "{'" not in text  # nested provenance is "outer / inner" rows, not a printed dict
    assert "| deposit_fit / lr | 0.001 |" in str(model_card(pretrained))

    # the card written beside a saved model loads as Hub metadata
    adapted.save_pretrained(tmp_path / "adapted")
    card = ModelCard.load(write_model_card(tmp_path / "adapted", metrics=metrics))
    data = card.data.to_dict()
    assert data["library_name"] == "calofm"
    assert data["license"] == "apache-2.0"
    assert {"calofm", "calorimeter", "adaptation", "edm"} <= set(data["tags"])
    assert data["base_model"] == "owner/base"
    assert data["datasets"] == ["owner/lemurs"]
    assert data["metrics"] == ["auc", "fpd", "kpd"]
    assert "adapted from the\npretrained model [owner/base](/owner/base) by\ntraining only the condition" in card.text

    # a pretrained card has no base model; a metrics.json beside the folder is picked up
    pretrained.save_pretrained(tmp_path / "pre")
    (tmp_path / "pre" / "metrics.json").write_text(json.dumps({"fpd": 0.5}))
    data = ModelCard.load(write_model_card(tmp_path / "pre")).data.to_dict()
    assert "base_model" not in data and data["metrics"] == ["fpd"]


def test_saved_models_carry_the_calofm_card(tmp_path):
    """calofm's saving path writes calofm's card over the mixin's generic one (the model class itself imports
    nothing of calofm.hub, so a bare `save_pretrained` writes the mixin's)."""
    from calofm.train.loop import save_model

    model = tiny_model(base_model="owner/base", detector="fccee_allegro", mode="full", steps=100)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "metrics.json").write_text(json.dumps({"fpd": 0.25}))
    save_model(model, tmp_path / "m")
    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.base_model == "owner/base"
    assert "## Detector slots" in card.text and "fccee_allegro" in card.text


def test_data_push_resolves_by_repo_id_to_identical_files(hub, data_dir, tmp_path, monkeypatch):
    share = tmp_path / "share"
    share.mkdir()
    for name in ("par04_siw.h5", "odd.h5"):
        shutil.copy(data_dir / name, share / name)

    r = calofm_cli("data", "push", str(share), "--repo-id", "owner/showers")
    assert r.returncode == 0, r.stderr
    folder = resolve("owner/showers")
    assert sorted(p.name for p in folder.glob("*.h5")) == ["odd.h5", "par04_siw.h5"]
    for name in ("par04_siw.h5", "odd.h5"):
        assert (folder / name).read_bytes() == (share / name).read_bytes()
    assert Path(hf_constants.HF_HUB_CACHE) in folder.parents

    card = DatasetCard.load(folder / "README.md")
    assert {"synthetic", "calorimeter"} <= set(card.data.tags) and card.data.license == "cc-by-4.0"
    assert card.data.size_categories == ["n<1K"]
    assert "Synthetic stand-in, not Geant4" in card.text and "| `odd.h5` | odd | lemurs | 200 |" in card.text

    one = resolve("hf://datasets/owner/showers/odd.h5")
    assert one.name == "odd.h5" and one.read_bytes() == (share / "odd.h5").read_bytes()

    n_requests = len(hub.requests)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert resolve("owner/showers") == folder and len(hub.requests) == n_requests
    with pytest.raises(FileNotFoundError, match="'owner/other'.*not in the Hugging Face cache"):
        resolve("owner/other")


def test_resolve_prefers_local_paths_and_names_bad_sources(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "showers").mkdir(parents=True)
    assert resolve("owner/showers") == Path("owner/showers")
    assert canonical_source("owner/showers") == "owner/showers"
    assert canonical_source("someone/data") == "hf://datasets/someone/data"
    assert hub.requests == []

    with pytest.raises(FileNotFoundError, match="data source 'someone/data': no such local path, and no dataset"):
        resolve("someone/data")
    with pytest.raises(ValueError, match="data source 'hf://owner/model' names a model repository"):
        resolve("hf://owner/model")
    with pytest.raises(FileNotFoundError, match="data source 'no/such/file.h5': no such file or folder"):
        resolve("no/such/file.h5")
    push_model_dir = tmp_path / "m"
    tiny_model().save_pretrained(push_model_dir)
    push_model(push_model_dir, "owner/m")
    with pytest.raises(FileNotFoundError, match="'owner/m'"):
        resolve("owner/m")  # a model repo is not a dataset repo


@pytest.mark.slow
def test_pretrain_runs_on_a_dataset_repo_id(hub, data_dir, tmp_path):
    share = tmp_path / "share"
    share.mkdir()
    for name in SLOTS:
        shutil.copy(data_dir / f"{name}.h5", share / f"{name}.h5")
    push_dataset(share, "owner/lemurs-mini")

    out = tmp_path / "run"
    r = calofm_cli("pretrain", str(Path(__file__).parents[1] / "recipes" / "pretrain-tiny.yaml"), "--set", "data.dir=owner/lemurs-mini",
                   "--set", f"output_dir={out}", "--set", "train.steps=3", "--set", "train.batch_size=8",
                   "--set", "train.checkpoint_every=1000")
    assert r.returncode == 0, r.stderr
    assert ("GET", "/api/datasets/owner/lemurs-mini/revision/main") in hub.requests
    model = load_model(out / "model")
    assert model.slot_map == SLOTS and model.provenance["steps"] == 3
