"""The `refusal-lab` command: a thin layer over the library. Heavy imports happen inside commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from refusal_lab import __version__
from refusal_lab.config import OrganismSettings, Settings, describe, load_settings
from refusal_lab.errors import UserError

if TYPE_CHECKING:
    from refusal_lab.model import Loaded

app = typer.Typer(
    name="refusal-lab",
    help="Find, attack, harden and measure the safety behaviour of open-weight chat models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
organism_app = typer.Typer(help="Build and inspect the embedded default model organism.", no_args_is_help=True)
app.add_typer(organism_app, name="organism")

# Options shared by commands that load a model; help text comes from config.py (documented once).
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="TOML config file (default ./refusal-lab.toml).")]  # noqa: UP045
DtypeOpt = Annotated[Optional[str], typer.Option(help=describe("dtype"))]  # noqa: UP045
DeviceOpt = Annotated[Optional[str], typer.Option(help=describe("device"))]  # noqa: UP045
TrustOpt = Annotated[Optional[bool], typer.Option("--trust-remote-code", help=describe("trust_remote_code"))]  # noqa: UP045
TemplateOpt = Annotated[Optional[Path], typer.Option("--chat-template", help=describe("chat_template"))]  # noqa: UP045
UnverifiedOpt = Annotated[
    Optional[bool],  # noqa: UP045
    typer.Option("--allow-unverified-arch", help=describe("allow_unverified_arch")),
]
BatchOpt = Annotated[Optional[int], typer.Option(help=describe("batch_size"))]  # noqa: UP045
TokensOpt = Annotated[Optional[int], typer.Option(help=describe("max_new_tokens"))]  # noqa: UP045


def _quiet() -> None:
    """Keep transformers' own warnings out of user-facing output unless --debug."""
    if "--debug" not in sys.argv:
        import warnings

        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        warnings.filterwarnings("ignore")


def _organism_path(s: Settings) -> Path:
    from refusal_lab.organism.build import default_organism, from_settings

    cfg = from_settings(**s.organism.model_dump())
    return default_organism(s.cache_dir, cfg, log=lambda m: typer.echo(m, err=True))


def _load(s: Settings) -> Loaded:
    from refusal_lab.model import load

    _quiet()
    path = _organism_path(s) if s.model == "organism" else Path(s.model)
    return load(path, s.dtype, s.device, s.trust_remote_code, s.chat_template, s.allow_unverified_arch)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """refusal-lab: probe, ablate, evaluate, search, harden and prove refusal behaviour."""
    if version:
        typer.echo(__version__)
        raise typer.Exit()


@app.command()
def info(
    model: Annotated[str, typer.Argument(help=describe("model"))] = "organism",
    config: ConfigOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    trust_remote_code: TrustOpt = None,
    chat_template: TemplateOpt = None,
    allow_unverified_arch: UnverifiedOpt = None,
) -> None:
    """Load a model and show where its residual stream is written (the architecture adapter)."""
    from refusal_lab.arch import adapt

    s = load_settings(
        config,
        model=model,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        chat_template=chat_template,
        allow_unverified_arch=allow_unverified_arch,
    )
    loaded = _load(s)
    a = adapt(loaded.model, s.allow_unverified_arch)
    p = next(loaded.model.parameters())
    typer.echo(f"model       {loaded.source}{' (' + loaded.gguf_file + ')' if loaded.gguf_file else ''}")
    typer.echo(
        f"family      {a.family}   layers {a.num_layers}   hidden {a.hidden_size}   dtype {p.dtype}   device {p.device}"
    )
    typer.echo(f"parameters  {sum(x.numel() for x in loaded.model.parameters()):,}")
    typer.echo(f"embedding   {tuple(a.embedding.weight.shape)}  tied to unembedding: {a.tied_embeddings}")
    typer.echo(f"final norm  {type(a.final_norm).__name__}")
    for lw in a.writers[:1] + a.writers[-1:]:
        for w in lw.all:
            post = f"  (post-norm {type(w.post_norm).__name__})" if w.post_norm is not None else ""
            bias = "  +bias" if w.bias is not None else ""
            typer.echo(f"writer      {w.name:<32} {tuple(w.weight.shape)}{bias}{post}")
    typer.echo(f"chat template: {'yes' if loaded.tokenizer.chat_template else 'no'}")


@app.command()
def chat(
    prompts: Annotated[list[str], typer.Argument(help="User messages; each gets its own single-turn reply.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help=describe("model"))] = None,  # noqa: UP045
    config: ConfigOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    trust_remote_code: TrustOpt = None,
    chat_template: TemplateOpt = None,
    max_new_tokens: TokensOpt = None,
    batch_size: BatchOpt = None,
) -> None:
    """Greedy replies from a model to one or more prompts (batched, chat template applied)."""
    from refusal_lab.generate import generate

    s = load_settings(
        config,
        model=model,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        chat_template=chat_template,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    loaded = _load(s)
    replies = generate(loaded.model, loaded.tokenizer, prompts, s.max_new_tokens, s.batch_size)
    for prompt, reply in zip(prompts, replies, strict=True):
        typer.echo(f"user:      {prompt}\nassistant: {reply}\n")


HarmfulOpt = Annotated[
    Path | None,
    typer.Option("--harmful", help="Harmful prompts (TXT/JSONL/CSV); default: the organism's probe set."),
]
HarmlessOpt = Annotated[Optional[Path], typer.Option("--harmless", help="Harmless prompts (TXT/JSONL/CSV).")]  # noqa: UP045
CapabilityOpt = Annotated[
    Path | None, typer.Option("--capability", help="Capability prompts, for entanglement scores.")
]
ColumnOpt = Annotated[str, typer.Option(help="Prompt column in JSONL/CSV files.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (must be new or empty).")]


def _model_for(s: Settings) -> Settings:
    """Resolve 'organism' to its folder once, so its shipped prompt sets can be found."""
    return s.model_copy(update={"model": str(_organism_path(s))}) if s.model == "organism" else s


@app.command()
def probe(
    model: Annotated[str, typer.Argument(help=describe("model"))] = "organism",
    out: OutOpt = Path("probe-out"),
    harmful: HarmfulOpt = None,
    harmless: HarmlessOpt = None,
    capability: CapabilityOpt = None,
    column: ColumnOpt = "prompt",
    method: Annotated[str, typer.Option(help="dom | projected | svd | svd_paired | lda | whitened_svd")] = "svd",
    directions_per_layer: Annotated[int, typer.Option(help="Directions extracted per layer.")] = 4,
    positions: Annotated[str, typer.Option(help="last | post (every post-instruction token) | mean")] = "last",
    biproject: Annotated[bool, typer.Option(help="Make directions orthogonal to the harmless mean.")] = True,
    config: ConfigOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = None,
) -> None:
    """Extract refusal directions at every layer and score them (FDR, entanglement); write them to OUT."""
    from refusal_lab.activations import fingerprint
    from refusal_lab.pipeline import ProbeOptions, prompt_sets_for, run_probe, write_probe

    s = _model_for(load_settings(config, model=model, dtype=dtype, device=device, batch_size=batch_size))
    loaded = _load(s)
    sets = prompt_sets_for(Path(s.model), harmful, harmless, capability, column)
    opts = ProbeOptions(method, directions_per_layer, positions, biproject, batch_size=s.batch_size)
    fp = fingerprint(loaded.model)
    result = run_probe(loaded, sets, opts, s.cache_dir / "activations", lambda m: typer.echo(m, err=True), fp)
    meta = {
        "tool": "refusal-lab",
        "version": __version__,
        "model": s.model,
        "fingerprint": fp,
        "options": opts.__dict__,
        "prompts": {k: len(getattr(sets, k)) for k in ("harmful", "harmless", "capability")},
    }
    write_probe(out, result, meta)
    summ = result.summary()
    typer.echo(
        f"wrote {out}: best layer {summ['best_layer']}, top direction carries {summ['top_direction_share']:.0%} "
        f"of separability, top layer {summ['top_layer_share']:.0%}"
    )


@app.command()
def ablate(
    model: Annotated[str, typer.Argument(help=describe("model"))] = "organism",
    out: OutOpt = Path("ablated"),
    method: Annotated[str, typer.Option(help="saber | arditi | projected | kernel")] = "saber",
    probe_dir: Annotated[
        Path | None, typer.Option("--probe", help="Reuse a probe folder made from this model.")
    ] = None,
    harmful: HarmfulOpt = None,
    harmless: HarmlessOpt = None,
    capability: CapabilityOpt = None,
    column: ColumnOpt = "prompt",
    extraction: Annotated[str, typer.Option(help="SABER: direction method (see probe --method).")] = "svd",
    directions_per_layer: Annotated[int, typer.Option(help="SABER: directions per layer.")] = 4,
    top_k: Annotated[int, typer.Option(help="SABER: global top-k (layer, direction) pairs per pass.")] = 14,
    alpha: Annotated[float, typer.Option(help="SABER: strength for clean directions.")] = 0.825,
    alpha_entangled: Annotated[float, typer.Option(help="SABER: strength for entangled directions.")] = 0.03,
    entanglement_threshold: Annotated[
        float, typer.Option(help="SABER: rho above which a direction is entangled.")
    ] = 0.55,
    passes: Annotated[int, typer.Option(help="SABER: maximum passes.")] = 4,
    biproject: Annotated[bool, typer.Option(help="Directions orthogonal to the harmless mean.")] = True,
    scope: Annotated[str, typer.Option(help="SABER: local (each layer its own directions) or global.")] = "local",
    saber_positions: Annotated[
        str, typer.Option(help="SABER: positions each pass probes, last or post (every post-instruction token).")
    ] = "last",
    max_kl: Annotated[float, typer.Option(help="Arditi: first-token KL limit on harmless prompts.")] = 0.1,
    arditi_positions: Annotated[str, typer.Option(help="Arditi: candidate positions, post or last.")] = "post",
    arditi_prompts: Annotated[int, typer.Option(help="Arditi: prompts per set for the selection passes.")] = 32,
    layer: Annotated[int | None, typer.Option(help="projected: source layer (default: best FDR in the band).")] = None,
    direction_index: Annotated[Optional[float], typer.Option(help="kernel: fractional layer of the direction.")] = None,  # noqa: UP045
    kernel_max: Annotated[float, typer.Option(help="kernel: peak strength.")] = 1.0,
    kernel_position: Annotated[float, typer.Option(help="kernel: peak position (fraction of depth).")] = 0.6,
    kernel_min: Annotated[float, typer.Option(help="kernel: strength at the edge, as a fraction of the peak.")] = 0.5,
    kernel_width: Annotated[float, typer.Option(help="kernel: half-width (fraction of depth).")] = 0.4,
    norm_preserving: Annotated[bool, typer.Option(help="Keep each written column's norm after projecting.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it is not empty.")] = False,
    config: ConfigOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = None,
) -> None:
    """Remove refusal directions from the weights and save an ordinary model folder to OUT."""
    from refusal_lab.ablate import AblateOptions, run_ablate

    if method not in ("saber", "arditi", "projected", "kernel"):
        raise UserError(f"unknown method {method!r}", "use saber, arditi, projected or kernel")
    s = _model_for(load_settings(config, model=model, dtype=dtype, device=device, batch_size=batch_size))
    opts = AblateOptions(
        method=method,
        extraction=extraction,
        directions_per_layer=directions_per_layer,
        top_k=top_k,
        alpha=alpha,
        alpha_entangled=alpha_entangled,
        entanglement_threshold=entanglement_threshold,
        passes=passes,
        biproject=biproject,
        scope=scope,
        saber_positions=saber_positions,
        max_kl=max_kl,
        arditi_positions=arditi_positions,
        arditi_prompts=arditi_prompts,
        layer=layer,
        direction_index=direction_index,
        kernel_max=kernel_max,
        kernel_position=kernel_position,
        kernel_min=kernel_min,
        kernel_width=kernel_width,
        norm_preserving=norm_preserving,
    )
    loaded = _load(s)
    run_ablate(
        loaded,
        s,
        opts,
        out,
        probe_dir,
        (harmful, harmless, capability, column),
        force,
        lambda m: typer.echo(m, err=True),
    )
    typer.echo(f"wrote {out}")


def _organism_overrides(**values: object) -> dict[str, object]:
    return {f"organism.{k}": v for k, v in values.items()}


@organism_app.command("build")
def organism_build(
    out: Annotated[Path, typer.Argument(help="Folder to write the model to (created; never merged into).")],
    config: ConfigOpt = None,
    seed: Annotated[Optional[int], typer.Option(help=describe("seed", OrganismSettings))] = None,  # noqa: UP045
    steps: Annotated[Optional[int], typer.Option(help=describe("steps", OrganismSettings))] = None,  # noqa: UP045
    think: Annotated[Optional[bool], typer.Option("--think", help=describe("think", OrganismSettings))] = None,  # noqa: UP045
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it holds something else.")] = False,
) -> None:
    """Train the organism from scratch and save it as a Hugging Face folder (reused if already built)."""
    from refusal_lab.organism.build import build, from_settings

    _quiet()
    s = load_settings(config, **_organism_overrides(seed=seed, steps=steps, think=think))
    build(out, from_settings(**s.organism.model_dump()), force=force, log=lambda m: typer.echo(m, err=True))
    typer.echo(str(out))


@organism_app.command("eval")
def organism_eval(
    models: Annotated[list[str] | None, typer.Argument(help="Organism folders (with prompts/), or 'organism'.")] = None,
    base: Annotated[Optional[str], typer.Option(help="Reference model for first-token KL on harmless prompts.")] = None,  # noqa: UP045
    config: ConfigOpt = None,
    samples: Annotated[int, typer.Option(help="Sample conversations to show per prompt set (one model).")] = 2,
) -> None:
    """Behaviour table of organisms (or edits of one) on their held-out evaluation prompts."""
    from dataclasses import replace

    from refusal_lab.evaluate import first_token_kl, last_logits
    from refusal_lab.organism.build import organism_behaviour, prompt_sets
    from refusal_lab.report import behaviour_table, sample_lines

    def loaded_for(name: str) -> Loaded:
        return _load(_model_for(load_settings(config, model=name)))

    base_logits = None
    if base is not None:
        ref = loaded_for(base)
        harmless = [p.prompt for p in prompt_sets(ref.source, "eval")["harmless"]]
        base_logits = last_logits(ref.model, ref.tokenizer, harmless)
    rows, convs = {}, {}
    for name in models or ["organism"]:
        loaded = loaded_for(name)
        table, convs = organism_behaviour(loaded.model, loaded.tokenizer, loaded.source)
        if base_logits is not None:
            logits = last_logits(loaded.model, loaded.tokenizer, [prompt for prompt, _ in convs["harmless"]])
            table = replace(table, kl=first_token_kl(base_logits, logits))
        rows[loaded.source.name] = table
    typer.echo(behaviour_table(rows))
    if len(rows) == 1:
        typer.echo(sample_lines(convs, samples))


@app.command()
def search(
    model: Annotated[str, typer.Argument(help=describe("model"))] = "organism",
    out: OutOpt = Path("search-out"),
    trials: Annotated[int, typer.Option(help="Finished trials the study should hold (resumes toward it).")] = 50,
    storage: Annotated[
        str | None, typer.Option(help="Optuna RDB URL shared by workers (default: a journal file in OUT).")
    ] = None,
    study_name: Annotated[str, typer.Option(help="Study name inside the storage.")] = "refusal-lab",
    sampler: Annotated[str, typer.Option(help="tpe (multivariate) or nsga2.")] = "tpe",
    methods: Annotated[str, typer.Option(help="Comma-separated: saber, kernel.")] = "saber,kernel",
    harmful: HarmfulOpt = None,
    harmless: HarmlessOpt = None,
    column: ColumnOpt = "prompt",
    probe_prompts: Annotated[int, typer.Option(help="Prompts per set for directions.")] = 48,
    eval_prompts: Annotated[int, typer.Option(help="Prompts per set for each trial's evaluation.")] = 16,
    kl_prune: Annotated[float, typer.Option(help="Prune a trial before generating when KL exceeds this.")] = 2.0,
    seed: Annotated[int, typer.Option(help="Sampler seed.")] = 0,
    pick: Annotated[bool, typer.Option("--pick", help="Export a trial of the front instead of searching.")] = False,
    max_kl: Annotated[Optional[float], typer.Option(help="--pick: fewest refusals with KL at most this.")] = None,  # noqa: UP045
    max_refusal: Annotated[float | None, typer.Option(help="--pick: least KL with at most this many refusals.")] = None,
    export_to: Annotated[Optional[Path], typer.Option("--export", help="--pick: model folder to write.")] = None,  # noqa: UP045
    config: ConfigOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Tokens per reply in trials (default 32).")] = None,  # noqa: UP045
) -> None:
    """Multi-objective Optuna search over ablation settings (refusals vs KL), resumable and shareable."""
    from refusal_lab import search as S
    from refusal_lab.activations import fingerprint
    from refusal_lab.pipeline import export, reproduce_command

    s = _model_for(load_settings(config, model=model, dtype=dtype, device=device, batch_size=batch_size))
    loaded = _load(s)
    folder = Path(s.model) if Path(s.model).is_dir() else Path(s.model).parent
    probe_sets, eval_h, eval_b = S.split_prompts(folder, harmful, harmless, column, probe_prompts, eval_prompts)
    say = lambda m: typer.echo(m, err=True)  # noqa: E731
    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    if not chosen or set(chosen) - {"saber", "kernel"}:
        raise UserError(f"unknown search methods {methods!r}", "use saber, kernel or saber,kernel")
    fp = fingerprint(loaded.model)
    setup = S.build_setup(
        loaded,
        probe_sets,
        eval_h,
        eval_b,
        s.cache_dir / "activations",
        s.batch_size,
        max_new_tokens or 32,
        chosen,
        say,
        fp,
    )
    study = S.open_study(S.storage_for(storage, out), study_name, S.study_meta(fp, setup), sampler, seed)
    if pick:
        if export_to is None:
            raise UserError("--pick needs --export OUT", "say where to write the chosen model")
        trial = S.pick(study, max_kl, max_refusal)
        say(f"picked trial {trial.number}: refusals {trial.values[0]:.0f}, KL {trial.values[1]:.4f}, {trial.params}")
        ablations = S.ablations_for(trial.params, setup)
        record = {
            "method": f"search:{trial.params['method']}",
            "options": trial.params,
            "source_fingerprint": fp,
            "chosen": {
                "trial": trial.number,
                "refusals": trial.values[0],
                "kl": trial.values[1],
                "study": study_name,
                "storage": storage or str(out / "study.journal"),
            },
            "directions_file": "ablation.safetensors",
            "reproduce": reproduce_command(),
        }
        export(loaded, setup.adapter, ablations, export_to, record)
        typer.echo(f"wrote {export_to}")
        return
    S.run_trials(study, setup, trials, kl_prune, say)
    typer.echo(S.front_table(study))
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.svg").write_text(S.front_svg(study))
    (out / "pareto.json").write_text(
        json.dumps(
            [
                {"trial": t.number, "refusals": t.values[0], "kl": t.values[1], "params": t.params}
                for t in S.pareto(study)
            ],
            indent=1,
        )
    )
    typer.echo(f"wrote {out}/pareto.json and pareto.svg; export one with --pick --max-kl X --export OUT")


@app.command("eval")
def eval_cmd(
    models: Annotated[list[str], typer.Argument(help="Models to evaluate (folders, .gguf files or 'organism').")],
    out: OutOpt = Path("eval-out"),
    base: Annotated[Optional[str], typer.Option(help="Base model for KL (first token and teacher-forced).")] = None,  # noqa: UP045
    harmful: HarmfulOpt = None,
    harmless: HarmlessOpt = None,
    overrefusal: Annotated[Optional[Path], typer.Option(help="Benign prompts that look dangerous.")] = None,  # noqa: UP045
    mc: Annotated[Optional[Path], typer.Option(help="Multiple-choice JSONL {question, choices, answer}.")] = None,  # noqa: UP045
    column: ColumnOpt = "prompt",
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N prompts of each set.")] = None,  # noqa: UP045
    judge_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible judge base URL (…/v1).")] = None,  # noqa: UP045
    judge_model: Annotated[str, typer.Option(help="Judge model name at the endpoint.")] = "judge",
    judge_key_env: Annotated[Optional[str], typer.Option(help="Environment variable with the judge API key.")] = None,  # noqa: UP045
    judge_local: Annotated[Optional[Path], typer.Option(help="A local model folder to use as judge.")] = None,  # noqa: UP045
    judge_workers: Annotated[int, typer.Option(help="Concurrent judge requests.")] = 4,
    escalation: Annotated[
        str, typer.Option(help="auto | none | default | organism | a scenario file or folder")
    ] = "auto",
    independent: Annotated[
        bool, typer.Option("--independent", help="Escalation levels as fresh conversations.")
    ] = False,
    probe_dir: Annotated[Path | None, typer.Option("--probe", help="Probe folder: FDR plot and separability.")] = None,
    sample: Annotated[bool, typer.Option("--sample", help="Seeded sampling instead of greedy decoding.")] = False,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it is not empty.")] = False,
    config: ConfigOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    batch_size: BatchOpt = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Tokens per reply (default 128 here).")] = None,  # noqa: UP045
) -> None:
    """Refusal (keyword, judge), over-refusal, KL, capability, escalation: results.json, summary.md, report.html."""
    from refusal_lab.evalrun import EvalOptions

    s = load_settings(config, dtype=dtype, device=device, batch_size=batch_size)
    opts = EvalOptions(
        max_new_tokens or 128, s.batch_size, sample, seed, escalation, not independent, limit, judge_workers
    )
    code = _evaluate(
        s,
        models,
        base,
        out,
        opts,
        (harmful, harmless, overrefusal, mc, column),
        (judge_url, judge_model, judge_key_env, judge_local),
        probe_dir,
        force,
    )
    raise typer.Exit(code)


def _evaluate(
    s: Settings,
    models: list[str],
    base: str | None,
    out: Path,
    opts: object,
    files: tuple,
    judge_spec: tuple,
    probe_dir: Path | None,
    force: bool,
) -> int:
    """Run the evaluate stage; exit code 3 when the judge failed part-way (keyword results kept)."""
    from refusal_lab.evalrun import evaluate_models
    from refusal_lab.generate import generate
    from refusal_lab.judge import EndpointJudge, JudgeCache, LocalJudge
    from refusal_lab.report import headline_table

    url, judge_model, key_env, local = judge_spec
    judge = None
    if url:
        judge = EndpointJudge(url, judge_model, key_env)
    elif local:
        jm = _load(s.model_copy(update={"model": str(local)}))
        judge = LocalJudge(str(local), lambda ps: generate(jm.model, jm.tokenizer, ps, 48, s.batch_size))
    rows, failed = evaluate_models(
        models,
        lambda name: _load(_model_for(s.model_copy(update={"model": name}))),
        base,
        out,
        opts,
        files,
        judge,
        JudgeCache(s.cache_dir / "judge" / "answers.jsonl"),
        probe_dir,
        force,
        lambda m: typer.echo(m, err=True),
    )
    typer.echo(headline_table(rows))
    typer.echo(f"wrote {out}/results.json, summary.md, report.html")
    if failed:
        typer.echo(f"refusal-lab: judge failed, keyword scores only: {failed}", err=True)
        return 3
    return 0


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's outputs.")] = Path("demo-out"),
    config: ConfigOpt = None,
) -> None:
    """The whole attack loop on the organism: build, probe, ablate (SABER, Arditi), evaluate, report."""
    from refusal_lab.ablate import AblateOptions, run_ablate
    from refusal_lab.activations import fingerprint
    from refusal_lab.evalrun import EvalOptions
    from refusal_lab.pipeline import ProbeOptions, prompt_sets_for, run_probe, write_probe

    s = _model_for(load_settings(config, model="organism"))
    say = lambda m: typer.echo(m, err=True)  # noqa: E731
    out.mkdir(parents=True, exist_ok=True)
    loaded = _load(s)
    sets = prompt_sets_for(Path(s.model))
    say("[1/4] probe")
    opts = ProbeOptions(batch_size=s.batch_size)
    fp = fingerprint(loaded.model)
    probe_result = run_probe(loaded, sets, opts, s.cache_dir / "activations", say, fp)
    write_probe(
        out / "probe",
        probe_result,
        {"tool": "refusal-lab", "version": __version__, "model": s.model, "fingerprint": fp},
        force=True,
    )
    for method in ("saber", "arditi"):
        say(f"[{2 if method == 'saber' else 3}/4] ablate --method {method}")
        run_ablate(
            _load(s),
            s,
            AblateOptions(method=method),
            out / f"organism-{method}",
            out / "probe" if method == "saber" else None,
            (None, None, None, "prompt"),
            True,
            say,
        )
    say("[4/4] evaluate")
    code = _evaluate(
        s,
        [s.model, str(out / "organism-saber"), str(out / "organism-arditi")],
        s.model,
        out / "eval",
        EvalOptions(max_new_tokens=40, batch_size=64),
        (None, None, None, None, "prompt"),
        (None, "judge", None, None),
        out / "probe",
        True,
    )
    results = json.loads((out / "eval" / "results.json").read_text())["models"]
    for r in results:  # a few sample conversations per model
        typer.echo(f"\n[{r['model']}]")
        for row in r["harmful"]["rows"][:1] + r["harmless"]["rows"][:1]:
            typer.echo(f"  user:      {row['prompt']}\n  assistant: {row['response']}")
    typer.echo(f"\nopen {out / 'eval' / 'report.html'}")
    raise typer.Exit(code)


def main() -> None:
    """Entry point: user errors become one line and exit code 2 (full traceback with --debug)."""
    try:
        app()
    except UserError as exc:
        if "--debug" in sys.argv:
            raise
        typer.echo(f"refusal-lab: error: {exc.problem} (fix: {exc.fix})", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("refusal-lab: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
