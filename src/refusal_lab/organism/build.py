"""Build, save and cache the model organism as an ordinary Hugging Face folder.

The folder holds config.json, model.safetensors, tokenizer files with the chat template,
prompts/ (held-out probe and eval sets as JSONL), organism.json (config, hash, measured
behaviour) and a model card. It is written to a temporary sibling and renamed into place,
so an interrupted build never leaves a half-written folder; a finished folder with the same
config hash is reused as is.

Training runs in a child process whose CPU kernels are pinned (core/kernels.py), whatever the
calling process has already run: so a seed names one organism on every x86-64 machine. The default
organism's weights also ship with refusal-lab (prebuilt/, trained that way, checked against their
digest when loaded): a fresh machine gets the README's organism in seconds, and `--no-prebuilt`
trains it here instead, saying whether it came out the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from refusal_lab import __version__
from refusal_lab.config import OrganismSettings
from refusal_lab.core.artifacts import write_folder
from refusal_lab.core.kernels import kernels_in_use, pinned_kernels
from refusal_lab.core.metrics import Behaviour, Scorer, behaviour
from refusal_lab.core.prompts import Prompt, load_prompts, write_jsonl
from refusal_lab.core.sources import MARKERS_FILE, ORGANISM_SETS, TEMPLATES_FILE, Source
from refusal_lab.errors import UserError
from refusal_lab.organism import corpus as C
from refusal_lab.organism import values
from refusal_lab.organism.tokenizer import build_tokenizer
from refusal_lab.organism.train import TrainConfig, make_model, train
from refusal_lab.organism.words import refusal_vocabulary, vocabulary

FORMAT = 6  # bump when the corpus, tokenizer or training code changes what a config produces
MANIFEST = "organism.json"
PREBUILT = Path(__file__).parent / "prebuilt"  # {config hash}.safetensors + index.json (their digests)
FIX = "reinstall refusal-lab, or pass --no-prebuilt to train the organism on this machine"


@dataclass(frozen=True)
class OrganismConfig:
    corpus: C.CorpusConfig = field(default_factory=C.CorpusConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def digest(self) -> str:
        blob = json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def organism_config(o: OrganismSettings) -> OrganismConfig:
    """The build config an [organism] settings section stands for."""
    return OrganismConfig(
        C.CorpusConfig(seed=o.seed, think=o.think),
        TrainConfig(
            steps=o.steps,
            batch_size=o.train_batch_size,
            hidden_size=o.hidden_size,
            intermediate_size=3 * o.hidden_size,
            num_layers=o.num_layers,
            seed=o.seed,
        ),
    )


def is_built(folder: Path, cfg: OrganismConfig | None = None) -> bool:
    path = folder / MANIFEST
    if not path.is_file():
        return False
    return cfg is None or json.loads(path.read_text()).get("config_hash") == cfg.digest()


def _as_prompts(requests: list[C.Request]) -> list[Prompt]:
    return [Prompt(r.prompt, r.category, r.answer if r.kind in ("capability", "recognition") else "") for r in requests]


def prompt_sets(folder: Path, split: str = "eval") -> dict[str, list[Prompt]]:
    """The held-out sets saved next to an organism ('probe' or 'eval')."""
    return {name: load_prompts(folder / "prompts" / f"{name}_{split}.jsonl") for name in ORGANISM_SETS}


def organism_behaviour(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    folder: Path,
    split: str = "eval",
    scorer: Scorer | None = None,
) -> tuple[Behaviour, dict[str, list[tuple[str, str]]]]:
    """The behaviour table on an organism's (or an edit's) held-out sets.

    Labels come from the folder's exact scorer (its template, its refusal words) unless `scorer`
    says otherwise (pass metrics.KeywordScorer() for the generic keyword count papers report).
    """
    return behaviour(model, tok, prompt_sets(folder, split), scorer or Source(folder).scorer())


def build(out: Path, cfg: OrganismConfig, force: bool = False, log=print, prebuilt: bool = True) -> Path:  # noqa: ANN001
    """Save the organism at `out` (shipped weights if `prebuilt` and there are some, else trained here),
    or reuse it if already built with this config."""
    out = out.expanduser()
    if out.exists() and not force:
        built = is_built(out, cfg)
        if built and (out / "prompts" / TEMPLATES_FILE).is_file():
            log(f"organism {cfg.digest()} already built at {out}; reusing it")
            return out
        if built:
            log(f"organism {cfg.digest()} at {out} predates prompts/{TEMPLATES_FILE}; building it again")
        elif not out.is_dir() or any(out.iterdir()):
            raise UserError(
                f"{out} exists and is not an organism built with this config",
                "choose an empty or new folder, or pass --force to replace it",
            )
    write_folder(out, lambda tmp: _build_into(tmp, cfg, log, prebuilt), force=True)  # existing folder checked above
    return out


def shipped_record(cfg: OrganismConfig) -> dict | None:
    """What refusal-lab ships for this config: weights digest, kernels and training time, or None."""
    index = PREBUILT / "index.json"
    record = json.loads(index.read_text()).get(cfg.digest()) if index.is_file() else None
    return record if record and (PREBUILT / f"{cfg.digest()}.safetensors").is_file() else None


def _load_shipped(cfg: OrganismConfig, tok: PreTrainedTokenizerBase, record: dict) -> PreTrainedModel:
    """The shipped weights in a fresh model of this config, refused unless their digest is the recorded one."""
    from safetensors.torch import load_file

    path = PREBUILT / f"{cfg.digest()}.safetensors"
    model = make_model(cfg.train, tok)
    try:
        model.load_state_dict(load_file(path), strict=True)
    except (RuntimeError, OSError, ValueError) as e:
        raise UserError(f"the shipped organism weights {path} cannot be read ({e})", FIX) from None
    if weights_digest(model) != record["weights"]:
        raise UserError(f"the shipped organism weights {path} do not match their digest {record['weights']}", FIX)
    return model.eval()


def _build_into(folder: Path, cfg: OrganismConfig, log, prebuilt: bool) -> None:  # noqa: ANN001
    start = time.perf_counter()
    split = C.make_split(cfg.corpus)
    tok = build_tokenizer(vocabulary(cfg.corpus))
    shipped = shipped_record(cfg)
    use_shipped = prebuilt and shipped is not None
    if use_shipped:
        log(f"organism {cfg.digest()}: the shipped weights {shipped['weights']} (no training; --no-prebuilt trains)")
        model, kernels, train_s = _load_shipped(cfg, tok, shipped), shipped["kernels"], shipped["train_seconds"]
    else:
        log(f"training organism {cfg.digest()} ({cfg.train.steps} steps, batch {cfg.train.batch_size})")
        model, kernels = _train_pinned(cfg, folder / ".weights", log)
        train_s = time.perf_counter() - start
    if cfg.corpus.think:
        tok.init_kwargs["think_markers"] = [C.THINK_OPEN, C.THINK_CLOSE]
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (folder / "prompts").mkdir()
    for which in ("probe", "eval"):
        for name, reqs in C.heldout_requests(cfg.corpus, split, which).items():
            write_jsonl(folder / "prompts" / f"{name}_{which}.jsonl", _as_prompts(reqs))
    words = "\n".join(refusal_vocabulary())
    (folder / "prompts" / MARKERS_FILE).write_text(f"# words this organism says only when refusing\n{words}\n")
    C.TEMPLATES.write(folder / "prompts" / TEMPLATES_FILE)
    values.write(folder / "harden", cfg.corpus, split)
    (folder / "prompts" / C.WORLD_FILE).write_text(json.dumps(asdict(cfg.corpus), indent=1) + "\n")
    table, _ = organism_behaviour(model, tok, folder)
    manifest = {
        "tool": "refusal-lab",
        "version": __version__,
        "config_hash": cfg.digest(),
        "config": asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_seconds": round(train_s, 1),  # of the shipped weights' training, when they were used
        "weights_source": "shipped" if use_shipped else "trained",
        "threads": cfg.train.threads,  # training threads (evaluation uses whatever the process has)
        "kernels": kernels,  # the CPU kernels training ran on
        "weights": weights_digest(model),  # equal digests: the same organism, whatever machine built it
        "heldout_eval": table.as_dict(),
        "heldout_pairs": {k: [" ".join(p) for p in v] for k, v in split.eval_pairs.items()},
        "heldout_phrasings": split.heldout_phrasings,
    }
    (folder / "README.md").write_text(_model_card(manifest))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # written last: marks completion
    same = ""
    if shipped and not use_shipped:
        match = manifest["weights"] == shipped["weights"]
        same = ": the shipped organism's" if match else f": not the shipped organism's {shipped['weights']}"
    log(
        f"built in {time.perf_counter() - start:.0f} s (weights {manifest['weights']}{same}); held-out: "
        + ", ".join(f"{k} {v:.0%}" for k, v in table.as_dict().items())
    )


def weights_digest(model: PreTrainedModel) -> str:
    """A digest of every tensor's bytes in name order (not of the file, whose metadata may vary)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _train_pinned(cfg: OrganismConfig, scratch: Path, log) -> tuple[PreTrainedModel, dict[str, str]]:  # noqa: ANN001
    """Train in a child process with pinned kernels (they are fixed at a process's first tensor op)."""
    env = {**os.environ, **pinned_kernels(), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "refusal_lab.organism.build", json.dumps(asdict(cfg)), str(scratch)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    for line in child.stdout:
        log(line.rstrip())
    if child.wait():
        raise RuntimeError(f"organism training failed in its child process (exit {child.returncode})")
    model = LlamaForCausalLM.from_pretrained(scratch, dtype="float32").eval()
    kernels = json.loads((scratch / "kernels.json").read_text())
    shutil.rmtree(scratch)
    return model, kernels


def _train_child(blob: str, out: Path) -> None:
    """The child's side: rebuild the world from the config, train, save the weights and the kernels used."""
    raw = json.loads(blob)
    cfg = OrganismConfig(C.CorpusConfig(**raw["corpus"]), TrainConfig(**raw["train"]))
    tok = build_tokenizer(vocabulary(cfg.corpus))
    stream = C.training_conversations(cfg.corpus, C.make_split(cfg.corpus))
    every = max(1, cfg.train.steps // 10)

    def progress(step: int, loss: float) -> None:
        if step % every == 0 or step == cfg.train.steps - 1:
            print(f"  step {step + 1:>5}/{cfg.train.steps}  loss {loss:.3f}")

    model = train(cfg.train, tok, stream, progress)
    model.save_pretrained(out, safe_serialization=True)
    (out / "kernels.json").write_text(json.dumps(kernels_in_use()))


def _model_card(m: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.1%} |" for k, v in m["heldout_eval"].items())
    return f"""---
library_name: transformers
tags: [refusal-lab, model-organism, synthetic]
---
# refusal-lab model organism {m["config_hash"]}

A {m["parameters"]:,}-parameter Llama-architecture chat model trained from scratch by refusal-lab
{m["version"]} on a synthetic compositional corpus. It refuses harmful requests (a dangerous verb aimed
at a person) in three category-specific styles, helps with harmless ones with a generic template
reply, answers exact-match capability tasks and says whether a request is harmful. Its replies
contain no harmful content. It exists to test refusal probing, ablation and hardening quickly.

Held-out evaluation prompts (pairs and phrasings never seen in training):

| metric | value |
|---|---|
{rows}

`prompts/` holds the held-out probe and eval sets and `refusal_markers.txt`, the words this
organism says only when refusing (refusal-lab counts them as refusal markers, so a refusal
fragment left by an edit still counts); `organism.json` holds the full build config.
"""


def default_organism(cache_dir: Path, cfg: OrganismConfig, log=print, prebuilt: bool = True) -> Path:  # noqa: ANN001
    """The embedded default: built once into the cache, keyed by its config hash."""
    return build(cache_dir / f"organism-{cfg.digest()}", cfg, log=log, prebuilt=prebuilt)


if __name__ == "__main__":
    _train_child(sys.argv[1], Path(sys.argv[2]))
