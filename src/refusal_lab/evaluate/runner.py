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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refusal_lab.config import EvalSettings, Settings
from refusal_lab.core.artifacts import Log, manifest, settings_record, write_folder
from refusal_lab.core.generate import generate_replies
from refusal_lab.core.model import Loaded
from refusal_lab.core.prompts import Prompt
from refusal_lab.core.sources import EvalSets, Source, load_model
from refusal_lab.evaluate.coherence import CoherenceScorer
from refusal_lab.evaluate.endpoint import Remote
from refusal_lab.evaluate.escalation import (
    EscalationResult,
    builtin_scenarios,
    keyword_tier,
    load_scenarios,
    run_escalation,
)
from refusal_lab.evaluate.judge import Backend, JudgeCache, JudgeUnavailable, Verdict, judge_replies, judge_tiers
from refusal_lab.evaluate.metrics import (
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


def _per_category(rows: list[dict], key: str) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        groups[r["category"] or "all"].append(bool(r[key]))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


@dataclass
class Reference:
    """What every candidate is compared with, computed once: the base's logits and replies."""

    base: Loaded
    logits: torch.Tensor  # first-token logits on the harmless prompts
    replies: list[str]  # the base's own replies to them (teacher-forced KL reads these)


class Evaluator:
    """Evaluates models one after another against one reference and one scorer."""

    def __init__(
        self,
        sets: EvalSets,
        opts: EvalSettings,
        batch_size: int,
        scorer: Scorer,
        judge: Backend | None,
        cache: JudgeCache,
        log: Log,
    ) -> None:
        self.sets, self.opts, self.batch_size, self.scorer = sets, opts, batch_size, scorer
        self.judge, self.cache, self.log = judge, cache, log
        self.reference: Reference | None = None
        self.judge_failed: str | None = None

    def replies(self, loaded: Loaded | Remote, prompts: Sequence, desc: str) -> list:
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=None, leave=False) as bar:
            if isinstance(loaded, Remote):
                o = self.opts
                return loaded.replies(prompts, o.max_new_tokens, bar.update, o.sample, o.sample_seed)
            return generate_replies(
                loaded.model,
                loaded.tokenizer,
                prompts,
                self.opts.max_new_tokens,
                self.batch_size,
                bar.update,
                self.opts.sample,
                seed=self.opts.sample_seed,
            )

    def set_reference(self, base: Loaded) -> None:
        prompts = [p.prompt for p in self.sets.harmless]
        logits = last_logits(base.model, base.tokenizer, prompts, self.batch_size)
        self.reference = Reference(base, logits, [r.answer for r in self.replies(base, prompts, "base replies")])

    def coherence(self, markers: tuple[str, ...]) -> CoherenceScorer:
        """A coherence scorer calibrated on the reference's own replies to the harmless prompts."""
        ref = self.reference
        assert ref is not None
        prompts = [p.prompt for p in self.sets.harmless]
        m, tok, q, bs = ref.base.model, ref.base.tokenizer, self.opts.coherence_quantile, self.batch_size
        return CoherenceScorer.calibrated(m, tok, prompts, ref.replies, q, markers, bs)

    def _verdicts(self, pairs: list[tuple[str, str]]) -> list[Verdict] | None:
        if self.judge is None or self.judge_failed:
            return None
        try:
            with tqdm(total=len(pairs), desc="judge", unit="reply", disable=None, leave=False) as bar:
                return judge_replies(self.judge, pairs, self.cache, bar.update)
        except JudgeUnavailable as exc:
            self.judge_failed = str(exc)
            self.log(f"judge unavailable, keeping the {self.scorer.name} labels only: {exc}")
            return None

    def refusal_set(self, loaded: Loaded | Remote, name: str, prompts: list[Prompt]) -> dict:
        """Replies to one prompt set, labelled refused / complied / broken.

        The labels come from the exact scorer on an organism, else from the judge when there is one
        (the model-free scorer stands in if it fails), else from coherence or keywords.
        """
        replies = self.replies(loaded, [p.prompt for p in prompts], name)
        pairs = [(p.prompt, r.answer) for p, r in zip(prompts, replies, strict=True)]
        own = self.scorer.labels([p for p, _ in pairs], [a for _, a in pairs])
        verdicts = self._verdicts(pairs) if name == "harmful" else None  # the judge reads the attack set
        by_judge = verdicts is not None and self.scorer.name != "exact"
        labels = [v.label for v in verdicts] if by_judge else own
        markers = Source.of(loaded.source).markers
        rows = [
            {
                "prompt": p.prompt,
                "category": p.category,
                "response": r.answer,
                "reasoning": r.reasoning,
                "label": label,
                "keyword_refusal": is_refusal(r.answer, markers),
            }
            for p, r, label in zip(prompts, replies, labels, strict=True)
        ]
        out: dict = {
            "rows": rows,
            "scorer": f"judge ({self.judge.name})" if by_judge else self.scorer.name,
            **rates(labels),
            "keyword_refusal": sum(r["keyword_refusal"] for r in rows) / max(1, len(rows)),
            "per_category": _per_category(rows, "keyword_refusal"),
        }
        if verdicts is not None:
            for row, mine, v in zip(rows, own, verdicts, strict=True):
                row["judge"] = {"label": v.label, "probs": v.probs, "score": v.score, self.scorer.name: mine}
            known = [(mine, v) for mine, v in zip(own, verdicts, strict=True) if v.ok]
            n = len(known)
            out["judge"] = {
                **rates([v.label for v in verdicts]),
                "score": sum(v.score for _, v in known) / n if n else None,
                "unparsed": len(rows) - n,
                f"agreement_with_{self.scorer.name}": sum(m == v.label for m, v in known) / n if n else None,
            }
        return out

    def kl(self, loaded: Loaded | Remote) -> dict:
        ref = self.reference
        if ref is None or isinstance(loaded, Remote):  # an endpoint gives no logits
            return {}
        prompts = [p.prompt for p in self.sets.harmless]
        logits = last_logits(loaded.model, loaded.tokenizer, prompts, self.batch_size)
        half = max(1, self.batch_size // 2)
        tf = teacher_forced_kl(ref.base.model, loaded.model, loaded.tokenizer, prompts, ref.replies, half)
        return {"first_token": first_token_kl(ref.logits, logits), "teacher_forced": tf}

    def capability(self, loaded: Loaded | Remote) -> dict:
        out: dict = {}
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

    def escalation(self, loaded: Loaded | Remote) -> dict | None:
        choice = self.opts.escalation
        if choice == "none":
            return None
        if choice == "auto":
            choice = "organism" if self.sets.exact else "default"
        scenarios = load_scenarios(builtin_scenarios(choice) if choice in ("default", "organism") else Path(choice))

        def reply(convs: list[list[dict[str, str]]]) -> list[str]:
            return [r.answer for r in self.replies(loaded, convs, "escalation")]

        turns = run_escalation(scenarios, reply, not self.opts.independent)
        tiers = None
        if self.judge is not None and not self.judge_failed:
            try:
                tiers = judge_tiers(self.judge, [(t.prompt, t.response) for t in turns], self.cache)
            except JudgeUnavailable as exc:
                self.judge_failed = str(exc)
        markers = Source.of(loaded.source).markers
        for i, t in enumerate(turns):
            t.tier = tiers[i] if tiers is not None else keyword_tier(t.response, markers)
        return {
            "scorer": "judge" if tiers is not None else "keyword",
            "stateful": not self.opts.independent,
            "summary": EscalationResult(turns).summary(),
            "turns": [t.__dict__ | {"dcs": t.dcs} for t in turns],
        }

    def run(self, name: str, loaded: Loaded | Remote, probe_dirs: torch.Tensor | None = None) -> dict:
        self.log(f"evaluating {name}")
        result = {"model": name, "source": str(loaded.source)}
        if isinstance(loaded, Remote):
            result["endpoint"] = {"url": loaded.url, "model": loaded.name}
        for set_name in ("harmful", "harmless", "overrefusal"):
            result[set_name] = self.refusal_set(loaded, set_name, getattr(self.sets, set_name))
        result["kl"] = self.kl(loaded)
        result["capability"] = self.capability(loaded)
        result["escalation"] = self.escalation(loaded)
        if probe_dirs is not None and not isinstance(loaded, Remote):
            result["separability"] = separability(loaded, self.sets, probe_dirs, self.batch_size)
        return result


def separability(loaded: Loaded, sets: EvalSets, directions: torch.Tensor, batch_size: int) -> list[float]:
    """FDR per layer along a probe's top direction, on this model's eval activations."""
    from refusal_lab.core.activations import capture
    from refusal_lab.probe.directions import fdr

    a = loaded.adapter
    h, b = [p.prompt for p in sets.harmful], [p.prompt for p in sets.harmless]
    xh = capture(loaded.model, loaded.tokenizer, a, h, keep=len(h), batch_size=batch_size).vectors[:, 0].double()
    xb = capture(loaded.model, loaded.tokenizer, a, b, keep=len(b), batch_size=batch_size).vectors[:, 0].double()
    return [float(fdr(directions[layer, :, :1], xh[:, layer], xb[:, layer])) for layer in range(directions.shape[0])]


def headline(result: dict) -> dict:
    """The numbers that go in tables: one row per model."""
    row = {
        "model": result["model"],
        "harmful_refused": result["harmful"]["refused"],
        "harmful_complied": result["harmful"]["complied"],
        "harmful_broken": result["harmful"]["broken"],
        "harmful_keyword": result["harmful"]["keyword_refusal"],
        "harmless_refused": result["harmless"]["refused"],
        "overrefusal": result["overrefusal"]["refused"],
        "judge_refused": (result["harmful"].get("judge") or {}).get("refused"),
        "judge_score": (result["harmful"].get("judge") or {}).get("score"),
        "kl_first_token": result["kl"].get("first_token"),
        "kl_teacher_forced": result["kl"].get("teacher_forced"),
        **{f"capability_{k}": v for k, v in result["capability"].items()},
    }
    if result.get("escalation"):
        row["dcs"] = result["escalation"]["summary"]["overall_dcs"]
    return row


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


@dataclass
class EvalOutcome:
    results: list[dict]  # per model, everything (results.json's "models")
    rows: list[dict]  # per model, the headline numbers
    judge_failed: str | None  # why the judge stopped part-way, if it did


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
    from refusal_lab.core.sources import model_path
    from refusal_lab.evaluate.report import report_html, summary_md

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
    if s.eval.lm_eval:
        from refusal_lab.evaluate.harness import check_tasks

        check_tasks(s.eval.lm_eval, s.eval.lm_eval_include)
    judge = make_judge(s, log)
    cache = JudgeCache(s.cache_dir / "judge" / "answers.jsonl")
    evaluator = Evaluator(sets, s.eval, s.batch_size, source.scorer(), judge, cache, log)
    base_model = get(base) if base else None
    if base_model is not None:
        evaluator.set_reference(base_model)
        if evaluator.scorer.name == "keyword":  # a base makes broken replies visible
            evaluator.scorer = evaluator.coherence(source.markers)
    probe_scores = probe_dirs = None
    if probe_dir is not None:
        from safetensors.torch import load_file

        probe_scores = json.loads((probe_dir / "scores.json").read_text())
        probe_dirs = load_file(str(probe_dir / "directions.safetensors"))["directions"]
    results = []
    for name in names:
        if s.eval.endpoint:
            model = served(name)
        else:
            model = base_model if base_model is not None and paths[name] == paths[base] else get(name)
        results.append(evaluator.run(model.source.name or name, model, probe_dirs))
        if model is not base_model and name not in loaded:
            model.release()  # at most the base and one candidate in memory
    rows = [headline(r) for r in results]
    meta = manifest(
        judge=judge.name if judge else None,
        judge_failed=evaluator.judge_failed,
        base=base,
        scorer=evaluator.scorer.name,
        settings=settings_record(s),
    )

    def fill(tmp: Path) -> None:
        (tmp / "results.json").write_text(json.dumps({"meta": meta, "models": results}, indent=1, default=str))
        (tmp / "summary.md").write_text(summary_md(results, rows))
        (tmp / "report.html").write_text(report_html(results, rows, probe_scores))

    write_folder(out, fill, force)
    return EvalOutcome(results, rows, evaluator.judge_failed)
