"""Edits that stop a model from writing chosen directions into its residual stream.

An Ablation is a set of unit directions D [H, k] with a strength per direction (alpha) and a
scale per layer (1 everywhere, or a kernel). Every residual writer W (output rows in the stream)
becomes P W with P = I - U G^-1 diag(s alpha) U', U = D and G = U'U, so that what W writes along
each direction keeps exactly 1 - s alpha_i of itself: u_i'(P w) = (1 - s alpha_i) u_i'w, also
when the directions are not orthogonal. Biases likewise; embedding rows with s = 1. Where a
branch output passes a norm with per-channel gain g before the residual add (Gemma2/3, OLMo2),
the component landing on d is read through g, so that writer uses U = g * D. Arithmetic in float64.

Norm-preserving (Heretic's MPOA): after the projection each column of a writer (what one input unit
writes into the stream, the axis the projection acts across) and each embedding row (one token's
vector) is rescaled to its original length. The rescale is not a function of the writer's output,
so no output hook computes it: `edited` measures such an edit on the weights. Biases are projected
only (one vector, not a column of the matrix).

The same edit exists twice: on the weights (for export, undone on exit so the loaded model can
be reused), and as forward hooks on the writer modules (`hooked`: reversible, for searches and
attacks). The hook form is the one engine for removing directions while a model runs: it can also
let gradients reach the directions (a direction being optimised), follow a LoRA wrapper (a model
trained under ablation), and act at chosen positions only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch

from refusal_lab.core.arch import Adapter, Writer, norm_scale
from refusal_lab.probe.directions import gram_schmidt

COMPONENTS = ("attention", "mlp")


@dataclass(frozen=True)
class Ablation:
    """Directions to remove, how strongly, and where; normalised on construction, never mutated."""

    directions: torch.Tensor  # [H, k] unit columns, linearly independent (dependent ones dropped)
    alphas: torch.Tensor | float = 1.0  # [k] or one value; stored as [k] float64
    layer_scale: torch.Tensor | None = None  # [L]; None means 1 at every layer
    embedding: bool = True
    components: tuple[str, ...] = COMPONENTS

    def __post_init__(self) -> None:
        d = self.directions.double().cpu()
        d = d[:, None] if d.ndim == 1 else d
        alphas = torch.as_tensor(self.alphas, dtype=torch.float64).reshape(-1)
        alphas = alphas.expand(d.shape[1]).clone() if alphas.numel() == 1 else alphas
        _, kept = gram_schmidt(d.detach())  # which columns: no gradient needed
        d = d[:, kept]
        object.__setattr__(self, "directions", d / d.norm(dim=0, keepdim=True))
        object.__setattr__(self, "alphas", alphas[kept])
        if self.layer_scale is not None:
            object.__setattr__(self, "layer_scale", torch.as_tensor(self.layer_scale, dtype=torch.float64))

    def scale(self, layer: int) -> float:
        return 1.0 if self.layer_scale is None else float(self.layer_scale[layer])

    def scaled(self, factor: float) -> Ablation:
        """The same edit with every strength multiplied by `factor`."""
        return Ablation(self.directions, self.alphas * factor, self.layer_scale, self.embedding, self.components)


def operator(u: torch.Tensor, alphas: torch.Tensor, s: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, L) with P = I - L U' (float64): u_i' P w = (1 - s alpha_i) u_i' w for every column u_i."""
    _, kept = gram_schmidt(u.detach())
    u = u[:, kept] / u[:, kept].norm(dim=0, keepdim=True)
    g = u.T @ u
    a = torch.linalg.solve(g, torch.diag(s * alphas[kept]))  # G^-1 diag(s alpha)
    return u, u @ a


def _writer_operator(writer: Writer, ab: Ablation, hidden: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    u = ab.directions if writer.post_norm is None else norm_scale(writer.post_norm, hidden)[:, None] * ab.directions
    return operator(u, ab.alphas, s)


def _project(t: torch.Tensor, u: torch.Tensor, lft: torch.Tensor) -> torch.Tensor:
    """t[..., H, inner] (or [H] for a bias) minus L U' t, in float64.

    U' t first: two thin products of k rows, never the H x H operator (which made a 0.5B model's
    edit take seconds)."""
    return t - lft @ (u.T @ t)


def keep_lengths(new: torch.Tensor, old: torch.Tensor, dim: int) -> torch.Tensor:
    """`new` with every vector along `dim` rescaled to the length of the same vector of `old`
    (a vector projected to zero stays zero)."""
    return new * (old.norm(dim=dim, keepdim=True) / new.norm(dim=dim, keepdim=True).clamp_min(1e-12))


def _edit_tensor(tensor: torch.Tensor, u: torch.Tensor, lft: torch.Tensor, keep_norms: bool) -> None:
    t = tensor.data.double()
    new = _project(t, u.to(t.device), lft.to(t.device))
    if keep_norms and t.ndim >= 2:  # each column [H] is what one input unit writes: keep its length
        new = keep_lengths(new, t, -2)
    tensor.data.copy_(new.to(tensor.dtype))


def _writers(adapter: Adapter, ab: Ablation) -> Iterator[tuple[int, Writer]]:
    for lw in adapter.writers:
        if ab.scale(lw.index) == 0.0:
            continue
        for part in ("attention", "mlp"):
            if part in ab.components:
                yield from ((lw.index, w) for w in getattr(lw, part))


def untie(adapter: Adapter) -> None:
    """Give the unembedding its own copy, so an embedding edit leaves the logits' read-out alone."""
    adapter.unembedding.weight = torch.nn.Parameter(adapter.embedding.weight.detach().clone())
    adapter.tied_embeddings = False
    _set_tied(adapter, False)


def _set_tied(adapter: Adapter, tied: bool) -> None:
    configs = (adapter.config, getattr(adapter.config, "get_text_config", lambda: None)())
    for cfg in {id(c): c for c in configs if c is not None}.values():
        cfg.tie_word_embeddings = tied


@torch.no_grad()
def apply_weights(adapter: Adapter, ablations: Sequence[Ablation], norm_preserving: bool = False) -> None:
    """Edit the weights in place, one ablation after another."""
    for ab in ablations:
        if ab.embedding:
            if adapter.tied_embeddings:
                untie(adapter)
            emb = adapter.embedding.weight  # [vocab, H]: each row lives in the residual stream
            u, lft = operator(ab.directions, ab.alphas)
            e = emb.data.double()
            new = _project(e.T, u.to(e.device), lft.to(e.device)).T
            if norm_preserving:  # each row is one token's vector: keep its length
                new = keep_lengths(new, e, 1)
            emb.data.copy_(new.to(emb.dtype))
        for layer, w in _writers(adapter, ab):
            u, lft = _writer_operator(w, ab, adapter.hidden_size, ab.scale(layer))
            _edit_tensor(w.weight, u, lft, norm_preserving)
            if w.bias is not None:
                _edit_tensor(w.bias, u, lft, False)


@contextmanager
def weights_edited(
    adapter: Adapter, ablations: Sequence[Ablation], norm_preserving: bool = False, store: torch.dtype | None = None
) -> Iterator[None]:
    """apply_weights for the duration of the block, then the touched tensors are restored exactly.

    Only the edited tensors are copied (the writers, the embedding), so a model can be exported
    edited and then evaluated or edited otherwise without loading it again. `store`: the dtype the
    edited model would be saved in; the edited tensors are rounded to it once, after every edit,
    as saving does, so a model loaded in a wider dtype computes with the numbers its export holds.
    """
    touched: list[torch.nn.Parameter] = []
    if any(ab.embedding for ab in ablations):
        touched.append(adapter.embedding.weight)
    for ab in ablations:
        for _, w in _writers(adapter, ab):
            touched += [w.weight] + ([w.bias] if w.bias is not None else [])
    saved = {id(p): (p, p.detach().clone()) for p in touched}
    was_tied, unembedding = adapter.tied_embeddings, adapter.unembedding.weight
    try:
        apply_weights(adapter, ablations, norm_preserving)
        if store is not None:
            with torch.no_grad():
                for p, _ in saved.values():
                    p.data.copy_(p.data.to(store).to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for p, original in saved.values():
                p.data.copy_(original)
        if was_tied and not adapter.tied_embeddings:
            adapter.unembedding.weight = unembedding
            adapter.tied_embeddings = True
            _set_tied(adapter, True)


def edited(
    adapter: Adapter, ablations: Sequence[Ablation], norm_preserving: bool = False, store: torch.dtype | None = None
) -> AbstractContextManager:
    """The edit for measuring a model under it: hooks where they compute what the edited weights do
    (a plain edit, nothing rounded: `store` None), else the weight edit (`weights_edited`), undone on exit.

    A norm-preserving edit rescales each written column by a factor no output hook can know, so it is
    always measured on the weights: a method choosing among norm-preserving edits then chooses by what
    its export will hold.
    """
    if store is None and not norm_preserving:
        return hooked(adapter, ablations)
    return weights_edited(adapter, ablations, norm_preserving, store)


def _operators(
    adapter: Adapter, ablations: Sequence[Ablation]
) -> list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]]:
    """(module, U, L) for every hook, in the order the weight edit applies them: per ablation, the
    embedding, then each writer (U read through its post-norm gain)."""
    ops = []
    for ab in ablations:
        if ab.directions.shape[1] == 0:
            continue
        if ab.embedding:
            ops.append((adapter.embedding, *operator(ab.directions, ab.alphas)))
        for layer, w in _writers(adapter, ab):
            ops.append((w.module, *_writer_operator(w, ab, adapter.hidden_size, ab.scale(layer))))
    return ops


def _removal_hook(u: torch.Tensor, lft: torch.Tensor, positions: torch.Tensor | None):  # noqa: ANN202
    """A forward hook taking L U' y off the module's output y (in y's dtype), where `positions` says."""
    casts: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(_mod: torch.nn.Module, _args: tuple, out: torch.Tensor | tuple) -> torch.Tensor | tuple:
        y = out[0] if isinstance(out, tuple) else out
        key = (y.device, y.dtype)
        if key not in casts:
            casts[key] = (u.to(y.device, y.dtype), lft.to(y.device, y.dtype))
        ud, ld = casts[key]
        removed = (y @ ud) @ ld.T
        y = y - (removed if positions is None else removed * _position_mask(positions, y))
        return (y, *out[1:]) if isinstance(out, tuple) else y

    return hook


def _position_mask(positions: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """positions [batch, seq] as a [..., 1] factor on y [batch, seq, H] or its flattened [batch*seq, H]
    (a fused-experts block writes its tokens flattened, batch-major)."""
    if positions.numel() != y.shape[:-1].numel():
        raise ValueError(
            f"positions {tuple(positions.shape)} do not match a writer output {tuple(y.shape)}: "
            "pass a [batch, seq] mask for the full sequence (no generation with a cache)"
        )
    return positions.to(y.device, y.dtype).reshape(*y.shape[:-1], 1)


@contextmanager
def hooked(
    adapter: Adapter,
    ablations: Sequence[Ablation],
    *,
    positions: torch.Tensor | None = None,
    differentiable: bool = False,
    resolve: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> Iterator[None]:
    """The weight edit as forward hooks on the writer modules (and the embedding); removed on exit.

    The hooks are differentiable in the model's activations either way (so a loss can train the
    model under the ablation). `differentiable`: the operators are also built with autograd on,
    so gradients reach the ablations' directions (one backward per entry: the operators are built
    once, on entry). `positions` [batch, seq]: the edit applies only where it is non-zero (scaled by
    it), which no weight edit can do; the mask must match every forward made inside the block.
    `resolve` maps a writer module to the module that wraps it (a LoRA layer), so what the wrapper
    adds is edited too.
    """
    with torch.enable_grad() if differentiable else torch.no_grad():
        ops = _operators(adapter, ablations)
    handles = []
    try:
        for module, u, lft in ops:
            target = module if resolve is None else resolve(module)
            handles.append(target.register_forward_hook(_removal_hook(u, lft, positions)))
        yield
    finally:
        for h in handles:
            h.remove()


def orthogonalize(
    adapter: Adapter,
    directions: torch.Tensor,
    alpha: float = 1.0,
    layers: list[int] | None = None,
    embedding: bool = True,
) -> None:
    """Remove span(directions) from every residual writer in place (the classic abliteration)."""
    scale = None
    if layers is not None:
        scale = torch.zeros(adapter.num_layers, dtype=torch.float64)
        scale[layers] = 1.0
    apply_weights(adapter, [Ablation(directions, alpha, scale, embedding)])


def ablation_tensors(ablations: Sequence[Ablation]) -> dict[str, torch.Tensor]:
    """What was removed, for ablation.safetensors."""
    out = {}
    for i, ab in enumerate(ablations):
        out[f"{i}.directions"] = ab.directions.contiguous()
        out[f"{i}.alphas"] = ab.alphas.contiguous()
        if ab.layer_scale is not None:
            out[f"{i}.layer_scale"] = ab.layer_scale.contiguous()
    return out
