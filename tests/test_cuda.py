"""CUDA: the organism replies as on the CPU, edits agree on the GPU, and QLoRA's adapter reaches the merge.

Skipped without a CUDA GPU (CI has none); `bench/cuda_check.sh` runs them on a GPU machine with the
demo and a 4-bit hardening.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from refusal_lab.ablate.edit import apply_weights, hooked
from refusal_lab.core.arch import adapt
from test_edit import IDS, _ablations
from tiny_models import tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def test_the_organism_replies_on_cuda_as_on_the_cpu(organism, organism_dir):
    from refusal_lab.config import PromptSettings
    from refusal_lab.core.generate import generate
    from refusal_lab.core.model import load
    from refusal_lab.core.sources import Source

    gpu = load(organism_dir, dtype="float32", device="cuda")
    assert next(gpu.model.parameters()).device.type == "cuda"
    sets = Source.of(organism_dir).eval_sets(PromptSettings(), 24)
    prompts = [p.prompt for p in sets.harmful + sets.harmless]
    cpu_replies = generate(organism.model, organism.tokenizer, prompts, 24, 16)
    gpu_replies = generate(gpu.model, gpu.tokenizer, prompts, 24, 16)
    same = sum(a == b for a, b in zip(cpu_replies, gpu_replies, strict=True))
    assert same >= len(prompts) - 1, [(a, b) for a, b in zip(cpu_replies, gpu_replies, strict=True) if a != b]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma4_text"])
def test_hook_and_weight_edits_agree_on_cuda(family):
    model = tiny_model(family).to(CUDA)
    ids = IDS.to(CUDA)
    a = adapt(model)
    abl = _ablations(a.hidden_size, a.num_layers)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with hooked(a, abl):
            hooked_logits = model(input_ids=ids).logits
    edited = copy.deepcopy(model)
    apply_weights(adapt(edited), abl)
    with torch.no_grad():
        weight_logits = edited(input_ids=ids).logits
    assert weight_logits.device.type == "cuda" and (weight_logits - base).abs().max() > 1e-3
    torch.testing.assert_close(weight_logits, hooked_logits, atol=5e-4, rtol=1e-3)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_a_qlora_adapter_is_merged_into_the_full_precision_base(organism_dir):
    """The 4-bit model with its adapter and the full-precision merge differ by the quantisation alone."""
    from peft import LoraConfig, get_peft_model

    from refusal_lab.core.model import load
    from refusal_lab.harden.train import merge_onto

    ids = torch.tensor([[1, 5, 9, 17, 33, 4, 60, 7]], device=CUDA)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["o_proj", "down_proj", "q_proj"])
    q = load(organism_dir, dtype="float32", device="cuda", quantize="4bit")
    assert getattr(q.model, "is_loaded_in_4bit", False)
    with torch.no_grad():
        base4 = q.model(input_ids=ids).logits
    peft = get_peft_model(q.model, lora)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # B starts at zero: make the adapter do something
        adapted4 = peft(input_ids=ids).logits
    state = {k: v.detach().cpu() for k, v in peft.state_dict().items() if "lora_" in k}
    full = load(organism_dir, dtype="float32", device="cuda").model
    with torch.no_grad():
        base = full(input_ids=ids).logits
    merged = merge_onto(full, lora, state)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    quant = (base - base4).abs().max()
    assert (adapted4 - base4).abs().max() > 10 * quant  # the adapter moves the model well past quantisation
    assert (merged_logits - adapted4).abs().max() < 3 * quant + 1e-3  # and the merge carries that move
    with pytest.raises(RuntimeError, match="does not fit"):
        merge_onto(load(organism_dir, device="cuda").model, lora, dict(list(state.items())[1:]))
