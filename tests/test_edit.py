"""Edits: the hook form equals the weight form on every family, in each of its modes; removed components are gone."""

from __future__ import annotations

import copy

import pytest
import torch

from refusal_lab.ablate.edit import Ablation, apply_weights, hooked
from refusal_lab.ablate.kernel import Kernel
from refusal_lab.core.arch import adapt, norm_scale
from tiny_models import FAMILIES, tiny_model

IDS = torch.tensor([[1, 5, 9, 17, 33, 4, 60, 7], [3, 8, 21, 40, 2, 11, 90, 6]])


def _ablations(hidden: int, n_layers: int, seed: int = 0) -> list[Ablation]:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(hidden, 3, generator=g, dtype=torch.float64)
    local = torch.zeros(n_layers, dtype=torch.float64)
    local[1] = 1.0
    return [
        Ablation(dirs, torch.tensor([1.0, 0.6, 0.03]), Kernel(0.9, 0.5, 0.3, 0.6).weights(n_layers), embedding=True),
        Ablation(
            torch.randn(hidden, 2, generator=g, dtype=torch.float64), 0.825, local, embedding=False, components=("mlp",)
        ),
    ]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hook_and_weight_edits_give_the_same_logits(family):
    model = tiny_model(family)
    a = adapt(model)
    abl = _ablations(a.hidden_size, a.num_layers)
    with torch.no_grad():
        base = model(input_ids=IDS).logits
        with hooked(a, abl):
            hooked_logits = model(input_ids=IDS).logits
        with hooked(a, abl, differentiable=True, positions=torch.ones(IDS.shape, dtype=torch.bool)):
            every_mode = model(input_ids=IDS).logits  # the engine's other modes, chosen to mean the same edit
        after_hooks = model(input_ids=IDS).logits
    torch.testing.assert_close(after_hooks, base)  # hooks are removed on exit
    assert torch.equal(every_mode, hooked_logits)
    edited = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in edited.named_parameters()}
    apply_weights(adapt(edited), abl)
    assert sum(not torch.equal(before[n], p) for n, p in edited.named_parameters() if n in before) >= 3
    with torch.no_grad():
        weight_logits = edited(input_ids=IDS).logits
    assert (weight_logits - base).abs().max() > 1e-3  # the edit does something
    torch.testing.assert_close(weight_logits, hooked_logits, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gemma3_text"])
def test_norm_preserving_keeps_column_norms_and_removes_the_direction(family):
    """Where a post-norm scales the branch output (Gemma), the direction removed is the gain-weighted one."""
    model = tiny_model(family)
    a = adapt(model)
    r = torch.randn(a.hidden_size, dtype=torch.float64)
    before = {w.name: w.weight.detach().double().clone() for lw in a.writers for w in lw.all}
    apply_weights(a, [Ablation(r, 1.0, embedding=False)], norm_preserving=True)
    checked = 0
    for lw in a.writers:
        for w in lw.all:
            u = r if w.post_norm is None else norm_scale(w.post_norm, a.hidden_size) * r
            u = u / u.norm()
            new = w.weight.detach().double()
            torch.testing.assert_close(new.norm(dim=-2), before[w.name].norm(dim=-2), atol=1e-5, rtol=1e-5)
            assert (torch.einsum("h,...hi->...i", u, new)).abs().max() < 1e-5
            assert (
                torch.einsum("h,...hi->...i", u, before[w.name])
            ).abs().max() > 1e-3  # there was something to remove
            checked += 1
    assert checked == sum(len(lw.all) for lw in a.writers) > 0


def test_partial_strength_scales_the_removed_component():
    model = tiny_model("llama")
    a = adapt(model)
    r = torch.randn(a.hidden_size, dtype=torch.float64)
    r /= r.norm()
    w = a.writers[0].mlp[0].weight
    comp = r @ w.detach().double()
    apply_weights(a, [Ablation(r, 0.25, embedding=False)])
    torch.testing.assert_close(r @ w.detach().double(), 0.75 * comp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_unequal_strengths_leave_each_direction_one_minus_its_strength(family):
    """Two directions 60 degrees apart, strengths 0.825 and 0.03: each keeps exactly 1 - its strength,
    on writers with post-norm gains (Gemma2: g*d are not orthogonal) and on the embedding."""
    model = tiny_model(family)
    a = adapt(model)
    g = torch.Generator().manual_seed(3)
    d1 = torch.randn(a.hidden_size, generator=g, dtype=torch.float64)
    d1 /= d1.norm()
    other = torch.randn(a.hidden_size, generator=g, dtype=torch.float64)
    other -= (other @ d1) * d1
    d2 = 0.5 * d1 + (0.75**0.5) * other / other.norm()
    alphas = torch.tensor([0.825, 0.03], dtype=torch.float64)
    writers = [w for lw in a.writers for w in lw.all]
    before = {w.name: w.weight.detach().double().clone() for w in writers}
    emb = a.embedding.weight.detach().double().clone()
    apply_weights(a, [Ablation(torch.stack([d1, d2], 1), alphas, embedding=True)])
    assert any(w.post_norm is not None for w in writers) == (family == "gemma2")
    for w in writers:
        gain = norm_scale(w.post_norm, a.hidden_size) if w.post_norm is not None else torch.ones(a.hidden_size)
        for d, alpha in zip((d1, d2), alphas, strict=True):
            u = gain.double() * d
            old = torch.einsum("h,...hi->...i", u, before[w.name])
            new = torch.einsum("h,...hi->...i", u, w.weight.detach().double())
            torch.testing.assert_close(new, (1 - alpha) * old, atol=1e-5, rtol=1e-4)
    for d, alpha in zip((d1, d2), alphas, strict=True):
        torch.testing.assert_close(
            a.embedding.weight.detach().double() @ d, (1 - alpha) * (emb @ d), atol=1e-5, rtol=1e-4
        )


def test_an_export_edit_is_undone_exactly_and_a_tied_model_is_tied_again():
    from refusal_lab.ablate.edit import weights_edited

    model = tiny_model("gemma2")  # ties its embeddings
    a = adapt(model)
    assert a.tied_embeddings
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        base = model(input_ids=IDS).logits
    with weights_edited(a, _ablations(a.hidden_size, a.num_layers)):
        with torch.no_grad():
            assert (model(input_ids=IDS).logits - base).abs().max() > 1e-3
        assert not a.tied_embeddings
    assert a.tied_embeddings and a.unembedding.weight is a.embedding.weight and model.config.tie_word_embeddings
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_an_edit_measured_in_float32_for_a_bfloat16_export_holds_the_exported_numbers():
    """The search measures a trial as its export will be: edited, then rounded once to the saved dtype."""
    from refusal_lab.ablate.edit import weights_edited

    model = tiny_model("llama")
    with torch.no_grad():  # weights as a bfloat16 checkpoint loaded in float32 holds them
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    a = adapt(model)
    abl = _ablations(a.hidden_size, a.num_layers)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    exported = copy.deepcopy(model)
    apply_weights(adapt(exported), abl)
    with torch.no_grad():
        for p in exported.parameters():  # what saving in bfloat16 and loading in float32 give (not buffers)
            p.copy_(p.to(torch.bfloat16).float())
        want = exported(input_ids=IDS).logits
        with weights_edited(a, abl, store=torch.bfloat16):
            rounded = model(input_ids=IDS).logits
        with weights_edited(a, abl):
            unrounded = model(input_ids=IDS).logits
    assert torch.equal(rounded, want)
    assert not torch.equal(unrounded, want)  # rounding the edit matters: the check can fail
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_differentiable_hooks_give_the_direction_its_true_gradient(family):
    """Gradients reach the direction only in differentiable mode, and they are the loss's derivative
    (finite differences); the edit itself is the same in both modes. Gemma2: through post-norm gains."""
    model = tiny_model(family).double()
    model.requires_grad_(False)
    a = adapt(model)
    g = torch.Generator().manual_seed(1)
    v = torch.randn(a.hidden_size, generator=g, dtype=torch.float64).requires_grad_(True)

    def run(vec: torch.Tensor, differentiable: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with hooked(a, [Ablation(vec, 0.7)], differentiable=differentiable):
            logits = model(input_ids=IDS).logits
        return logits, logits.log_softmax(-1)[..., 3].sum()

    plain, _ = run(v, False)
    assert not plain.requires_grad  # the ordinary mode builds no graph back to the direction
    logits, loss = run(v, True)
    assert torch.equal(logits, plain)
    loss.backward()
    assert v.grad is not None and v.grad.norm() > 1e-4
    eps = 1e-2  # the norms compute in float32 inside a float64 model: a smaller step drowns in rounding
    for e in (torch.randn(a.hidden_size, generator=g, dtype=torch.float64), v.grad / v.grad.norm()):
        with torch.no_grad():
            fd = (run(v.detach() + eps * e, False)[1] - run(v.detach() - eps * e, False)[1]) / (2 * eps)
        assert abs(float(fd)) > 1e-2  # the directional derivative is not trivially zero
        assert float(fd) == pytest.approx(float(v.grad @ e), rel=2e-3)


def test_hooks_let_a_model_train_under_the_edit_without_reaching_the_direction():
    """What harden needs: the ordinary mode's hooks pass gradients to the model's weights."""
    model = tiny_model("llama")
    a = adapt(model)
    v = torch.randn(a.hidden_size, dtype=torch.float64).requires_grad_(True)
    with hooked(a, [Ablation(v, 1.0)]):
        model(input_ids=IDS).logits.log_softmax(-1)[..., 3].sum().backward()
    assert v.grad is None
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in (a.writers[0].mlp[0].weight, a.embedding.weight))


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3_moe", "gemma4_text"])
def test_positions_mode_edits_the_chosen_positions_only(family):
    """Positions before a row's first chosen one keep the unedited logits exactly (causal attention: later
    ones see the edit); chosen ones change. qwen3_moe: its experts write tokens flattened."""
    model = tiny_model(family)
    a = adapt(model)
    abl = _ablations(a.hidden_size, a.num_layers)
    chosen = torch.zeros(IDS.shape, dtype=torch.bool)
    first = [5, 2]
    for row, f in enumerate(first):
        chosen[row, f:] = True
    with torch.no_grad():
        base = model(input_ids=IDS).logits
        with hooked(a, abl, positions=chosen):
            part = model(input_ids=IDS).logits
        with pytest.raises(ValueError, match="positions"), hooked(a, abl, positions=chosen[:, :4]):
            model(input_ids=IDS)
        assert torch.equal(model(input_ids=IDS).logits, base)  # hooks removed after the error too
    for row, f in enumerate(first):
        # rounding only: an MoE block's expert matmuls group tokens by route, and later tokens route anew
        torch.testing.assert_close(part[row, :f], base[row, :f], atol=1e-6, rtol=0)
        assert (part[row, f:] - base[row, f:]).abs().amax(-1).min() > 1e-4


def test_training_time_ablation_removes_nearly_parallel_global_directions_from_the_embedding():
    """harden's ablation through the engine: the embedding loses the span of the global directions, as the
    weight edit does, though they are nearly parallel (two layers' differences of means; cos 0.99 on the
    organism), where subtracting each column's component on its own would overshoot."""
    from refusal_lab.harden.robust import RefusalSubspace, ablating

    model = tiny_model("llama")
    a = adapt(model)
    g = torch.Generator().manual_seed(2)
    d1 = torch.randn(a.hidden_size, generator=g, dtype=torch.float64)
    d2 = d1 + 0.1 * d1.norm() / a.hidden_size**0.5 * torch.randn(a.hidden_size, generator=g, dtype=torch.float64)
    glob = torch.stack([d1 / d1.norm(), d2 / d2.norm()], 1)
    assert float(glob[:, 0] @ glob[:, 1]) > 0.99
    per_layer = [torch.linalg.qr(torch.randn(a.hidden_size, 2, generator=g, dtype=torch.float64))[0]] * a.num_layers
    sub = RefusalSubspace(per_layer, glob)
    with torch.no_grad():
        before = a.embedding(IDS).double() @ glob
        with ablating(a, sub, use_global=True):
            after = a.embedding(IDS).double() @ glob
    assert before.abs().max() > 1e-2  # there was something to remove
    assert after.abs().max() < 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_shared_head_pass_gives_the_direction_the_gradient_a_plain_pass_gives(family):
    """rdo trains its direction through `prompt_forward` on a headed batch (the head once, its cache
    copied to every row): the loss and the gradient reaching the direction must be the plain pass's."""
    from refusal_lab.core.generate import headed, prompt_forward
    from test_generate import _batch_with_head

    model = tiny_model(family)
    for p in model.parameters():
        p.requires_grad_(False)
    adapter = adapt(model)
    batch = _batch_with_head(6, [3, 7, 5, 1])
    moved = headed(batch)
    assert moved is not batch
    w = torch.randn(model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    got = []
    for shared in (False, True):
        v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        with hooked(adapter, [Ablation(v / v.norm())], differentiable=True):
            if shared:
                logits = prompt_forward(model, moved, 1).logits[:, -1]
            else:
                logits = model(**batch, position_ids=pos).logits[:, -1]
            loss = (torch.log_softmax(logits, -1) @ w).sum()
        loss.backward()
        got.append((loss.detach(), v.grad.clone()))
    torch.testing.assert_close(got[1][0], got[0][0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(got[1][1], got[0][1], atol=1e-4, rtol=1e-4)
    assert got[0][1].abs().sum() > 0  # the gradient reaches the direction at all
