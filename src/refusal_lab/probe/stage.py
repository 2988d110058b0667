"""The probe stage: model + prompt sets -> per-layer refusal directions and their scores.

Writes OUT/directions.safetensors (directions, valid mask, FDR, rho, class means; the model's
fingerprint in the metadata), scores.json / scores.csv, fdr.svg / entanglement.svg and
probe.json (the effective settings and prompt counts). read_probe checks a folder against the
model it is used with.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refusal_lab.config import ProbeSettings, Settings
from refusal_lab.core.activations import Stats, cached_capture
from refusal_lab.core.artifacts import Log, manifest, settings_record, write_folder
from refusal_lab.core.model import Loaded
from refusal_lab.core.sources import PromptSets
from refusal_lab.errors import UserError
from refusal_lab.probe.directions import Probe, probe_layers

SETS = ("harmful", "harmless", "capability")


def capture_sets(
    loaded: Loaded,
    sets: PromptSets,
    positions: str,
    batch_size: int,
    cache_dir: Path | None,
    log: Log,
    keep: int = 1024,
) -> dict[str, Stats]:
    """Activations of every non-empty set (cached on disk by weights, tokens and positions)."""
    stats = {}
    for name in SETS:
        texts = sets.texts(name)
        if not texts:
            continue
        log(f"capturing {name} activations ({len(texts)} prompts, positions={positions})")
        with tqdm(total=len(texts), desc=name, unit="prompt", disable=None, leave=False) as bar:
            stats[name] = cached_capture(loaded, texts, positions, batch_size, keep, cache_dir, bar.update)
    return stats


def samples(stats: Stats) -> torch.Tensor:
    """Per-prompt vectors [n x positions, L, H]: every captured position is a sample."""
    assert stats.vectors is not None
    return stats.vectors.flatten(0, 1)


def run_probe(
    loaded: Loaded, sets: PromptSets, opts: ProbeSettings, batch_size: int, cache_dir: Path | None, log: Log
) -> Probe:
    """Capture (cached) activations for the three sets and score directions at every layer."""
    stats = capture_sets(loaded, sets, opts.positions, batch_size, cache_dir, log)
    xh, xb = samples(stats["harmful"]), samples(stats["harmless"])
    # capability activations are read at the last token: entanglement is about what the model computes there
    xc = stats["capability"].vectors[:, -1] if "capability" in stats else None
    groups = None
    if opts.extraction == "lda":
        positions = stats["harmful"].positions
        groups = [p.category for p in sets.harmful[: len(xh) // positions] for _ in range(positions)]
        groups = groups if len(set(groups)) >= 2 else None
    return directions_of(opts, xh, xb, xc, groups)


def directions_of(
    opts: ProbeSettings, xh: torch.Tensor, xb: torch.Tensor, xc: torch.Tensor | None, groups: list[str] | None = None
) -> Probe:
    """Directions at every layer, extracted and scored as the [probe] settings say (probe and SABER's passes)."""
    return probe_layers(
        opts.extraction,
        xh,
        xb,
        xc,
        opts.directions_per_layer,
        groups,
        opts.shrinkage,
        opts.cap_variance,
        opts.biproject,
    )


def write_probe(out: Path, probe: Probe, loaded: Loaded, s: Settings, sets: PromptSets, force: bool = False) -> None:
    """directions.safetensors + scores.json/csv + plots + probe.json, written atomically."""
    from safetensors.torch import save_file

    from refusal_lab.core.plots import line_plot_svg

    rows = [
        {
            "layer": layer,
            "direction": j,
            "fdr": float(probe.fdr[layer, j]),
            "rho": float(probe.rho[layer, j]),
            "score": float(probe.score[layer, j]),
        }
        for layer in range(probe.fdr.shape[0])
        for j in range(probe.fdr.shape[1])
        if probe.valid[layer, j]
    ]
    summary = probe.summary()
    layers = list(range(probe.fdr.shape[0]))
    valid_fdr = torch.where(probe.valid, probe.fdr, torch.zeros_like(probe.fdr))

    def fill(tmp: Path) -> None:
        tensors = {
            "directions": probe.directions.contiguous(),
            "valid": probe.valid.contiguous(),
            "fdr": probe.fdr,
            "rho": probe.rho,
            "mu_harmful": probe.mu_harmful,
            "mu_harmless": probe.mu_harmless,
        }
        save_file(
            tensors, str(tmp / "directions.safetensors"), {"method": probe.method, "fingerprint": loaded.fingerprint}
        )
        (tmp / "scores.json").write_text(json.dumps({"summary": summary, "directions": rows}, indent=1) + "\n")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        (tmp / "scores.csv").write_text(buf.getvalue())
        top = {"top direction": (layers, valid_fdr.max(1).values.tolist()), "sum": (layers, valid_fdr.sum(1).tolist())}
        (tmp / "fdr.svg").write_text(line_plot_svg("Fisher separability per layer", "layer", "FDR", top))
        rho = {"rho": (layers, probe.rho[:, 0].tolist())}
        (tmp / "entanglement.svg").write_text(
            line_plot_svg("Capability entanglement of the top direction", "layer", "rho", rho)
        )
        meta = manifest(
            model=str(loaded.source),
            fingerprint=loaded.fingerprint,
            settings={"probe": settings_record(s)["probe"]},
            prompts={k: len(getattr(sets, k)) for k in SETS},
            summary=summary,
        )
        (tmp / "probe.json").write_text(json.dumps(meta, indent=1) + "\n")

    write_folder(out, fill, force)


def read_probe(folder: Path, model_fp: str, hidden: int) -> Probe:
    """A probe folder, checked against the model it is used with."""
    from safetensors import safe_open

    path = folder / "directions.safetensors"
    if not path.is_file():
        raise UserError(f"{folder} is not a probe folder (no directions.safetensors)", "run refusal-lab probe first")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if t["directions"].shape[1] != hidden:
        raise UserError(
            f"directions in {folder} have size {t['directions'].shape[1]}, the model's hidden size is {hidden}",
            "probe this model first",
        )
    if meta.get("fingerprint") != model_fp:
        raise UserError(f"the probe folder {folder} was made from another model", "run refusal-lab probe on this model")
    return Probe(
        meta.get("method", "?"), t["directions"], t["valid"], t["fdr"], t["rho"], t["mu_harmful"], t["mu_harmless"]
    )
