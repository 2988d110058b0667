"""A model named by Hugging Face hub id (`org/name`), found in the hub's own cache.

The cache is huggingface_hub's (`HF_HUB_CACHE`, or `HF_HOME/hub`), so a model fetched once with
`hf download` or by any other tool is reused as it is. Lookups are offline: the network is used only
when the caller asks for a download (the `model.download` setting) and HF_HUB_OFFLINE allows it.
An existing local path always wins over a hub id of the same spelling.
"""

from __future__ import annotations

import re
from pathlib import Path

from refusal_lab.errors import UserError

# One owner and one name, each without a slash: anything else is a path.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What loading reads: config, safetensors weights, tokenizer files, chat templates, optional code.
# Pickled weights and other formats in the repository are never fetched.
WANTED = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "*.py"]


def is_hub_id(name: str) -> bool:
    """True for an `org/name` spelling (whether or not such a repository exists)."""
    return HUB_ID.fullmatch(name) is not None


def resolve(name: str | Path, download: bool = False) -> Path:
    """A model name as a local path: an existing path as given, an `org/name` id as its cached snapshot."""
    path = Path(name).expanduser()
    if path.exists() or not is_hub_id(str(name)):
        return path
    return snapshot(str(name), download)


def snapshot(repo_id: str, download: bool = False) -> Path:
    """The cached snapshot folder of `repo_id`, fetched first only when `download` is set."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = constants.HF_HUB_CACHE
    get = f"run `hf download {repo_id}` where the network is allowed"
    try:
        return Path(snapshot_download(repo_id, allow_patterns=WANTED, local_files_only=True))
    except HFValidationError as exc:
        raise UserError(
            f"model path {repo_id} does not exist and is not a valid hub id", "pass a local folder or org/name"
        ) from exc
    except LocalEntryNotFoundError as exc:
        if not download:
            state = "is incomplete" if exc.__class__.__name__ == "IncompleteSnapshotError" else "is not"
            raise UserError(
                f"model {repo_id!r} is not a local path and {state} in the Hugging Face cache {cache}",
                f"{get}, or rerun with --download, or pass a local folder",
            ) from exc
    if constants.HF_HUB_OFFLINE:
        raise UserError(
            f"model {repo_id!r} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE forbids downloading",
            f"unset HF_HUB_OFFLINE, or {get}",
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=WANTED))
    except (OSError, ValueError) as exc:
        from refusal_lab.core.model import first_line  # core.model imports this module

        raise UserError(
            f"could not download {repo_id!r} into {cache} ({exc.__class__.__name__}: {first_line(exc)})",
            "check the id and the network; a gated model needs `hf auth login` and its terms accepted",
        ) from exc
