"""The adapter must find the modules that really write into the residual stream, for every family."""

from __future__ import annotations

import pytest
import torch

from refusal_lab.ablate.edit import orthogonalize
from refusal_lab.core.arch import adapt, norm_scale
from refusal_lab.errors import UserError
from tiny_models import FAMILIES, tiny_model

IDS = torch.tensor([[1, 5, 9, 17, 33, 4, 60, 7]])


def layer_io(model, adapter, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    seen = {}
    layer = adapter.layers[index]
    h1 = layer.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.__setitem__("in", (args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True,
    )
    h2 = layer.register_forward_hook(
        lambda _m, _a, out: seen.__setitem__("out", (out[0] if isinstance(out, tuple) else out).clone())
    )
    with torch.no_grad():
        model(input_ids=IDS, use_cache=False)
    h1.remove()
    h2.remove()
    return seen["in"], seen["out"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_zeroing_writers_makes_layer_identity(family):
    model = tiny_model(family)
    a = adapt(model)
    assert a.family == family and a.num_layers == 3 and a.hidden_size == 32
    x, y = layer_io(model, a, 1)
    assert (y - x).abs().max() > 1e-3  # the layer does something before the edit
    with torch.no_grad():
        for w in a.writers[1].all:
            w.weight.zero_()
            if w.bias is not None:
                w.bias.zero_()
    x, y = layer_io(model, a, 1)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_zeroing_only_attention_is_not_enough(family):
    """Negative control: the identity above needs every writer, so the check can fail."""
    model = tiny_model(family)
    a = adapt(model)
    with torch.no_grad():
        for w in a.writers[1].attention:
            w.weight.zero_()
    x, y = layer_io(model, a, 1)
    assert (y - x).abs().max() > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_final_norm_and_unembedding_give_logits(family):
    model = tiny_model(family)
    a = adapt(model)
    _, last = layer_io(model, a, a.num_layers - 1)
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
        mine = a.unembedding(a.final_norm(last))
    if getattr(model.config, "final_logit_softcapping", None):
        cap = model.config.final_logit_softcapping
        mine = torch.tanh(mine / cap) * cap
    torch.testing.assert_close(mine, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_orthogonalized_model_writes_nothing_along_direction(family):
    """After the edit, every layer's contribution and the embeddings are orthogonal to r."""
    model = tiny_model(family)
    a = adapt(model)
    r = torch.randn(32, dtype=torch.float64)
    r /= r.norm()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    orthogonalize(a, r)
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(before[n], p)]
    assert any("embed" in n for n in changed) and len(changed) >= 1 + 2 * a.num_layers
    emb_name = next(n for n in before if "embed_tokens" in n)
    # the read-out is untouched: a tied model was untied first, so lm_head keeps the old embedding
    torch.testing.assert_close(a.unembedding.weight, before.get("lm_head.weight", before[emb_name]))
    for i in range(a.num_layers):
        x, y = layer_io(model, a, i)
        along = ((y - x).double() @ r).abs().max()
        assert along < 1e-4 * max(1.0, float((y - x).abs().max())), (i, float(along))
    emb = a.embedding(IDS).double() @ r
    assert emb.abs().max() < 1e-4


def test_zero_strength_edit_changes_nothing():
    model = tiny_model("gemma2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    orthogonalize(adapt(model), torch.randn(32), alpha=0.0, embedding=False)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_norm_scale_reads_gemma_offset_gain():
    model = tiny_model("gemma2")
    norm = model.model.layers[0].post_attention_layernorm
    torch.testing.assert_close(norm_scale(norm, 32), (1 + norm.weight.detach()).double(), atol=1e-6, rtol=0)


def test_unsupported_family_names_the_supported_ones():
    import transformers as T

    model = T.AutoModelForCausalLM.from_config(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64))
    with pytest.raises(UserError) as err:
        adapt(model)
    assert "gpt2" in str(err.value) and "llama" in str(err.value) and "--allow-unverified-arch" in err.value.fix


def test_gemma3n_is_refused_with_the_reason():
    import transformers as T

    from tiny_models import COMMON

    cfg = T.Gemma3nTextConfig(**{**COMMON, "num_kv_shared_layers": 0}, head_dim=16)
    model = T.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UserError, match="AltUp") as err:
        adapt(model, allow_unverified=True)
    assert "gemma3n" in err.value.problem and "llama" in err.value.fix
