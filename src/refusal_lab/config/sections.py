"""The settings model: every option of every stage, documented and defaulted once.

Sections mirror the TOML file ([model], [probe], [ablate.saber], ...); the CLI builds its flags from
these models (cli/options.py), so a flag's help text, type and choices come from here. Flag names are
the field names, so a name means the same thing on every command that has it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_CONFIG_NAME = "refusal-lab.toml"
EXTRACTIONS = ("dom", "projected", "svd", "svd_paired", "lda", "whitened_svd")
POSITIONS = ("last", "post", "mean")
ABLATION_METHODS = ("saber", "arditi", "projected", "kernel")
SABER_SCOPES = ("local", "global")
SEARCH_METHODS = ("saber", "kernel")
QUANTIZE = ("none", "4bit", "8bit")  # bitsandbytes on CUDA: NF4 (QLoRA's), LLM.int8


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "refusal-lab"


class Section(BaseModel):
    """A settings section: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class ModelSettings(Section):
    path: str = Field(
        "organism",
        description="Model: a local Hugging Face folder, a .gguf file, a hub id (org/name, read from the Hugging Face "
        "cache), or 'organism' for the embedded default.",
        json_schema_extra={"cli": False},  # the commands take it as their MODEL argument
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights dtype; auto is float32 on CPU (bfloat16 is faster on CPUs with native bf16, "
        "e.g. AVX512-BF16) and the checkpoint's own dtype on GPU.",
    )
    device: str = Field(
        "auto", description="auto, cpu, cuda, cuda:N, or multi (spread layers over all GPUs with device_map)."
    )
    cpu_kernels: Literal["auto", "pinned", "native"] = Field(
        "auto",
        description="CPU kernels: pinned sum the same way on every x86-64 machine, so training reproduces "
        "(matmuls about 1.8x slower); native are the CPU's fastest; auto pins them for the organism.",
    )
    trust_remote_code: bool = Field(False, description="Run Python code shipped inside the model folder.")
    chat_template: Path | None = Field(None, description="Jinja chat template file, for tokenizers without one.")
    allow_unverified_arch: bool = Field(
        False, description="Try structural discovery on an architecture family refusal-lab has not tested."
    )
    download: bool = Field(
        False,
        description="Fetch a model named by hub id into the Hugging Face cache when it is missing there "
        "(needs the network; never with HF_HUB_OFFLINE set).",
    )
    quantize: Literal[QUANTIZE] = Field(
        "none",
        description="Load the weights in 4-bit (NF4) or 8-bit (LLM.int8) with bitsandbytes (a CUDA GPU; pip install "
        "'.[qlora]'); ablate saves its edit on the full-precision weights; harden quantizes with its own --quantize.",
    )

    @field_validator("path", "chat_template", mode="before")
    @classmethod
    def _expand_user(cls, v: Any) -> Any:  # a "~" in a TOML path means the home folder, as in a shell
        return os.path.expanduser(v) if isinstance(v, str | Path) and str(v).startswith("~") else v


class OrganismSettings(Section):
    """How the embedded default model organism is built (all but `prebuilt` is part of its cache key)."""

    seed: int = Field(0, description="Seed for the organism's corpus, split and initial weights.")
    steps: int = Field(900, ge=1, description="Organism training steps.")
    train_batch_size: int = Field(64, ge=1, description="Examples per training step.")
    hidden_size: int = Field(192, ge=8, description="Width of the organism's residual stream (its MLP is 3x).")
    num_layers: int = Field(4, ge=1, description="Decoder layers of the organism.")
    think: bool = Field(False, description="Train the organism with think traces (<think> ... </think>).")
    prebuilt: bool = Field(
        True,
        description="Use the organism weights shipped with refusal-lab when the config has some (checked "
        "against their digest); false trains them on this machine (pinned kernels, about 7 minutes).",
    )


class PromptSettings(Section):
    harmful: Path | None = Field(None, description="Harmful prompts (TXT/JSONL/CSV); default: the organism's own.")
    harmless: Path | None = Field(None, description="Harmless prompts (TXT/JSONL/CSV); default: refusal-lab's own.")
    capability: Path | None = Field(None, description="Capability prompts, for entanglement scores.")
    overrefusal: Path | None = Field(None, description="Benign prompts that only look dangerous.")
    mc: Path | None = Field(None, description="Multiple-choice JSONL {question, choices, answer} for capability.")
    column: str = Field("prompt", description="Prompt column in JSONL/CSV files.")


class ProbeSettings(Section):
    extraction: Literal[EXTRACTIONS] = Field("svd", description="How directions are extracted per layer.")
    directions_per_layer: int = Field(4, ge=1, description="Directions extracted per layer.")
    positions: Literal[POSITIONS] = Field(
        "last", description="Token positions read: last, post (every post-instruction token), or mean."
    )
    biproject: bool = Field(True, description="Make directions orthogonal to the harmless mean.")
    shrinkage: float = Field(0.1, ge=0, le=1, description="Covariance shrinkage for lda and whitened_svd.")
    cap_variance: float = Field(
        0.9, gt=0, le=1, description="Share of capability variance the entanglement basis covers."
    )


class SaberSettings(Section):
    """SABER's published defaults (Gemma-4-E4B release run); extraction comes from [probe]."""

    top_k: int = Field(14, ge=1, description="SABER: (layer, direction) pairs ablated per pass, best score first.")
    max_per_layer: int = Field(4, ge=1, description="SABER: at most this many directions per layer.")
    alpha: float = Field(0.825, ge=0, description="SABER: strength for directions that are not entangled.")
    alpha_entangled: float = Field(0.03, ge=0, description="SABER: strength for entangled directions.")
    entanglement_threshold: float = Field(
        0.55, ge=0, le=1, description="SABER: rho above which a direction is entangled."
    )
    passes: int = Field(4, ge=1, description="SABER: iterative passes, each re-probing the edited model.")
    decay: float = Field(0.7, gt=0, le=1, description="SABER: strength multiplier per further pass.")
    stop_separability: float = Field(
        0.01, ge=0, description="SABER: stop when the separability left on a pass's directions is below this."
    )
    band_lo: float = Field(0.2, ge=0, le=1, description="SABER: first layer considered, as a fraction of depth.")
    band_hi: float = Field(0.8, ge=0, le=1, description="SABER: last layer considered, as a fraction of depth.")
    scope: Literal[SABER_SCOPES] = Field(
        "local", description="SABER: local edits layer l's writers only; global edits every writer and the embedding."
    )
    components: Literal["both", "attention", "mlp"] = Field(
        "both", description="SABER: which writers every pass edits."
    )


class ArditiSettings(Section):
    arditi_max_kl: float = Field(0.1, gt=0, description="Arditi: first-token KL limit on harmless prompts.")
    prune_last: float = Field(0.2, ge=0, lt=1, description="Arditi: never choose a layer in this last share of depth.")
    arditi_positions: Literal["last", "post"] = Field("post", description="Arditi: candidate positions.")
    arditi_prompts: int = Field(32, ge=2, description="Arditi: held-out prompts per set for the selection passes.")
    arditi_screen: int = Field(
        8,
        ge=0,
        description="Arditi: harmful prompts every candidate is first scored on; only the best quarter is scored "
        "on all and checked (successive halving; 0: every candidate on all).",
    )


class KernelSettings(Section):
    layer: int | None = Field(None, description="Projected: the layer whose direction is removed (default: best FDR).")
    direction_index: float | None = Field(
        None, description="Kernel: fractional layer of the direction (default: best FDR)."
    )
    kernel_max: float = Field(1.0, ge=0, description="Kernel: peak strength.")
    kernel_position: float = Field(0.6, ge=0, le=1, description="Kernel: peak position, as a fraction of depth.")
    kernel_min: float = Field(0.5, ge=0, le=1, description="Kernel: strength at the edge, as a fraction of the peak.")
    kernel_width: float = Field(0.4, gt=0, le=1, description="Kernel: half-width, as a fraction of depth.")


class AblateSettings(Section):
    method: Literal[ABLATION_METHODS] = Field("saber", description="Ablation method.")
    norm_preserving: bool = Field(
        False,
        description="Keep each written column's and embedding row's norm after the projection (every method).",
    )
    saber: SaberSettings = Field(default_factory=SaberSettings)
    arditi: ArditiSettings = Field(default_factory=ArditiSettings)
    kernel: KernelSettings = Field(default_factory=KernelSettings)


def _names(v: str, allowed: tuple[str, ...], what: str) -> str:
    """A comma-separated list of known names, normalised; an unknown one names the choices."""
    names = [m.strip() for m in v.split(",") if m.strip()]
    bad = [m for m in names if m not in allowed]
    if not names or bad:
        raise ValueError(f"unknown {what} {bad or v!r}; use {', '.join(allowed)} (comma-separated)")
    return ",".join(names)


class SearchSettings(Section):
    trials: int = Field(50, ge=1, description="Finished trials the study should hold (resumes toward it).")
    storage: str | None = Field(None, description="Optuna RDB URL shared by workers (default: a journal in OUT).")
    study_name: str = Field("refusal-lab", description="Study name inside the storage.")
    sampler: Literal["tpe", "nsga2"] = Field("tpe", description="Optuna sampler: multivariate TPE or NSGA-II.")
    methods: str = Field("saber,kernel", description="Comma-separated ablation methods to search: saber, kernel.")
    probe_count: int = Field(48, ge=2, description="Prompts per set used for directions.")
    eval_count: int = Field(16, ge=1, description="Prompts per set in each trial's evaluation.")
    kl_prune: float = Field(2.0, gt=0, description="Prune a trial before generating when its KL exceeds this.")
    proxy: bool = Field(
        True,
        description="Score every trial (search) or attack setting (prove) without generating first; generate only "
        "where it may matter.",
    )
    proxy_margin: float = Field(
        0.1, ge=0, le=1, description="Share of evaluation prompts the refusal proxy may over-predict before it prunes."
    )
    proxy_learn: int = Field(
        3,
        ge=0,
        description="Trials measured with the proxy after which its margin is the largest over-prediction it made "
        "(never above --proxy-margin); 0 keeps the fixed margin.",
    )
    select_start: bool = Field(
        True,
        description="Begin a new study with the direction of an Arditi-style layer selection (one proxy pass per "
        "candidate layer) at full, three-quarter and half strength.",
    )
    search_norm_preserving: bool = Field(
        False,
        description="Let the sampler choose plain or norm-preserving edits per trial (a dimension of the space); "
        "off: every trial uses --norm-preserving's setting.",
    )
    sampler_seed: int = Field(0, description="Seed of the search's sampler.")
    max_new_tokens: int = Field(32, ge=1, description="Tokens generated per reply.")

    _known = field_validator("methods")(lambda v: _names(v, SEARCH_METHODS, "methods"))

    @property
    def method_list(self) -> tuple[str, ...]:
        return tuple(self.methods.split(","))


class EvalSettings(Section):
    max_new_tokens: int = Field(128, ge=1, description="Tokens generated per reply.")
    sample: bool = Field(False, description="Seeded sampling instead of greedy decoding.")
    sample_seed: int = Field(0, description="Seed for sampled replies.")
    escalation: str = Field("auto", description="Escalation set: auto | none | default | organism | a file or folder.")
    independent: bool = Field(False, description="Escalation levels as fresh conversations (default: stateful).")
    limit: int | None = Field(None, ge=1, description="Use only the first N prompts of each set.")
    prefill: str | None = Field(None, description="Replies to harmful, harmless and over-refusal prompts open with it.")
    endpoint: str | None = Field(
        None, description="OpenAI-compatible base URL (.../v1) that generates the MODELs' replies (llama.cpp, vLLM)."
    )
    endpoint_model: str | None = Field(None, description="The model's name at --endpoint (default: MODEL's name).")
    endpoint_key_env: str | None = Field(None, description="Environment variable holding the endpoint's API key.")
    judge_url: str | None = Field(None, description="OpenAI-compatible judge base URL (.../v1).")
    judge_model: str = Field("judge", description="Judge model name at the endpoint.")
    judge_key_env: str | None = Field(None, description="Environment variable holding the judge's API key.")
    judge_local: Path | None = Field(None, description="A local model folder to use as judge.")
    judge_workers: int = Field(4, ge=1, description="Concurrent judge requests.")
    judge_retries: int = Field(4, ge=0, description="Retries of a failed judge request (exponential backoff from 1 s).")
    lm_eval: str | None = Field(None, description="Comma-separated lm-evaluation-harness tasks run on every model.")
    lm_eval_include: Path | None = Field(None, description="A folder of lm-evaluation-harness task YAML files.")
    coherence_quantile: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Without a judge: a reply less likely under the base than this share of "
        "the base's own harmless replies is broken.",
    )


def _int_list(v: Any) -> Any:
    """'1,2,4' (a flag or an environment variable) as [1, 2, 4]; lists pass through."""
    return [int(x) for x in v.split(",") if x.strip()] if isinstance(v, str) else v


PROVE_ATTACKS = ("arditi", "saber", "adaptive", "subspace", "rdo", "search", "delta", "finetune", "prefill")


class ProveSettings(Section):
    budget_kl: float = Field(0.1, gt=0, description="Prove: first-token KL(model || attacked) an attack may cost.")
    report_kl: float = Field(0.5, gt=0, description="Prove: a looser budget reported beside --budget-kl.")
    attacks: str = Field(",".join(PROVE_ATTACKS), description="Prove: comma-separated attacks of the battery to run.")
    tuning_count: int = Field(16, ge=2, description="Prove: probe-split harmful prompts held back to tune attacks.")
    saber_scopes: str = Field(
        ",".join(SABER_SCOPES),
        description="Prove: SABER's edits tried, comma-separated: local (each layer's writers lose that layer's "
        "directions) and global (every writer and the embedding lose them all).",
    )
    phases: int = Field(8, ge=1, description="Prove: phases of the adaptive re-extraction attack.")
    subspace_ks: list[int] = Field(
        [1, 2, 4, 8], description="Prove: directions per layer tried by the subspace attack."
    )
    rdo_steps: int = Field(60, ge=1, description="Prove: optimisation steps of the gradient-optimised direction.")
    rdo_lr: float = Field(0.02, gt=0, description="Prove: learning rate of the gradient-optimised direction.")
    search_trials: int = Field(24, ge=1, description="Prove: trial budget of the search attack.")
    finetune_examples: list[int] = Field(
        [10, 100, 1000], description="Prove, the organism: compliant-template examples per fine-tuning row."
    )
    finetune_steps: int = Field(60, ge=1, description="Prove, the organism: most LoRA steps of a fine-tuning row.")
    finetune_benign: list[int] = Field(
        [32], description="Prove, other models: examples per benign fine-tuning row (the model's own harmless replies)."
    )
    finetune_attacked: list[int] = Field(
        [16], description="Prove, other models: examples per fine-tuning row on an attacked copy's compliant replies."
    )
    finetune_model_steps: int = Field(30, ge=1, description="Prove, other models: most LoRA steps per fine-tuning row.")
    finetune_every: int = Field(10, ge=1, description="Prove: LoRA steps between scorings of the tuning prompts.")
    finetune_lr: float = Field(2e-3, gt=0, description="Prove: AdamW learning rate of the fine-tuning attack's LoRA.")
    prefill_tokens: int = Field(4, ge=1, description="Prove: the prefill attack tries each opener's first 1..N tokens.")
    prefill_openers: str = Field(
        "Sure, here is", description="Prove: fixed openers of the prefill attack, '|'-separated (its own is added)."
    )
    seeds: list[int] = Field([0], description="Prove: seeds for the stochastic attacks (rdo, search, finetune).")
    max_new_tokens: int = Field(
        48, ge=1, description="Tokens generated per reply (every reply of a proof, the search attack's trials too)."
    )
    save_replies: bool = Field(
        False,
        description="Prove: write the worst case's held-out replies at --budget-kl, labelled as counted, to "
        "OUT/replies/MODEL.jsonl, and every other held-out measurement's to OUT/replies/MODEL/: to read, or to "
        "relabel with `refusal-lab label` (a finished proof may be resumed with it).",
    )

    _lists = field_validator(
        "subspace_ks", "finetune_examples", "finetune_benign", "finetune_attacked", "seeds", mode="before"
    )(_int_list)

    _known = field_validator("attacks")(lambda v: _names(v, PROVE_ATTACKS, "attacks"))
    _scopes = field_validator("saber_scopes")(lambda v: _names(v, SABER_SCOPES, "SABER scopes"))

    @property
    def attack_list(self) -> tuple[str, ...]:
        return tuple(self.attacks.split(","))

    @property
    def budgets(self) -> tuple[float, ...]:
        return tuple(sorted({self.budget_kl, self.report_kl}))


class HardenSettings(Section):
    spec: Path | None = Field(None, description="Harden: specification documents (a .md/.txt file or a folder).")
    data: Path | None = Field(None, description="Harden: alignment examples (JSONL messages; default: the organism's).")
    mix: Path | None = Field(None, description="Harden: category weights (TOML [weights] category = w).")
    stage1_tokens: int = Field(20000, ge=0, description="Harden: token budget of stage 1 (0 skips midtraining).")
    block_size: int = Field(128, ge=8, description="Harden: tokens per stage-1 block.")
    epochs: float = Field(2.0, gt=0, description="Harden: passes over the mixed alignment data in stage 2.")
    lr: float = Field(2e-4, gt=0, description="Harden: peak learning rate (LoRA).")
    train_batch_size: int = Field(8, ge=1, description="Examples per training step.")
    max_length: int = Field(512, ge=8, description="Harden: tokens kept per example.")
    targets_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Harden: dtype of a second copy that generates the on-policy targets (auto: the trained "
        "model itself); bfloat16 generates about 2x faster on CPUs with native bf16 while training stays in --dtype.",
    )
    lora_r: int = Field(64, ge=1, description="Harden: LoRA rank.")
    lora_alpha: float = Field(128.0, gt=0, description="Harden: LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Harden: LoRA dropout.")
    lora_targets: str = Field(
        "all", description="Harden: comma-separated module names to adapt, or 'all' (every linear map in the layers)."
    )
    quantize: Literal["none", "4bit"] = Field(
        "none", description="Harden: 4bit loads the base with bitsandbytes (QLoRA, CUDA)."
    )
    gradient_checkpointing: bool = Field(False, description="Harden: recompute activations to save memory.")
    retain: float = Field(1.0, ge=0, description="Harden: weight of the KL to the frozen base on harmless examples.")
    ablation_aware: bool = Field(True, description="Harden: ablate the current refusal subspace on harmful examples.")
    reestimate_every: int = Field(20, ge=1, description="Harden: steps between refusal-subspace estimates.")
    aware_directions: int = Field(4, ge=1, description="Harden: directions per layer in the estimated subspace.")
    aware_passes: int = Field(
        1, ge=1, description="Harden: estimation passes, each with the directions found so far removed."
    )
    full_ablation: float = Field(0.3, ge=0, le=1, description="Harden: share of ablated steps that ablate everything.")
    aware_harmless: bool = Field(
        True,
        description="Harden: ablate on harmless examples too, their helpful replies still asked for, so "
        "refusing whatever names a person is not how the model learns to refuse without its directions.",
    )
    invariance: float = Field(1.0, ge=0, description="Harden: weight of the output invariance to the ablation.")
    invariance_margin: float = Field(
        1.0, ge=0, description="Harden: the refusal's first token keeps log-prob above -this."
    )
    extended_refusals: bool = Field(
        False,
        description="Harden (experimental): train refusals that explain their reason "
        "(kept for the ablation study, bench/harden_ablation.py).",
        json_schema_extra={"panel": "Experimental"},
    )
    checkpoint_every: int = Field(50, ge=1, description="Harden: steps between resumable checkpoints.")
    harden_seed: int = Field(0, description="Harden: seed for data order, LoRA initialisation and ablation sampling.")


class ChatSettings(Section):
    max_new_tokens: int = Field(48, ge=1, description="Tokens generated per reply.")


class Settings(Section):
    """All options; built by load_settings from every layer."""

    cache_dir: Path = Field(
        default_factory=default_cache_dir, description="Where organisms, activations and judge answers are cached."
    )
    batch_size: int = Field(16, ge=1, description="Prompts per forward pass (first-token logits, captures).")
    generation_batch_size: int = Field(
        32,
        ge=1,
        description="Prompts whose replies are decoded together: decoding reads every weight once per token "
        "for the whole batch, so it gains from a larger batch than one forward pass does.",
    )
    model: ModelSettings = Field(default_factory=ModelSettings)
    organism: OrganismSettings = Field(default_factory=OrganismSettings)
    prompts: PromptSettings = Field(default_factory=PromptSettings)
    probe: ProbeSettings = Field(default_factory=ProbeSettings)
    ablate: AblateSettings = Field(default_factory=AblateSettings)
    search: SearchSettings = Field(default_factory=SearchSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    prove: ProveSettings = Field(default_factory=ProveSettings)
    harden: HardenSettings = Field(default_factory=HardenSettings)
    chat: ChatSettings = Field(default_factory=ChatSettings)

    @field_validator("cache_dir", mode="before")
    @classmethod
    def _expand_cache(cls, v: Any) -> Any:
        return Path(v).expanduser() if isinstance(v, str | Path) else v


def section_class(dotted: str) -> type[BaseModel]:
    """The model class of a section path such as 'ablate.saber' ('' is the root)."""
    cls: type[BaseModel] = Settings
    for part in filter(None, dotted.split(".")):
        cls = cls.model_fields[part].annotation  # type: ignore[assignment]
    return cls


def describe(dotted: str) -> str:
    """The one description of an option, e.g. describe('model.path')."""
    section, _, name = dotted.rpartition(".")
    return section_class(section).model_fields[name].description or ""
