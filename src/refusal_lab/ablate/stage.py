"""The ablate stage: model + prompt sets (+ a probe folder) -> an edited Hugging Face model folder.

One interface over SABER, Arditi et al., projected and kernel ablation. The folder holds the
edited weights in the checkpoint's own dtype, the tokenizer, ablation.json (method, effective
settings, what was chosen and why, source fingerprint), ablation.safetensors (directions and
strengths applied), settings.toml + reproduce.sh, a model card and the organism's prompts/ when
the source had them. The loaded model is left as it was, so one command can export several edits.

`[ablate] norm_preserving` holds for every method: the export keeps each written column's and each
embedding row's norm (edit.py), and the methods that measure an edit while choosing (SABER's
re-probing passes, Arditi's candidate checks) measure that norm-preserving edit; projected and kernel
choose their direction from the probe alone.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from refusal_lab.ablate.arditi import arditi
from refusal_lab.ablate.edit import Ablation, ablation_tensors, weights_edited
from refusal_lab.ablate.kernel import Kernel, kernel_ablations
from refusal_lab.ablate.saber import band_layers, saber
from refusal_lab.config import ProbeSettings, Settings
from refusal_lab.core.artifacts import Log, manifest, settings_record, write_folder, write_replay
from refusal_lab.core.model import Loaded, checkpoint_dtype, unquantized
from refusal_lab.core.prompts import TRAINED_PROMPTS
from refusal_lab.core.sources import PromptSets, Source
from refusal_lab.errors import UserError
from refusal_lab.probe.directions import Probe, best_layer_by_fdr
from refusal_lab.probe.stage import read_probe, run_probe


@dataclass
class AblationChoice:
    """A method's ablations and a JSON record of what it chose and why (its shape is the method's own)."""

    ablations: list[Ablation]
    record: dict


@dataclass(frozen=True)
class AblationRecord:
    """What an edited folder's ablation.json says about the edit (beside the manifest head and settings).

    `chosen` is the method's own account (SABER's passes, Arditi's candidates, a search trial), kept as
    JSON because each method explains itself differently; the fields around it are the same for all.
    """

    method: str
    chosen: dict[str, Any]
    probe: str | None = None
    prompts: dict[str, int] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # a search trial's parameters
    directions_file: str = "ablation.safetensors"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> AblationRecord:
        names = {f.name for f in fields(AblationRecord)}
        return AblationRecord(**{k: v for k, v in data.items() if k in names})

    @staticmethod
    def read(folder: Path) -> AblationRecord:
        """The record of an edited folder (its ablation.json), or a one-line error."""
        path = folder / "ablation.json"
        if not path.is_file():
            raise UserError(f"{folder} has no ablation.json", "pass a folder written by `refusal-lab ablate` or `pick`")
        return AblationRecord.from_json(json.loads(path.read_text()))


def _dom_probe(loaded: Loaded, sets: PromptSets, s: Settings, log: Log) -> Probe:
    """One projected difference of means per layer (projected and kernel methods)."""
    opts = ProbeSettings(extraction="dom", directions_per_layer=1, positions="last", biproject=s.probe.biproject)
    return run_probe(loaded, sets, opts, s.batch_size, s.cache_dir / "activations", log)


def choose_ablations(loaded: Loaded, sets: PromptSets, s: Settings, first: Probe | None, log: Log) -> AblationChoice:
    """Run the configured method on the probe prompts."""
    model, tok, adapter, a = loaded.model, loaded.tokenizer, loaded.adapter, s.ablate
    harmful, harmless = sets.texts("harmful"), sets.texts("harmless")
    if a.method == "saber":
        if not sets.capability:
            raise UserError("SABER needs capability prompts for its entanglement scores", "pass --capability FILE")
        capability = sets.texts("capability")
        res = saber(
            model, tok, adapter, harmful, harmless, capability, s.probe, a.saber, s.batch_size, first, log,
            norm_preserving=a.norm_preserving,
        )  # fmt: skip
        return AblationChoice(res.ablations, res.as_dict())
    if a.method == "arditi":
        from refusal_lab.core.metrics import refusal_openers

        ids = refusal_openers(model, tok, harmful, Source.of(loaded.source).markers, s.generation_batch_size)
        choice = arditi(model, tok, adapter, harmful, harmless, ids, a.arditi, s.batch_size, log, a.norm_preserving)
        record = {k: v for k, v in asdict(choice).items() if k not in ("direction", "table")}
        record |= {"refusal_tokens": tok.convert_ids_to_tokens(ids), "candidates": choice.table}
        return AblationChoice([Ablation(choice.direction)], record)
    probe = first or _dom_probe(loaded, sets, s, log)
    per_layer = probe.directions[:, :, 0]
    n, k = per_layer.shape[0], a.kernel
    if a.method == "projected":
        layer = k.layer if k.layer is not None else best_layer_by_fdr(probe.fdr[:, 0], band_layers(n, 0.2, 0.8))
        if not 0 <= layer < n:
            raise UserError(f"layer {layer} is outside the model's {n} layers", "pass a valid --layer")
        log(f"  projected: direction from layer {layer} (FDR {float(probe.fdr[layer, 0]):.2f})")
        return AblationChoice([Ablation(per_layer[layer])], {"layer": layer, "fdr": float(probe.fdr[layer, 0])})
    index = k.direction_index if k.direction_index is not None else float(best_layer_by_fdr(probe.fdr[:, 0]))
    tent = Kernel.of(k)
    record = {"direction_index": index, "weights": tent.weights(n).tolist()}
    return AblationChoice(kernel_ablations(per_layer, index, tent, tent), record)


def export_dtype(loaded: Loaded) -> torch.dtype:
    """The dtype an export saves the weights in: the checkpoint's own, else the loaded one."""
    return checkpoint_dtype(loaded.folder) or next(loaded.model.parameters()).dtype


def export(
    loaded: Loaded,
    ablations: list[Ablation],
    out: Path,
    record: AblationRecord,
    s: Settings,
    command: str,
    force: bool = False,
    lora: Path | None = None,
) -> None:
    """Save the edited model as an ordinary folder (and, with `lora`, as a PEFT adapter folder too);
    the loaded model and the input folder are untouched."""
    from safetensors.torch import save_file

    from refusal_lab.core.card import model_card

    src = loaded.folder
    if out.expanduser().resolve() == src.resolve():
        raise UserError("the output folder is the input model folder", "write the edited model to a new folder")
    full = manifest(source=str(loaded.source), source_fingerprint=loaded.fingerprint, **record.to_json())
    full["settings"] = settings_record(s)

    def fill(tmp: Path) -> None:
        model = loaded.model
        current, stored = next(model.parameters()).dtype, export_dtype(loaded)
        with weights_edited(loaded.adapter, ablations, s.ablate.norm_preserving):
            model.to(stored)  # the checkpoint's own precision; unedited weights round-trip exactly
            try:
                model.save_pretrained(tmp, safe_serialization=True)
            finally:
                model.to(current)
        loaded.tokenizer.save_pretrained(tmp)
        if (src / "prompts").is_dir():
            shutil.copytree(src / "prompts", tmp / "prompts")
        if (src / TRAINED_PROMPTS).is_file():  # an edit of a hardened model was trained on them too
            shutil.copy2(src / TRAINED_PROMPTS, tmp / TRAINED_PROMPTS)
        save_file(ablation_tensors(ablations), str(tmp / "ablation.safetensors"))
        (tmp / "ablation.json").write_text(json.dumps(full, indent=1, default=str) + "\n")
        write_replay(tmp, s, command)
        (tmp / "README.md").write_text(model_card(src, full, command))

    adapter = None
    if lora is not None:  # factored (or refused) before anything is written
        from refusal_lab.ablate.adapter import check_destination, edit_deltas, write_adapter

        check_destination(lora, src, out)
        adapter = edit_deltas(loaded, ablations, s.ablate.norm_preserving, export_dtype(loaded))
    write_folder(out, fill, force)
    if adapter is not None:
        write_adapter(loaded, adapter, lora, full, s, command, force)


def run_ablate(
    loaded: Loaded, s: Settings, out: Path, probe_dir: Path | None, force: bool, log: Log, lora: Path | None = None
) -> AblationRecord:
    """Choose the ablation on the probe prompts, export the edited folder, return its manifest record."""
    first = None
    if probe_dir is not None:
        first = read_probe(probe_dir, loaded.fingerprint, loaded.adapter.hidden_size)
    sets = Source.of(loaded.source).probe_sets(s.prompts)
    log(
        f"ablate: method {s.ablate.method}, {len(sets.harmful)} harmful / {len(sets.harmless)} harmless / "
        f"{len(sets.capability)} capability prompts"
    )
    choice = choose_ablations(loaded, sets, s, first, log)
    record = AblationRecord(
        s.ablate.method,
        choice.record,
        str(probe_dir) if probe_dir else None,
        {k: len(getattr(sets, k)) for k in ("harmful", "harmless", "capability")},
    )
    command = "ablate" + (f" --probe {probe_dir.resolve()}" if probe_dir else "")
    export(unquantized(loaded, log), choice.ablations, out, record, s, command, force, lora)  # 4/8-bit: the full copy
    return record
