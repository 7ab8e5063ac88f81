"""Where shower data comes from: a local file or folder, or a dataset repository on the Hugging Face Hub.

The same recipe then trains on a laptop file or on published data: a Hub source is downloaded once through
huggingface_hub into its cache (HF_HOME / HF_HUB_CACHE) and read from there, offline too (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    HfUriError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import parse_hf_uri

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
SOURCE_FORMS = "a local file or folder, OWNER/NAME or hf://datasets/OWNER/NAME[@REVISION][/PATH]"


def is_repo_id(text: str) -> bool:
    """True for `OWNER/NAME` as the Hub spells repository ids (a relative path like `data/x` looks the same)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and not text.endswith((".git", "."))


def hub_dataset(source: str) -> tuple[str, str | None, str] | None:
    """(repo_id, revision, path in repo) when `source` names a Hub dataset; None for anything else.

    `OWNER/NAME` counts only if no such local path exists: local paths win.
    """
    if source.startswith("hf://"):
        try:
            uri = parse_hf_uri(source)
        except HfUriError as e:
            raise ValueError(f"data source {source!r}: {e}") from None
        if uri.type != "dataset":
            raise ValueError(f"data source {source!r} names a {uri.type} repository; expected {SOURCE_FORMS}")
        return uri.id, uri.revision, uri.path_in_repo.strip("/")
    if is_repo_id(source) and not Path(source).exists():
        return source, None, ""
    return None


def canonical_source(source: str | Path) -> str:
    """How to record a source (e.g. in a model's provenance): Hub data as hf://datasets/..., local paths as given."""
    text = str(source)
    hub = hub_dataset(text)
    if hub is None:
        return text
    repo_id, revision, sub = hub
    return f"hf://datasets/{repo_id}" + (f"@{revision}" if revision else "") + (f"/{sub}" if sub else "")


def resolve(source: str | Path) -> Path:
    """A local file or folder holding the data of `source` (see SOURCE_FORMS); downloads Hub data into the cache."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return path
    hub = hub_dataset(text)
    if hub is None:
        raise FileNotFoundError(f"data source {text!r}: no such file or folder (expected {SOURCE_FORMS})")
    repo_id, revision, sub = hub
    try:
        root = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                      allow_patterns=[sub, f"{sub}/*"] if sub else None))
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"data source {text!r}: no such local path, and no dataset {repo_id!r} on the Hub "
            "(if it is private, set HF_TOKEN or run `hf auth login`)") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"data source {text!r}: dataset {repo_id!r} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"data source {text!r}: dataset {repo_id!r} is not in the Hugging Face cache and the Hub cannot be "
            "reached (HF_HUB_OFFLINE set, or no connection)") from None
    target = root / sub
    if not target.exists():
        raise FileNotFoundError(f"data source {text!r}: dataset {repo_id!r} has no file or folder {sub!r}")
    return target
