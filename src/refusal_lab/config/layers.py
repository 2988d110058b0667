"""Where settings come from: defaults < TOML file < environment (REFUSAL_LAB_<SECTION>__<OPTION>) < flags."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from refusal_lab.config.sections import DEFAULT_CONFIG_NAME, Settings
from refusal_lab.errors import UserError


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'ablate.saber.alpha': 1} -> {'ablate': {'saber': {'alpha': 1}}}; None means 'not given'."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        if value is None:
            continue
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _env_layer() -> dict[str, Any]:
    """REFUSAL_LAB_<SECTION>__<OPTION> as a nested dict (validated with the other layers)."""
    prefix = "REFUSAL_LAB_"
    flat = {
        key[len(prefix) :].lower().replace("__", "."): value
        for key, value in os.environ.items()
        if key.startswith(prefix) and key != prefix + "CONFIG"
    }
    return _nest(flat)


def config_file(explicit: Path | None) -> Path | None:
    """--config, else $REFUSAL_LAB_CONFIG, else ./refusal-lab.toml when present."""
    if explicit is not None:
        return explicit
    env = os.environ.get("REFUSAL_LAB_CONFIG")
    if env:
        return Path(env)
    local = Path(DEFAULT_CONFIG_NAME)
    return local if local.is_file() else None


def read_toml(path: Path, what: str, flag: str) -> dict[str, Any]:
    """A TOML file as a dict, or a one-line error naming the file."""
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist", f"check the path given to {flag}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{what} {path} is not valid TOML: {exc}", "fix the TOML syntax") from exc


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Settings from all layers; `overrides` are command-line values by dotted key (None: not given)."""
    source = config_file(path)
    file_layer = read_toml(source, "config file", "--config") if source is not None else {}
    merged = _merge(_merge(file_layer, _env_layer()), _nest(overrides))
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        origin = f" (from {source}, REFUSAL_LAB_* or the command line)" if source else ""
        raise UserError(
            f"invalid setting {where}: {first['msg']}{origin}",
            "see `refusal-lab COMMAND --help` and docs/configuration.md for valid values",
        ) from exc


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Settings as TOML (tables after plain keys; None values are left out, meaning 'default')."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    plain = [f"{k} = {value(v)}" for k, v in data.items() if v is not None and not isinstance(v, dict)]
    lines = ([f"[{prefix}]"] if prefix and plain else []) + plain
    for k, v in data.items():
        if isinstance(v, dict):
            sub = to_toml(v, f"{prefix}.{k}" if prefix else k)
            lines += ([""] if lines else []) + [sub] if sub else []
    return "\n".join(lines)
