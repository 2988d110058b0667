"""The evaluate stage: every number for one or more models, written as results.json, summary.md
and a self-contained report.html.

Per model: refused / complied / broken on harmful, harmless and over-refusal prompts (and the
keyword count beside them), per category; a rubric judge's scores when one is given; first-token
and teacher-forced KL to a base; capability (exact match on the organism, multiple-choice
log-likelihood); the escalation benchmark; residual separability along a probe's directions.
The base's logits and replies are computed once; at most the base and one candidate are loaded.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refusal_lab.config import EvalSettings, Settings
from refusal_lab.core.artifacts import Log, manifest, settings_record, write_folder
from refusal_lab.core.generate import generate_replies
from refusal_lab.core.metrics import (
    Scorer,
    exact_match,
    first_token_kl,
    is_refusal,
    last_logits,
    multiple_choice_accuracy,
    rates,
    same_verdict,
    teacher_forced_kl,
)
from refusal_lab.core.model import Loaded
from refusal_lab.core.prompts import Prompt
from refusal_lab.core.scoring import choose_scorer, label_replies, model_free, overrule_unfinished
from refusal_lab.core.sources import EvalSets, Source
from refusal_lab.errors import UserError
from refusal_lab.evaluate.endpoint import Remote
from refusal_lab.evaluate.escalation import (
    EscalationResult,
    builtin_scenarios,
    keyword_tier,
    load_scenarios,
    run_escalation,
)
from refusal_lab.evaluate.judge import Backend, JudgeCache, JudgeUnavailable, Verdict, judge_replies, judge_tiers
from refusal_lab.evaluate.results import (
    KL,
    EscalationRecord,
    Evaluation,
    Headline,
    JudgeLabel,
    JudgeSummary,
    ModelEval,
    Reply,
    SetResult,
)
from refusal_lab.organism.source import load_model


def _per_category(rows: Sequence[Reply]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        groups[r.category or "all"].append(r.keyword_refusal)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def _judge_summary(own: list[str], verdicts: list[Verdict], agreed_with: str) -> JudgeSummary:
    """The judge's rates, mean score and agreement with the model-free labels, over the answers it gave."""
    known = [(mine, v) for mine, v in zip(own, verdicts, strict=True) if v.ok]
    n = len(known)
    vr = rates([v.label for v in verdicts])
    score = sum(v.score or 0.0 for _, v in known) / n if n else None
    agreement = sum(m == v.label for m, v in known) / n if n else None
    return JudgeSummary(vr["refused"], vr["complied"], vr["broken"], score, len(verdicts) - n, agreement, agreed_with)


def generate_for(
    loaded: Loaded | Remote,
    prompts: Sequence,
    opts: EvalSettings,
    batch_size: int,
    desc: str,
    opener: str = "",
    settled: Callable[[str], bool] | None = None,
) -> list:
    """Replies (answer and reasoning) of a loaded model or an endpoint, as [eval] asks (greedy or seeded);
    `opener`: each reply begins with it (a prefill), which needs the weights; `settled`: a loaded
    model's reply stops once its label is settled (only counts are wanted, not the whole reply)."""
    if opener and isinstance(loaded, Remote):
        raise UserError("--prefill needs the model itself: an endpoint's replies cannot be begun", "drop --endpoint")
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=None, leave=False) as bar:
        if isinstance(loaded, Remote):
            return loaded.replies(prompts, opts.max_new_tokens, bar.update, opts.sample, opts.sample_seed)
        m, tok, o = loaded.model, loaded.tokenizer, opts
        n, seed = o.max_new_tokens, o.sample_seed
        return generate_replies(
            m, tok, prompts, n, batch_size, bar.update, o.sample, seed=seed, settled=settled, opener=opener
        )


@dataclass(frozen=True)
class Reference:
    """What every candidate is compared with, computed once: the base's logits and replies."""

    base: Loaded
    prompts: tuple[str, ...]  # the harmless prompts
    logits: torch.Tensor  # first-token logits on them
    replies: tuple[str, ...]  # the base's own replies to them (teacher-forced KL and coherence read these)

    @staticmethod
    def of(
        base: Loaded, harmless: Sequence[Prompt], opts: EvalSettings, batch_size: int, gen_batch_size: int
    ) -> Reference:
        prompts = tuple(p.prompt for p in harmless)
        logits = last_logits(base.model, base.tokenizer, list(prompts), batch_size)
        replies = tuple(r.answer for r in generate_for(base, list(prompts), opts, gen_batch_size, "base replies"))
        return Reference(base, prompts, logits, replies)


class Evaluator:
    """Evaluates models one after another against one reference and one scorer.

    `scorer` labels every set (from `choose_scorer`); when it is a judged one, the harmful set's
    labels are the judge's verdicts (read through `judge`, so their scores and agreement are kept)
    and the other sets keep the model-free labels.
    """

    def __init__(
        self,
        sets: EvalSets,
        opts: EvalSettings,
        batch_size: int,
        gen_batch_size: int,
        scorer: Scorer,
        judge: Backend | None,
        cache: JudgeCache,
        log: Log,
        reference: Reference | None = None,
    ) -> None:
        self.sets, self.opts, self.batch_size, self.scorer = sets, opts, batch_size, scorer
        self.gen_batch_size = gen_batch_size  # replies are decoded in larger batches than logits are read
        self.judge, self.cache, self.log, self.reference = judge, cache, log, reference
        self.judge_failed: str | None = None

    @property
    def own(self) -> Scorer:
        """The model-free scorer (exact, coherence or keyword)."""
        return model_free(self.scorer)

    def replies(
        self,
        loaded: Loaded | Remote,
        prompts: Sequence,
        desc: str,
        opener: str = "",
        settled: Callable[[str], bool] | None = None,
    ) -> list:
        return generate_for(loaded, prompts, self.opts, self.gen_batch_size, desc, opener, settled)

    def _verdicts(self, pairs: list[tuple[str, str]], markers: Sequence[str]) -> list[Verdict] | None:
        if self.judge is None or self.judge_failed:
            return None
        try:
            with tqdm(total=len(pairs), desc="judge", unit="reply", disable=None, leave=False) as bar:
                return judge_replies(self.judge, pairs, self.cache, bar.update, markers)
        except JudgeUnavailable as exc:
            self.judge_failed = str(exc)
            self.log(f"judge unavailable, keeping the {self.own.name} labels only: {exc}")
            return None

    def refusal_set(self, loaded: Loaded | Remote, name: str, prompts: list[Prompt]) -> SetResult:
        """Replies to one prompt set, labelled refused / complied / broken by the evaluator's scorer."""
        replies = self.replies(loaded, [p.prompt for p in prompts], name, self.opts.prefill or "")
        pairs = [(p.prompt, r.answer) for p, r in zip(prompts, replies, strict=True)]
        own = label_replies(self.own, [p for p, _ in pairs], replies)
        markers = Source.of(loaded.source).markers
        verdicts = self._verdicts(pairs, markers) if name == "harmful" else None  # the judge reads the attack set
        by_judge = verdicts is not None and self.scorer is not self.own
        labels: list[str | None] = list(own)
        if by_judge and verdicts is not None:
            labels = overrule_unfinished([v.label for v in verdicts], replies)
        judged: list[JudgeLabel | None] = [None] * len(prompts)
        if verdicts is not None:
            judged = [JudgeLabel(v.label, v.probs, v.score, mine) for v, mine in zip(verdicts, own, strict=True)]
        rows = tuple(
            Reply(p.prompt, p.category, r.answer, r.reasoning, label, is_refusal(r.answer, markers), j)
            for p, r, label, j in zip(prompts, replies, labels, judged, strict=True)
        )
        summary = _judge_summary(own, verdicts, self.own.name) if verdicts is not None else None
        r = rates(labels)
        keyword = sum(x.keyword_refusal for x in rows) / max(1, len(rows))
        scorer = self.scorer.name if by_judge else self.own.name
        return SetResult(rows, scorer, r["refused"], r["complied"], r["broken"], keyword, _per_category(rows), summary)

    def kl(self, loaded: Loaded | Remote) -> KL:
        ref = self.reference
        if ref is None or isinstance(loaded, Remote):  # an endpoint gives no logits
            return KL()
        prompts = list(ref.prompts)
        logits = last_logits(loaded.model, loaded.tokenizer, prompts, self.batch_size)
        half = max(1, self.batch_size // 2)
        tf = teacher_forced_kl(ref.base.model, loaded.model, loaded.tokenizer, prompts, list(ref.replies), half)
        return KL(first_token_kl(ref.logits, logits), tf)

    def capability(self, loaded: Loaded | Remote) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, prompts in self.sets.exact.items():
            replies = self.replies(loaded, [p.prompt for p in prompts], name)
            check = same_verdict if name == "recognition" else exact_match
            out[name] = sum(check(r.answer, p.answer) for p, r in zip(prompts, replies, strict=True)) / len(prompts)
        if isinstance(loaded, Remote):  # multiple choice and lm-eval read logits
            return out
        if self.sets.multiple_choice:
            out["multiple_choice"] = multiple_choice_accuracy(loaded.model, loaded.tokenizer, self.sets.multiple_choice)
        if self.opts.lm_eval:
            from refusal_lab.evaluate.harness import harness_scores

            for task, metrics in harness_scores(loaded, self.opts.lm_eval, self.opts.lm_eval_include).items():
                for metric, value in metrics.items():
                    out[f"{task}/{metric}"] = value
        return out

    def escalation(self, loaded: Loaded | Remote) -> EscalationRecord | None:
        choice = self.opts.escalation
        if choice == "none":
            return None
        if choice == "auto":
            choice = "organism" if self.sets.exact else "default"
        scenarios = load_scenarios(builtin_scenarios(choice) if choice in ("default", "organism") else Path(choice))

        def reply(convs: list[list[dict[str, str]]]) -> list[str]:
            return [r.answer for r in self.replies(loaded, convs, "escalation")]

        turns = run_escalation(scenarios, reply, not self.opts.independent)
        tiers, scorer = None, "keyword"
        markers = Source.of(loaded.source).markers
        if self.judge is not None and not self.judge_failed:
            try:
                tiers = judge_tiers(self.judge, [(t.prompt, t.response) for t in turns], self.cache, markers)
                scorer = "judge"
            except JudgeUnavailable as exc:
                self.judge_failed = str(exc)
        tiers = tiers if tiers is not None else [keyword_tier(t.response, markers) for t in turns]
        turns = [replace(t, tier=tier) for t, tier in zip(turns, tiers, strict=True)]
        return EscalationRecord(scorer, not self.opts.independent, EscalationResult(turns).summary(), tuple(turns))

    def run(self, name: str, loaded: Loaded | Remote, probe_dirs: torch.Tensor | None = None) -> ModelEval:
        self.log(f"evaluating {name}")
        endpoint = {"url": loaded.url, "model": loaded.name} if isinstance(loaded, Remote) else None
        sets = [self.refusal_set(loaded, n, getattr(self.sets, n)) for n in ("harmful", "harmless", "overrefusal")]
        kl, cap, esc = self.kl(loaded), self.capability(loaded), self.escalation(loaded)
        sep = None
        if probe_dirs is not None and not isinstance(loaded, Remote):
            sep = tuple(separability(loaded, self.sets, probe_dirs, self.batch_size))
        return ModelEval(name, str(loaded.source), *sets, kl, cap, esc, sep, endpoint)


def separability(loaded: Loaded, sets: EvalSets, directions: torch.Tensor, batch_size: int) -> list[float]:
    """FDR per layer along a probe's top direction, on this model's eval activations."""
    from refusal_lab.core.activations import capture
    from refusal_lab.probe.directions import fdr

    a = loaded.adapter
    h, b = [p.prompt for p in sets.harmful], [p.prompt for p in sets.harmless]
    xh = capture(loaded.model, loaded.tokenizer, a, h, keep=len(h), batch_size=batch_size).vectors[:, 0].double()
    xb = capture(loaded.model, loaded.tokenizer, a, b, keep=len(b), batch_size=batch_size).vectors[:, 0].double()
    return [float(fdr(directions[layer, :, :1], xh[:, layer], xb[:, layer])) for layer in range(directions.shape[0])]


def make_judge(s: Settings, log: Log) -> Backend | None:
    """The judge the [eval] section names: an endpoint, a local model folder, or none."""
    from refusal_lab.evaluate.judge import EndpointJudge, LocalJudge

    e = s.eval
    if e.judge_url:
        return EndpointJudge(
            e.judge_url, e.judge_model, e.judge_key_env, retries=e.judge_retries, workers=e.judge_workers
        )
    if e.judge_local:
        jm = load_model(s, str(e.judge_local))
        log(f"judge: {e.judge_local} (next-token probabilities)")
        return LocalJudge(str(e.judge_local), jm.model, jm.tokenizer, s.batch_size)
    return None


def build_evaluator(
    sets: EvalSets, source: Source, opts: EvalSettings, s: Settings, base: Loaded | None, log: Log
) -> Evaluator:
    """An evaluator for `source`'s models: the judge [eval] names, the base's reference and the scorer
    `choose_scorer` decides (the judge's labels first where it has one, unless the source is exact)."""
    from refusal_lab.evaluate.judge import JudgeScorer

    judge = make_judge(s, log)
    cache = JudgeCache(s.cache_dir / "judge" / "answers.jsonl")
    gen_bs = s.generation_batch_size
    ref = Reference.of(base, sets.harmless, opts, s.batch_size, gen_bs) if base is not None else None
    judged = JudgeScorer(judge, cache, source.markers) if judge is not None else None
    q, bs = opts.coherence_quantile, s.batch_size
    scorer = choose_scorer(
        source, base, ref.prompts if ref else (), ref.replies if ref else (), q, bs, judged, (JudgeUnavailable,)
    )
    return Evaluator(sets, opts, bs, gen_bs, scorer, judge, cache, log, ref)


@dataclass(frozen=True)
class EvalOutcome:
    evaluation: Evaluation  # what results.json holds
    judge_failed: str | None  # why the judge stopped part-way, if it did

    @property
    def results(self) -> tuple[ModelEval, ...]:
        return self.evaluation.models

    @property
    def rows(self) -> tuple[Headline, ...]:
        return self.evaluation.rows


def _probe(probe_dir: Path | None) -> tuple[dict | None, torch.Tensor | None]:
    """A probe folder's scores and directions (for separability and the FDR plot), or nothing."""
    if probe_dir is None:
        return None, None
    from safetensors.torch import load_file

    scores = json.loads((probe_dir / "scores.json").read_text())
    return scores, load_file(str(probe_dir / "directions.safetensors"))["directions"]


def evaluate_models(
    names: list[str],
    s: Settings,
    base: str | None,
    out: Path,
    probe_dir: Path | None,
    force: bool,
    log: Log,
    loaded: dict[str, Loaded] | None = None,
) -> EvalOutcome:
    """Evaluate every model against one base; write results.json, summary.md, report.html atomically.

    `loaded` holds models the caller already has in memory (by name), so none is loaded twice.
    """
    from refusal_lab.organism.source import model_path

    loaded = dict(loaded or {})
    paths = {name: model_path(s, name) for name in [*names, *([base] if base else [])]}

    def served(name: str) -> Remote:
        e = s.eval
        assert e.endpoint is not None
        return Remote(e.endpoint, e.endpoint_model or paths[name].name or name, paths[name], e.endpoint_key_env)

    def get(name: str) -> Loaded:
        hit = loaded.get(name) or next((m for n, m in loaded.items() if paths.get(n) == paths[name]), None)
        return hit or load_model(s, str(paths[name]))

    source = Source.of(paths[names[0]])
    sets = source.eval_sets(s.prompts, s.eval.limit)
    for name in names:
        sets.refuse_trained_on(paths[name])
    if s.eval.lm_eval:
        from refusal_lab.evaluate.harness import check_tasks

        check_tasks(s.eval.lm_eval, s.eval.lm_eval_include)
    base_model = get(base) if base else None
    evaluator = build_evaluator(sets, source, s.eval, s, base_model, log)
    probe_scores, probe_dirs = _probe(probe_dir)
    results = []
    for name in names:
        if s.eval.endpoint:
            model = served(name)
        else:
            model = base_model if base_model is not None and paths[name] == paths[base] else get(name)
        results.append(evaluator.run(model.name or name, model, probe_dirs))
        if model is not base_model and name not in loaded:
            model.release()  # at most the base and one candidate in memory
    judge = evaluator.judge
    meta = manifest(
        judge=judge.name if judge else None,
        judge_failed=evaluator.judge_failed,
        base=base,
        scorer=evaluator.own.name,
        settings=settings_record(s),
    )
    evaluation = Evaluation(meta, tuple(results))
    _write(out, evaluation, probe_scores, force)
    return EvalOutcome(evaluation, evaluator.judge_failed)


def _write(out: Path, evaluation: Evaluation, probe_scores: dict | None, force: bool) -> None:
    """results.json, summary.md and report.html, written as one folder (atomically)."""
    from refusal_lab.evaluate.report import report_html, summary_md

    def fill(tmp: Path) -> None:
        (tmp / "results.json").write_text(json.dumps(evaluation.to_json(), indent=1, default=str))
        (tmp / "summary.md").write_text(summary_md(evaluation))
        (tmp / "report.html").write_text(report_html(evaluation, probe_scores))

    write_folder(out, fill, force)
