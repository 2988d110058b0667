"""Stage outputs on disk: atomic folders, manifests, and the settings file that replays a run.

Every stage writes one folder that the next stage reads. A folder is filled under a temporary
sibling name and renamed into place, so an interrupted run never leaves half of one; whether
the name is free is checked before any work starts. `settings.toml` holds the effective
settings and `reproduce.sh` replays them.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusal_lab import __version__
from refusal_lab.errors import UserError

if TYPE_CHECKING:
    from refusal_lab.config import Settings

Log = Callable[[str], None]
SETTINGS_FILE = "settings.toml"


@contextmanager
def timed(log: Log, what: str) -> Iterator[None]:
    """Say that a long step begins and, when it ends, how long it took: no step of a long run is silent."""
    log(f"{what} ...")
    began = time.perf_counter()
    yield
    log(f"{what}: {time.perf_counter() - began:.0f} s")


def check_output(out: Path, force: bool = False) -> Path:
    """Refuse an existing, non-empty output folder now, before any forward pass is spent."""
    out = out.expanduser().resolve()
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output folder {out} already exists and is not empty", "choose a new folder or pass --force")
    return out


def write_folder(out: Path, fill: Callable[[Path], None], force: bool = False) -> None:
    """Fill a temporary sibling of `out`, then rename it into place: never a half-written folder."""
    out = check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        _readable(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """One file replaced whole (a reader never sees half of it)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _readable(folder: Path) -> None:
    """Files as the user's umask allows (some writers create 0600 files; a model is meant to be shared)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() or os.access(path, os.X_OK) else 0o666) & ~mask)


def manifest(**fields: Any) -> dict[str, Any]:
    """The common head of every manifest: tool and version, then the stage's own fields."""
    return {"tool": "refusal-lab", "version": __version__, **fields}


def settings_record(s: Settings, with_cache: bool = False) -> dict[str, Any]:
    """The effective settings as plain JSON values (paths as strings).

    The cache location is left out unless asked for: it is the machine's business, not the result's.
    """
    data = s.model_dump(mode="json")
    if not with_cache:
        data.pop("cache_dir")
    return data


def record_diff(old: Any, new: Any, path: str = "") -> list[str]:
    """Where two settings records differ, as dotted names: what a refused resume tells the user."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{path}.{key}" if path else str(key)
            if key not in old:
                out.append(f"{name} (new)")
            elif key not in new:
                out.append(f"{name} (gone)")
            else:
                out += record_diff(old[key], new[key], name)
        return out
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def write_replay(folder: Path, s: Settings, command: str) -> None:
    """settings.toml (the effective settings) and reproduce.sh, which runs `command` with them.

    `command` is the refusal-lab sub-command and its arguments that are not settings (the output
    folder comes from reproduce.sh's first argument).
    """
    from refusal_lab.config import to_toml

    data = settings_record(s)
    (folder / SETTINGS_FILE).write_text(
        "# effective settings of the run that wrote this folder\n" + to_toml(data) + "\n"
    )
    script = (
        "#!/bin/sh\n"
        "# Re-creates this folder from its recorded settings: sh reproduce.sh NEW_FOLDER\n"
        'here=$(cd "$(dirname "$0")" && pwd)\n'
        f'exec refusal-lab {command} --config "$here/{SETTINGS_FILE}" -o "${{1:?give the output folder}}"\n'
    )
    path = folder / "reproduce.sh"
    path.write_text(script)
    path.chmod(0o755)


def quote(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)
