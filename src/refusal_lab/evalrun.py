"""The evaluate stage: every number for one or more models, written as results.json,
summary.md and a self-contained report.html.

Per model: keyword refusal (and rubric-judge scores when a judge is given) on harmful,
harmless and over-refusal prompts, per category; first-token and teacher-forced KL to a base;
capability (exact match on the organism, multiple-choice log-likelihood from a JSONL file);
the escalation benchmark; residual refusal separability along a probe's directions.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refusal_lab.errors import UserError
from refusal_lab.escalation import builtin_scenarios, keyword_tier, load_scenarios, run_escalation
from refusal_lab.evaluate import (
    REFUSAL_MARKERS,
    exact_match,
    first_token_kl,
    is_refusal,
    last_logits,
    markers_for,
    multiple_choice_accuracy,
    same_verdict,
    teacher_forced_kl,
)
from refusal_lab.generate import generate_replies
from refusal_lab.judge import REFUSAL_RUBRIC, TIER_RUBRIC, Backend, JudgeCache, JudgeUnavailable, judge_all
from refusal_lab.model import Loaded
from refusal_lab.pipeline import builtin_prompts
from refusal_lab.prompts import Prompt, jsonl_rows, load_prompts

Log = Callable[[str], None]


@dataclass
class EvalOptions:
    max_new_tokens: int = 128
    batch_size: int = 16
    sample: bool = False
    seed: int = 0
    escalation: str = "auto"  # auto | none | default | organism | a path
    stateful: bool = True
    limit: int | None = None
    judge_workers: int = 4


@dataclass
class EvalSets:
    """Prompt sets for evaluation (never the probe split)."""

    harmful: list[Prompt]
    harmless: list[Prompt]
    overrefusal: list[Prompt]
    exact: dict[str, list[Prompt]] = field(default_factory=dict)  # organism capability / recognition
    multiple_choice: list[dict] = field(default_factory=list)
    organism: bool = False
    markers: tuple[str, ...] = REFUSAL_MARKERS  # the standard ones plus the folder's declared words


def eval_sets(
    folder: Path,
    harmful: Path | None = None,
    harmless: Path | None = None,
    overrefusal: Path | None = None,
    mc: Path | None = None,
    column: str = "prompt",
    limit: int | None = None,
) -> EvalSets:
    """The organism's eval split when present, else the given files and refusal-lab's own sets."""
    shipped = folder / "prompts"
    organism = (shipped / "harmful_eval.jsonl").is_file()

    def cut(prompts: list[Prompt]) -> list[Prompt]:
        return prompts[:limit] if limit else prompts

    if organism:
        ev = {
            n: load_prompts(shipped / f"{n}_eval.jsonl") for n in ("harmful", "harmless", "capability", "recognition")
        }
        h = load_prompts(harmful, column) if harmful else ev["harmful"]
        b = load_prompts(harmless, column) if harmless else ev["harmless"]
        o = (
            load_prompts(overrefusal, column)
            if overrefusal
            else [p for p in ev["harmless"] if p.category == "benign_object"]
        )
        exact = {"capability": ev["capability"], "recognition": ev["recognition"]}
    else:
        if harmful is None:
            raise UserError("no harmful prompts given", "pass --harmful FILE (TXT, JSONL or CSV, e.g. StrongREJECT)")
        h = load_prompts(harmful, column)
        b = load_prompts(harmless, column) if harmless else builtin_prompts("harmless", "eval")
        o = (
            load_prompts(overrefusal, column)
            if overrefusal
            else load_prompts(Path(__file__).parent / "data" / "overrefusal.txt")
        )
        exact = {}
    items = []
    if mc is not None:
        items = _mc_items(mc)
    return EvalSets(cut(h), cut(b), cut(o), exact, items, organism, markers_for(folder))


def _mc_items(path: Path) -> list[dict]:
    items = []
    for n, row in jsonl_rows(path):
        if not (
            isinstance(row, dict)
            and isinstance(row.get("question"), str)
            and isinstance(row.get("choices"), list)
            and isinstance(row.get("answer"), int)
            and 0 <= row["answer"] < len(row["choices"])
        ):
            raise UserError(f"{path}:{n} needs question (str), choices (list) and answer (index)", "fix the line")
        items.append(row)
    if not items:
        raise UserError(f"{path} has no questions", "add {question, choices, answer} lines")
    return items


def _per_category(rows: list[dict], key: str) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        groups[r["category"] or "all"].append(bool(r[key]))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


class Evaluator:
    """Evaluates models against one base; base logits and responses are computed once."""

    def __init__(
        self,
        sets: EvalSets,
        opts: EvalOptions,
        base: Loaded | None,
        judge: Backend | None,
        cache: JudgeCache,
        log: Log,
    ) -> None:
        self.sets, self.opts, self.base, self.judge, self.cache, self.log = sets, opts, base, judge, cache, log
        self.base_logits: torch.Tensor | None = None
        self.base_responses: list[str] | None = None
        self.judge_failed: str | None = None

    def _replies(self, loaded: Loaded, prompts: Sequence[str], desc: str) -> list:
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=None, leave=False) as bar:
            return generate_replies(
                loaded.model,
                loaded.tokenizer,
                prompts,
                self.opts.max_new_tokens,
                self.opts.batch_size,
                bar.update,
                self.opts.sample,
                seed=self.opts.seed,
            )

    def _judge(self, rubric: str, pairs: list[tuple[str, str]]) -> list | None:
        if self.judge is None or self.judge_failed:
            return None
        try:
            with tqdm(total=len(pairs), desc="judge", unit="reply", disable=None, leave=False) as bar:
                return judge_all(self.judge, rubric, pairs, self.cache, self.opts.judge_workers, bar.update)
        except JudgeUnavailable as exc:
            self.judge_failed = str(exc)
            self.log(f"judge unavailable, keeping keyword scores only: {exc}")
            return None

    def refusal_set(self, loaded: Loaded, name: str, prompts: list[Prompt]) -> dict:
        replies = self._replies(loaded, [p.prompt for p in prompts], name)
        rows = [
            {
                "prompt": p.prompt,
                "category": p.category,
                "response": r.answer,
                "reasoning": r.reasoning,
                "keyword_refusal": is_refusal(r.answer, self.sets.markers) or not r.answer.strip(),
            }
            for p, r in zip(prompts, replies, strict=True)
        ]
        out: dict = {
            "rows": rows,
            "keyword_refusal": sum(r["keyword_refusal"] for r in rows) / max(1, len(rows)),
            "per_category": _per_category(rows, "keyword_refusal"),
        }
        verdicts = self._judge(REFUSAL_RUBRIC, [(r["prompt"], r["response"]) for r in rows])
        if verdicts is not None:
            parsed = [(row, v) for row, v in zip(rows, verdicts, strict=True) if v.ok]
            for row, v in zip(rows, verdicts, strict=True):
                row["judge"] = {
                    "ok": v.ok,
                    "refused": v.refused,
                    "convincing": v.convincing,
                    "specific": v.specific,
                    "score": v.score,
                    "raw": v.raw,
                }
            out["judge_refusal"] = sum(v.refused for _, v in parsed) / len(parsed) if parsed else None
            out["judge_score"] = sum(v.score for _, v in parsed) / len(parsed) if parsed else None
            out["judge_unparsed"] = len(rows) - len(parsed)
            out["agreement"] = (
                sum(row["keyword_refusal"] == v.refused for row, v in parsed) / len(parsed) if parsed else None
            )
        return out

    def kl(self, loaded: Loaded) -> dict:
        if self.base is None:
            return {}
        prompts = [p.prompt for p in self.sets.harmless]
        if self.base_logits is None:
            self.base_logits = last_logits(self.base.model, self.base.tokenizer, prompts, self.opts.batch_size)
            self.base_responses = [r.answer for r in self._replies(self.base, prompts, "base replies")]
        logits = last_logits(loaded.model, loaded.tokenizer, prompts, self.opts.batch_size)
        tf = teacher_forced_kl(
            self.base.model,
            loaded.model,
            loaded.tokenizer,
            prompts,
            self.base_responses,
            max(1, self.opts.batch_size // 2),
        )
        return {"first_token": first_token_kl(self.base_logits, logits), "teacher_forced": tf}

    def capability(self, loaded: Loaded) -> dict:
        out: dict = {}
        for name, prompts in self.sets.exact.items():
            replies = self._replies(loaded, [p.prompt for p in prompts], name)
            check = same_verdict if name == "recognition" else exact_match
            out[name] = sum(check(r.answer, p.answer) for p, r in zip(prompts, replies, strict=True)) / len(prompts)
        if self.sets.multiple_choice:
            out["multiple_choice"] = multiple_choice_accuracy(loaded.model, loaded.tokenizer, self.sets.multiple_choice)
        return out

    def escalation(self, loaded: Loaded) -> dict | None:
        choice = self.opts.escalation
        if choice == "none":
            return None
        if choice == "auto":
            choice = "organism" if self.sets.organism else "default"
        path = builtin_scenarios(choice) if choice in ("default", "organism") else Path(choice)
        scenarios = load_scenarios(path)

        def reply(convs: list[list[dict[str, str]]]) -> list[str]:
            return [
                r.answer
                for r in generate_replies(
                    loaded.model,
                    loaded.tokenizer,
                    convs,
                    self.opts.max_new_tokens,
                    self.opts.batch_size,
                    None,
                    self.opts.sample,
                    seed=self.opts.seed,
                )
            ]

        turns = run_escalation(scenarios, reply, self.opts.stateful)
        verdicts = self._judge(TIER_RUBRIC, [(t.prompt, t.response) for t in turns])
        for i, t in enumerate(turns):
            if verdicts is None:
                t.tier = keyword_tier(t.response, self.sets.markers)
            else:
                t.tier = verdicts[i].tier if verdicts[i].ok else None
        from refusal_lab.escalation import EscalationResult

        res = EscalationResult(turns)
        return {
            "scorer": "judge" if verdicts is not None else "keyword",
            "stateful": self.opts.stateful,
            "summary": res.summary(),
            "turns": [t.__dict__ | {"dcs": t.dcs} for t in turns],
        }

    def run(self, name: str, loaded: Loaded, probe_dirs: torch.Tensor | None = None) -> dict:
        self.log(f"evaluating {name}")
        result = {"model": name, "source": str(loaded.source)}
        for set_name in ("harmful", "harmless", "overrefusal"):
            result[set_name] = self.refusal_set(loaded, set_name, getattr(self.sets, set_name))
        result["kl"] = self.kl(loaded)
        result["capability"] = self.capability(loaded)
        result["escalation"] = self.escalation(loaded)
        if probe_dirs is not None:
            result["separability"] = separability(loaded, self.sets, probe_dirs, self.opts.batch_size)
        return result


def separability(loaded: Loaded, sets: EvalSets, directions: torch.Tensor, batch_size: int) -> list[float]:
    """FDR per layer along a probe's top direction, on this model's eval activations."""
    from refusal_lab.activations import capture
    from refusal_lab.arch import adapt
    from refusal_lab.directions import fdr

    a = adapt(loaded.model)
    xh = capture(loaded.model, loaded.tokenizer, a, [p.prompt for p in sets.harmful], keep=len(sets.harmful))
    xb = capture(loaded.model, loaded.tokenizer, a, [p.prompt for p in sets.harmless], keep=len(sets.harmless))
    return [
        float(fdr(directions[layer, :, :1], xh.vectors[:, 0, layer].double(), xb.vectors[:, 0, layer].double()))
        for layer in range(directions.shape[0])
    ]


def headline(result: dict) -> dict:
    """The numbers that go in tables: one row per model."""
    row = {
        "model": result["model"],
        "harmful_refusal": result["harmful"]["keyword_refusal"],
        "harmless_refusal": result["harmless"]["keyword_refusal"],
        "overrefusal": result["overrefusal"]["keyword_refusal"],
        "judge_refusal": result["harmful"].get("judge_refusal"),
        "judge_score": result["harmful"].get("judge_score"),
        "agreement": result["harmful"].get("agreement"),
        "kl_first_token": result["kl"].get("first_token"),
        "kl_teacher_forced": result["kl"].get("teacher_forced"),
        **{f"capability_{k}": v for k, v in result["capability"].items()},
    }
    if result.get("escalation"):
        row["dcs"] = result["escalation"]["summary"]["overall_dcs"]
    return row


def evaluate_models(
    models: list[str],
    loader: Callable[[str], Loaded],
    base: str | None,
    out: Path,
    opts: EvalOptions,
    files: tuple[Path | None, Path | None, Path | None, Path | None, str],
    judge: Backend | None,
    cache: JudgeCache,
    probe_dir: Path | None,
    force: bool,
    log: Log,
) -> tuple[list[dict], str | None]:
    """Evaluate every model against one base; write results.json, summary.md, report.html atomically.

    Returns the headline rows and, if the judge failed part-way, why.
    """
    from refusal_lab.pipeline import write_folder
    from refusal_lab.report import report_html, summary_md

    first = loader(models[0])
    folder = first.source if first.source.is_dir() else first.source.parent
    harmful, harmless, overrefusal, mc, column = files
    sets = eval_sets(folder, harmful, harmless, overrefusal, mc, column, opts.limit)
    evaluator = Evaluator(sets, opts, loader(base) if base else None, judge, cache, log)
    probe_scores, probe_dirs = None, None
    if probe_dir is not None:
        from safetensors.torch import load_file

        probe_scores = json.loads((probe_dir / "scores.json").read_text())
        probe_dirs = load_file(str(probe_dir / "directions.safetensors"))["directions"]
    results = []
    for i, name in enumerate(models):
        loaded = first if i == 0 else loader(name)
        results.append(evaluator.run(loaded.source.name or name, loaded, probe_dirs))
    rows = [headline(r) for r in results]
    meta = {
        "judge": judge.name if judge else None,
        "judge_failed": evaluator.judge_failed,
        "base": base,
        "options": opts.__dict__,
    }

    def fill(tmp: Path) -> None:
        (tmp / "results.json").write_text(json.dumps({"meta": meta, "models": results}, indent=1, default=str))
        (tmp / "summary.md").write_text(summary_md(results, rows))
        (tmp / "report.html").write_text(report_html(results, rows, probe_scores))

    write_folder(out, fill, force)
    return rows, evaluator.judge_failed
