"""The organism's behaviour table: held-out refused / complied / broken, capability, recognition, KL.

Used by `organism eval` and the demo; the same core (metrics.behaviour, the folder's scorer,
first-token KL) as the evaluate stage, on the organism's own held-out sets.
"""

from __future__ import annotations

from dataclasses import replace

from refusal_lab.config import Settings
from refusal_lab.core.metrics import Behaviour, first_token_kl, last_logits
from refusal_lab.core.model import Loaded
from refusal_lab.organism.build import organism_behaviour, prompt_sets
from refusal_lab.organism.source import load_model

Samples = dict[str, list[tuple[str, str]]]


def organism_table(
    s: Settings, names: list[str], base: str | None = None, loaded: dict[str, Loaded] | None = None
) -> tuple[dict[str, Behaviour], Samples]:
    """One behaviour row per model (KL to `base` when given) and the last model's conversations.

    `loaded` holds models already in memory by name, so none is loaded twice.
    """
    loaded = dict(loaded or {})

    def get(name: str) -> Loaded:
        return loaded[name] if name in loaded else loaded.setdefault(name, load_model(s, name))

    base_logits = None
    if base is not None:
        ref = get(base)
        harmless = [p.prompt for p in prompt_sets(ref.folder, "eval")["harmless"]]
        base_logits = last_logits(ref.model, ref.tokenizer, harmless, s.batch_size)
    rows: dict[str, Behaviour] = {}
    samples: Samples = {}
    for name in names:
        m = get(name)
        table, samples = organism_behaviour(m.model, m.tokenizer, m.folder)
        if base_logits is not None:
            logits = last_logits(m.model, m.tokenizer, [prompt for prompt, _ in samples["harmless"]], s.batch_size)
            table = replace(table, kl=first_token_kl(base_logits, logits))
        rows[m.name] = table
    return rows, samples
