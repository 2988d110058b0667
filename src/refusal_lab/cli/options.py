"""Command-line flags built from the settings models, so every option is defined once (config.py).

`@stage_command(app, "ablate", sections=("model", "prompts", "probe", "ablate", ...))` gives the
decorated function one flag per field of those sections (name, type, help and choices from the
field), plus --config; every flag defaults to "not given", and the function receives the
Settings that result from defaults < TOML < environment < these flags. Arguments listed in
`into` (e.g. {"model": "model.path"}) become settings too.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from refusal_lab.config import Settings, describe, load_settings, section_class
from refusal_lab.core.kernels import emulated_bf16_note, use_kernels

KW = inspect.Parameter.KEYWORD_ONLY

ConfigOpt = Annotated[
    Optional[Path],  # noqa: UP045 - typer reads this annotation at runtime
    typer.Option("--config", help="TOML settings file (default: $REFUSAL_LAB_CONFIG or ./refusal-lab.toml)."),
]


def _flag_type(field: FieldInfo) -> tuple[Any, str]:
    """(runtime type for typer, extra help) of a field: Literals become str, validated by pydantic."""
    ann = field.annotation
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        ann = args[0] if len(args) == 1 else str
    if typing.get_origin(ann) is typing.Literal:
        return str, f" One of: {', '.join(map(str, typing.get_args(ann)))}."
    return (ann if ann in (int, float, bool, str, Path) else str), ""


def section_flags(sections: Sequence[str]) -> tuple[list[inspect.Parameter], dict[str, str]]:
    """One keyword parameter per leaf field of the sections, and flag name -> dotted settings key.

    A section may name the fields it lends: "eval:judge_url,limit" gives just those two flags, and
    "model:-quantize" all but that one (for a command whose own section has a field of that name).
    """
    params, keys = [], {}
    for spec in sections:
        dotted, _, only = spec.partition(":")
        held_back = only.startswith("-")
        names = only.removeprefix("-").split(",")
        for name, field in section_class(dotted).model_fields.items():
            if only and (name in names if held_back else name not in names):
                continue
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                continue  # a nested section: listed separately when the command wants it
            if (field.json_schema_extra or {}).get("cli") is False:
                continue
            if name in keys:
                raise RuntimeError(f"flag --{name} would mean both {keys[name]} and {dotted}.{name}")
            keys[name] = f"{dotted}.{name}" if dotted else name
            kind, extra = _flag_type(field)
            default = field.get_default(call_default_factory=True)
            help_text = f"{field.description}{extra} (default: {default})"
            flag = f"--{name.replace('_', '-')}"
            decls = [f"{flag}/--no-{name.replace('_', '-')}"] if kind is bool else [flag]
            panel = (field.json_schema_extra or {}).get("panel")  # e.g. "Experimental": grouped apart in --help
            option = typer.Option(*decls, help=help_text, show_default=False, rich_help_panel=panel)
            annotation = Annotated[Optional[kind], option]  # noqa: UP045
            params.append(inspect.Parameter(name, KW, default=None, annotation=annotation))
    return params, keys


ModelArg = Annotated[Optional[str], typer.Argument(help=describe("model.path"), show_default=False)]  # noqa: UP045


def dtype_note(s: Settings, command: str) -> None:
    """Say so where bfloat16 is asked for on a CPU that emulates it (a run several times slower)."""
    dtypes = [s.model.dtype] + ([s.harden.targets_dtype] if command == "harden" else [])
    note = emulated_bf16_note(dtypes, s.model.device)
    if note:
        typer.echo(note, err=True)


def stage_command(
    app: typer.Typer,
    name: str,
    sections: Sequence[str] = (),
    model_arg: bool = False,
    default_config: Callable[[dict[str, Any]], Path | None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `fn(s: Settings, **own_args)` as a command with flags for `sections` (see module doc).

    model_arg: the command takes an optional MODEL argument, which sets model.path.
    default_config: the settings file to read when --config is not given, from the command's arguments.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "s"]
        flags, keys = section_flags(sections)
        clash = {p.name for p in own} & (set(keys) | {"config"} | ({"model"} if model_arg else set()))
        if clash:
            raise RuntimeError(f"{name}: arguments {clash} clash with settings flags")
        extra = [inspect.Parameter("config", KW, default=None, annotation=ConfigOpt)]
        lead = [inspect.Parameter("model", KW, default=None, annotation=ModelArg)] if model_arg else []

        def command(**kwargs: Any) -> Any:
            overrides = {keys[k]: kwargs.pop(k) for k in list(kwargs) if k in keys}
            if model_arg:
                overrides["model.path"] = kwargs.pop("model")
            config = kwargs.pop("config")
            if config is None and default_config is not None:
                config = default_config(kwargs)
            s = load_settings(config, **overrides)
            given = kwargs.get("models") or ([kwargs["model"]] if isinstance(kwargs.get("model"), str) else [])
            use_kernels(s.model.cpu_kernels, given or [s.model.path])  # before the first tensor operation
            dtype_note(s, name)
            return fn(s, **kwargs)

        params = [p.replace(kind=KW) for p in lead + own + extra + flags]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__doc__ = fn.__doc__
        command.__name__ = fn.__name__
        app.command(name)(command)
        return fn

    return decorate
