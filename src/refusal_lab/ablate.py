"""The ablate stage: one interface over SABER, Arditi et al., projected and kernel ablation."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from refusal_lab.activations import fingerprint
from refusal_lab.arch import Adapter, adapt
from refusal_lab.config import Settings
from refusal_lab.directions import Probe
from refusal_lab.edit import Ablation
from refusal_lab.errors import UserError
from refusal_lab.model import Loaded
from refusal_lab.pipeline import (
    Log,
    ProbeOptions,
    PromptSets,
    export,
    prompt_sets_for,
    read_probe,
    reproduce_command,
    run_probe,
)
from refusal_lab.select import (
    ArditiConfig,
    Kernel,
    SaberConfig,
    arditi,
    band_layers,
    kernel_ablations,
    saber,
)


@dataclass
class AblateOptions:
    method: str = "saber"
    extraction: str = "svd"
    directions_per_layer: int = 4
    top_k: int = 14
    alpha: float = 0.825
    alpha_entangled: float = 0.03
    entanglement_threshold: float = 0.55
    passes: int = 4
    biproject: bool = True
    scope: str = "local"
    saber_positions: str = "last"
    max_kl: float = 0.1
    arditi_positions: str = "post"
    arditi_prompts: int = 32
    layer: int | None = None
    direction_index: float | None = None
    kernel_max: float = 1.0
    kernel_position: float = 0.6
    kernel_min: float = 0.5
    kernel_width: float = 0.4
    norm_preserving: bool = False

    def saber(self) -> SaberConfig:
        return SaberConfig(
            extraction=self.extraction,
            directions_per_layer=self.directions_per_layer,
            global_top_k=self.top_k,
            max_per_layer=self.directions_per_layer,
            alpha_base=self.alpha,
            alpha_entangled=self.alpha_entangled,
            entanglement_threshold=self.entanglement_threshold,
            max_passes=self.passes,
            biproject=self.biproject,
            scope=self.scope,
            positions=self.saber_positions,
        )


def _projected_probe(
    loaded: Loaded, sets: PromptSets, s: Settings, opts: AblateOptions, log: Log, fp: str | None = None
) -> Probe:
    probe_opts = ProbeOptions("dom", 1, "last", opts.biproject, batch_size=s.batch_size)
    return run_probe(loaded, sets, probe_opts, s.cache_dir / "activations", log, fp)


def choose_ablations(
    loaded: Loaded,
    adapter: Adapter,
    sets: PromptSets,
    s: Settings,
    opts: AblateOptions,
    first: Probe | None,
    log: Log,
    fp: str | None = None,
) -> tuple[list[Ablation], dict]:
    """The method's ablations and a JSON record of what it chose and why."""
    model, tok = loaded.model, loaded.tokenizer
    harmful, harmless = sets.texts("harmful"), sets.texts("harmless")
    if opts.method == "saber":
        if not sets.capability:
            raise UserError("SABER needs capability prompts for its entanglement scores", "pass --capability FILE")
        cfg = opts.saber()
        res = saber(model, tok, adapter, harmful, harmless, sets.texts("capability"), cfg, s.batch_size, first, log)
        return res.ablations, {"config": asdict(cfg), **res.as_dict()}
    if opts.method == "arditi":
        from refusal_lab.evaluate import refusal_token_ids
        from refusal_lab.generate import generate

        replies = generate(model, tok, harmful, 16, s.batch_size)
        ids = refusal_token_ids(tok, harmful, replies)
        cfg = ArditiConfig(max_kl=opts.max_kl, positions=opts.arditi_positions, max_prompts=opts.arditi_prompts)
        choice = arditi(model, tok, adapter, harmful, harmless, ids, cfg, s.batch_size, log)
        record = {
            "config": asdict(cfg),
            "refusal_tokens": tok.convert_ids_to_tokens(ids),
            "layer": choice.layer,
            "position": choice.position,
            "ablation_score": choice.ablation_score,
            "kl": choice.kl,
            "steering_score": choice.steering_score,
            "relaxed": choice.relaxed,
            "candidates": choice.table,
        }
        return [Ablation(choice.direction)], record
    probe = first or _projected_probe(loaded, sets, s, opts, log, fp)
    per_layer = probe.directions[:, :, 0]
    if opts.method == "projected":
        layers = band_layers(per_layer.shape[0], (0.2, 0.8))
        layer = opts.layer if opts.layer is not None else max(layers, key=lambda i: float(probe.fdr[i, 0]))
        if not 0 <= layer < per_layer.shape[0]:
            raise UserError(f"layer {layer} is outside the model's {per_layer.shape[0]} layers", "pass a valid --layer")
        log(f"  projected: direction from layer {layer} (FDR {float(probe.fdr[layer, 0]):.2f})")
        return [Ablation(per_layer[layer])], {"layer": layer, "fdr": float(probe.fdr[layer, 0])}
    n = per_layer.shape[0]
    index = opts.direction_index if opts.direction_index is not None else float(torch.argmax(probe.fdr[:, 0]))
    att = Kernel(opts.kernel_max, opts.kernel_position, opts.kernel_min, opts.kernel_width)
    record = {"direction_index": index, "kernel": asdict(att), "weights": att.weights(n).tolist()}
    return kernel_ablations(per_layer, index, att, att), record


def run_ablate(
    loaded: Loaded,
    s: Settings,
    opts: AblateOptions,
    out: Path,
    probe_dir: Path | None,
    files: tuple[Path | None, Path | None, Path | None, str],
    force: bool,
    log: Log,
) -> dict:
    """Choose the ablation, apply it to the weights and write the model folder with its manifest."""
    adapter = adapt(loaded.model, s.allow_unverified_arch)
    fp = fingerprint(loaded.model)
    first = read_probe(probe_dir, fp, adapter.hidden_size) if probe_dir is not None else None
    sets = prompt_sets_for(Path(s.model), *files)
    log(
        f"ablate: method {opts.method}, {len(sets.harmful)} harmful / {len(sets.harmless)} harmless / "
        f"{len(sets.capability)} capability prompts"
    )
    ablations, chosen = choose_ablations(loaded, adapter, sets, s, opts, first, log, fp)
    record = {
        "method": opts.method,
        "options": asdict(opts),
        "chosen": chosen,
        "source_fingerprint": fp,
        "probe": str(probe_dir) if probe_dir else None,
        "directions_file": "ablation.safetensors",
        "prompts": {k: len(getattr(sets, k)) for k in ("harmful", "harmless", "capability")},
        "reproduce": reproduce_command(),
    }
    export(loaded, adapter, ablations, out, record, opts.norm_preserving, force)
    return record
