"""Where a decoder-only model keeps its residual stream: layers, writers, final norm, unembedding.

Discovery is structural, from one tiny traced forward pass, not from per-family name lists:
- the decoder layers are the ModuleList with one entry per hidden layer;
- inside each layer, every module that holds linear maps (attention, MLP, each expert) writes
  into the residual stream through the *last* linear map it calls whose output has the hidden
  size (o_proj, down_proj, ...); fused expert tensors [experts, hidden, inner] are writers too;
- a writer branch whose output goes through a norm before the residual add (Gemma2/3, OLMo2
  post-norms) records that norm, so an edit can account for its per-channel scale;
- the final norm is the last module the base model calls after the layers.
The supported-family list only gates what we have tested; `allow_unverified` lifts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from refusal_lab.errors import UserError

SUPPORTED_FAMILIES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "phi3",
    "olmo2",
    "apertus",
    "gemma4",
    "gemma4_text",
)
UNSUPPORTED: dict[str, str] = {  # families whose residual stream no weight edit can reach exactly
    "gemma3n": "Gemma 3n keeps several residual streams (AltUp) that learned predictions mix at every layer, "
    "so removing a direction from its writers does not remove it from the streams",
}


@dataclass
class Writer:
    """One tensor whose output side lies in the residual stream.

    `weight` is [..., hidden, inner] (nn.Linear layout; fused experts add a leading expert axis).
    `post_norm`, when set, is the norm applied to the branch output before the residual add.
    """

    name: str
    weight: nn.Parameter
    module: nn.Module  # whose forward output is what gets written (hooks attach here)
    bias: nn.Parameter | None = None
    post_norm: nn.Module | None = None


@dataclass
class LayerWriters:
    index: int
    attention: list[Writer] = field(default_factory=list)
    mlp: list[Writer] = field(default_factory=list)

    @property
    def all(self) -> list[Writer]:
        return self.attention + self.mlp


@dataclass
class Adapter:
    """The residual-stream map of one loaded model."""

    family: str
    hidden_size: int
    layers: nn.ModuleList
    writers: list[LayerWriters]
    embedding: nn.Embedding
    unembedding: nn.Module
    final_norm: nn.Module | None
    tied_embeddings: bool
    config: Any = None  # the model's config, so edits can record an untying

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def norm_scale(norm: nn.Module, hidden: int) -> torch.Tensor:
    """Per-channel gain of an RMS/LayerNorm-style module, read off functionally (float64).

    A constant input c*1 has RMS c, so norm(c*1) = gain (+ bias). Works for Llama-style w,
    Gemma-style (1 + w) and any other parameterisation without knowing which it is.
    """
    p = next(norm.parameters())
    c = 1e3
    with torch.no_grad():
        x = torch.full((1, 1, hidden), c, dtype=p.dtype, device=p.device)
        zero = norm(torch.zeros_like(x)).double()
        out = norm(x).double() - zero
    return out.reshape(hidden).cpu()


def _find_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n_layers and len(mod) > 0:
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[0]:
                best = (size, name, mod)
    if best is None:
        raise UserError(
            f"could not find {n_layers} decoder layers in {type(model).__name__}",
            "this does not look like a decoder-only transformer; check the model folder",
        )
    return best[1], best[2]


def _trace(model: nn.Module, layers: nn.ModuleList, base: nn.Module) -> list[tuple[nn.Module, object, object]]:
    """Run one 2-token forward pass recording call order, inputs and outputs of the modules."""
    calls: list[tuple[nn.Module, object, object]] = []
    handles = []

    def hook(mod: nn.Module, args: tuple, out: object) -> None:
        calls.append((mod, args[0] if args else None, out))

    watched = set()
    for layer in layers:
        for mod in layer.modules():
            watched.add(mod)
    for mod in base.children():
        watched.add(mod)
    for mod in watched:
        handles.append(mod.register_forward_hook(hook))
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2]], device=device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls


def _first_tensor(x: object) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, tuple | list) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape


def _layer_writers(index: int, layer: nn.Module, calls: list, hidden: int) -> LayerWriters:
    names = {mod: name for name, mod in layer.named_modules()}
    order = [(mod, inp, out) for mod, inp, out in calls if mod in names]
    # The last hidden-sized linear called by each parent module is that parent's writer.
    last_writer: dict[str, str] = {}
    for mod, _, _ in order:
        if isinstance(mod, nn.Linear) and mod.out_features == hidden:
            name = names[mod]
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            last_writer[parent] = name
    writer_names = set(last_writer.values())
    # Experts that the trace did not route to: same module path with another index.
    patterns = {_pattern(n) for n in writer_names}
    for name, mod in layer.named_modules():
        if isinstance(mod, nn.Linear) and mod.out_features == hidden and _pattern(name) in patterns:
            writer_names.add(name)
    # Fused experts: 3-D tensors [experts, hidden, inner] (F.linear layout).
    fused: list[tuple[str, nn.Parameter]] = []
    for name, p in layer.named_parameters():
        if p.ndim == 3 and p.shape[1] == hidden and (p.shape[2] != hidden or "down" in name):
            fused.append((name, p))
    # Branches are the layer's direct children; find any norm applied to a branch's output.
    children = dict(layer.named_children())
    post_norms: dict[str, nn.Module] = {}
    outputs = {mod: _first_tensor(out) for mod, _, out in order}
    for mod, inp, _ in order:
        if mod in children.values() and _is_norm(mod, hidden):
            for branch_name, branch in children.items():
                if branch is not mod and _same(_first_tensor(inp), outputs.get(branch)):
                    post_norms[branch_name] = mod
    result = LayerWriters(index)
    modules = dict(layer.named_modules())
    entries = [(n, modules[n]) for n in sorted(writer_names)] + fused
    for name, obj in entries:
        branch = name.split(".", 1)[0]
        if isinstance(obj, nn.Linear):
            w = Writer(f"{index}.{name}", obj.weight, obj, obj.bias, post_norms.get(branch))
        else:  # a fused expert tensor: hook the module that owns it (its output sums the experts)
            owner = modules[name.rsplit(".", 1)[0]]
            w = Writer(f"{index}.{name}", obj, owner, None, post_norms.get(branch))
        (result.attention if _is_attention(branch, children[branch]) else result.mlp).append(w)
    return result


def _is_norm(module: nn.Module, hidden: int) -> bool:
    """A leaf with a per-channel gain: RMSNorm/LayerNorm-like (dropout and activations have none)."""
    params = list(module.parameters(recurse=False))
    return not list(module.children()) and any(p.shape == (hidden,) for p in params)


def _is_attention(name: str, module: nn.Module) -> bool:
    """Attention branches name themselves so in every family (self_attn, attention, attn)."""
    label = f"{name} {type(module).__name__}".lower()
    return "attn" in label or "attention" in label


def _pattern(name: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def check_family(config: Any, allow_unverified: bool = False) -> str:
    """The config's model family, or a UserError naming the supported ones."""
    tcfg = text_config(config) if config is not None else None
    family = getattr(tcfg, "model_type", None) or getattr(config, "model_type", None) or "unknown"
    if family in UNSUPPORTED or str(family).startswith("gemma3n"):
        raise UserError(
            f"unsupported architecture {family!r}: {UNSUPPORTED['gemma3n']}",
            f"use a model of a supported family ({', '.join(SUPPORTED_FAMILIES)})",
        )
    if family not in SUPPORTED_FAMILIES and not allow_unverified:
        raise UserError(
            f"unsupported architecture {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}",
            "use a supported model, or pass --allow-unverified-arch to try structural discovery",
        )
    return family


def adapt(model: nn.Module, allow_unverified: bool = False) -> Adapter:
    """Map the residual stream of a loaded causal LM; raises UserError for unsupported families."""
    config = getattr(model, "config", None)
    tcfg = text_config(config) if config is not None else None
    family = check_family(config, allow_unverified)
    hidden = int(tcfg.hidden_size)
    n_layers = int(tcfg.num_hidden_layers)
    layers_name, layers = _find_layers(model, n_layers)
    base = model.get_submodule(layers_name.rsplit(".", 1)[0]) if "." in layers_name else model
    calls = _trace(model, layers, base)
    writers = [_layer_writers(i, layer, calls, hidden) for i, layer in enumerate(layers)]
    for lw in writers:
        if not lw.attention or not lw.mlp:
            raise UserError(
                f"layer {lw.index} of {family!r}: found attention writers {[w.name for w in lw.attention]} and "
                f"MLP writers {[w.name for w in lw.mlp]}; expected both",
                "this architecture is not supported; report it with the model's config.json",
            )
    # Final norm: the last direct child of the base model called after the layers.
    base_children = set(base.children())
    after = [m for m, _, _ in calls if m in base_children and m is not layers]
    final_norm = after[-1] if after and after[-1] is not model.get_input_embeddings() else None
    emb = model.get_input_embeddings()
    unemb = model.get_output_embeddings()
    tied = unemb is not None and unemb.weight is emb.weight
    return Adapter(family, hidden, layers, writers, emb, unemb, final_norm, tied, config)
