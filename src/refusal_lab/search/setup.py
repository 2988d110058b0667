"""What every trial of a search reuses, computed once per worker, and how its replies are scored.

Each worker probes once (activations cached on disk), captures the capability activations and the
base logits once, then applies every trial's edit as hooks on the one loaded model, so a trial
costs one evaluation. Replies are labelled refused / complied / broken (exactly on an organism, by
coherence against the unedited model otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from refusal_lab.ablate.stage import export_dtype
from refusal_lab.config import ProbeSettings, Settings
from refusal_lab.core.activations import cached_capture
from refusal_lab.core.artifacts import Log
from refusal_lab.core.generate import generate
from refusal_lab.core.metrics import Scorer, last_logits, refusal_openers
from refusal_lab.core.model import Loaded
from refusal_lab.core.scoring import choose_scorer
from refusal_lab.core.sources import PromptSets, Source
from refusal_lab.probe.directions import Probe
from refusal_lab.probe.stage import run_probe
from refusal_lab.search.proxy import Proxy


@dataclass
class SearchSetup:
    """Everything a trial needs, computed once per worker."""

    loaded: Loaded
    probe: Probe  # SABER's first pass on the probe prompts
    probe_opts: ProbeSettings
    per_layer: torch.Tensor  # [L, H] projected difference of means per layer (kernel method)
    probe_texts: dict[str, list[str]]
    eval_harmful: list[str]
    eval_harmless: list[str]
    base_logits: torch.Tensor
    capability_vectors: torch.Tensor  # [n, L, H] of the unedited model, for entanglement
    scorer: Scorer
    batch_size: int
    max_new_tokens: int
    methods: tuple[str, ...]
    proxy: Proxy = field(default_factory=Proxy)
    select_max_kl: float | None = 0.1  # the layer selection's KL limit (Arditi's); None: no selection
    store: torch.dtype | None = None  # None: plain trials hook the edit; else they edit the weights, rounded to this
    norm_choices: tuple[bool, ...] = (False,)  # the space's norm-preserving values: one (fixed) or both (searched)


def make_setup(
    loaded: Loaded,
    sets: PromptSets,
    eval_harmful: list[str],
    eval_harmless: list[str],
    s: Settings,
    scorer: Scorer,
    log: Log,
    base_logits: torch.Tensor | None = None,
    trials: bool = True,
    refusal_ids: tuple[int, ...] | None = None,
) -> SearchSetup:
    """Probe once (cached on disk) and compute the base logits: what every trial reuses.

    trials=False (pick: rebuild one trial's edit) skips what only measuring trials needs. `refusal_ids`:
    the model's refusal openers where the caller has them already (prove's target), else found here.
    """
    cache = s.cache_dir / "activations"
    probe = run_probe(loaded, sets, s.probe, s.batch_size, cache, log)
    dom_opts = ProbeSettings(extraction="dom", directions_per_layer=1, biproject=s.probe.biproject)
    dom = run_probe(loaded, sets, dom_opts, s.batch_size, cache, log)
    caps = cached_capture(loaded, sets.texts("capability"), "last", s.batch_size, cache_dir=cache)
    if base_logits is None:
        base_logits = last_logits(loaded.model, loaded.tokenizer, eval_harmless, s.batch_size)
    return SearchSetup(
        loaded=loaded,
        probe=probe,
        probe_opts=s.probe,
        per_layer=dom.directions[:, :, 0],
        probe_texts={k: sets.texts(k) for k in ("harmful", "harmless", "capability")},
        eval_harmful=eval_harmful,
        eval_harmless=eval_harmless,
        base_logits=base_logits,
        capability_vectors=caps.vectors[:, 0],
        scorer=scorer,
        batch_size=s.batch_size,
        max_new_tokens=s.search.max_new_tokens,
        methods=s.search.method_list,
        proxy=make_proxy(loaded, sets, s, trials, refusal_ids),
        select_max_kl=s.ablate.arditi.arditi_max_kl if s.search.select_start else None,
        store=trial_store(loaded),
        norm_choices=norm_choices(s),
    )


def norm_choices(s: Settings) -> tuple[bool, ...]:
    """Plain and norm-preserving where the search samples it, else the one fixed by [ablate] norm_preserving."""
    return (False, True) if s.search.search_norm_preserving else (s.ablate.norm_preserving,)


def make_proxy(
    loaded: Loaded, sets: PromptSets, s: Settings, trials: bool, refusal_ids: tuple[int, ...] | None = None
) -> Proxy:
    """The search's proxy; its refusal openers are `refusal_ids` where given, else from short replies to
    the probe prompts, and only where trials are measured (pick rebuilds an edit and needs none)."""
    ids: tuple[int, ...] = ()
    if s.search.proxy and trials:
        if refusal_ids is None:
            markers = Source.of(loaded.source).markers
            harmful = sets.texts("harmful")
            gb = s.generation_batch_size
            refusal_ids = tuple(refusal_openers(loaded.model, loaded.tokenizer, harmful, markers, gb, 8))
        ids = tuple(refusal_ids)
    return Proxy(ids, s.search.proxy_margin if s.search.proxy else None, s.search.proxy_learn)


def trial_store(loaded: Loaded) -> torch.dtype | None:
    """None where nothing is rounded (float32 or float64 saved as loaded), so hooks compute what a plain
    edit's exported weights do; else the dtype a trial's weight edit is rounded to, as saving rounds it.

    A norm-preserving trial is never hooked, whatever this says (ablate.edit.edited): its rescale of
    each written column is not what the output hooks compute."""
    current, stored = next(loaded.model.parameters()).dtype, export_dtype(loaded)
    hooks_exact = current in (torch.float32, torch.float64) and stored == current
    return None if hooks_exact else stored


@dataclass(frozen=True)
class Unscored:
    """A scorer's name without its calibration: pick needs the study's identity, not labels."""

    name: str

    def labels(self, prompts: list[str], replies: list[str]) -> list[str]:
        raise RuntimeError("this setup rebuilds edits only; it does not score replies")


def search_scorer(loaded: Loaded, harmless: list[str], s: Settings, calibrate_it: bool = True) -> Scorer:
    """Exact on an organism; otherwise coherence against the unedited model, as prove scores.

    A keyword count would call a broken edit's babble compliance and put it on the front. The
    threshold is a low quantile of the model's own replies' likelihood on the evaluation harmless
    prompts. The scorer reads the same loaded model the trials edit: evaluate_trial labels replies
    after its hooks are gone, so it scores against the base.
    """
    src = Source.of(loaded.source)
    own = src.scorer()
    if own.name == "exact":
        return own
    if not calibrate_it:
        return Unscored("coherence")
    m, bs = loaded, s.batch_size
    replies = generate(m.model, m.tokenizer, harmless, s.search.max_new_tokens, s.generation_batch_size)
    return choose_scorer(src, m, harmless, replies, s.eval.coherence_quantile, bs)
