"""Label replies that came from anywhere (another tool, an API model, a server log) with refusal-lab's scorer.

The same scorer code as eval, search and prove (`core.scoring.choose_scorer`): keywords alone, coherence
against a base model's own replies, or a judge first. Rows that carry a human `reading` are compared
with the labels: agreement per label and a confusion matrix. A judge that stops answering keeps the
labels made so far (written, exit 3), so a rerun reads the rest from the judge's cache.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from refusal_lab.config import Settings
from refusal_lab.core.artifacts import Log, check_output, manifest, settings_record, write_folder, write_replay
from refusal_lab.core.coherence import CoherenceScorer, repetition
from refusal_lab.core.metrics import LABELS, REFUSAL_MARKERS, KeywordScorer, Scorer, is_deflection, is_refusal
from refusal_lab.core.model import Loaded
from refusal_lab.core.prompts import jsonl_rows, load_prompts
from refusal_lab.core.sources import Source, builtin_prompts
from refusal_lab.core.stats import Rate
from refusal_lab.errors import UserError
from refusal_lab.evaluate.judge import JudgeScorer
from refusal_lab.organism.source import load_model

Errors = tuple[type[Exception], ...]  # the exceptions that mean a judge stopped answering
CHUNK = 32  # rows labelled between two writes of progress: what a judge outage can lose at most


@dataclass(frozen=True)
class ReplyRow:
    """One input line: the request, the reply, optionally its reasoning and a human reading."""

    line: int
    prompt: str
    response: str
    reasoning: str = ""
    reading: str | None = None
    row: dict[str, Any] = field(default_factory=dict)  # the line as given, written back with the label


def read_replies(path: Path) -> list[ReplyRow]:
    """Every line checked before any work: a bad line is named with its number, nothing is written."""
    if not path.is_file():
        raise UserError(f"{path} does not exist", "pass a JSONL file with one {prompt, response} object per line")
    rows = []
    for n, row in jsonl_rows(path):
        where = f"{path}:{n}"
        if not isinstance(row, dict):
            raise UserError(f"{where} is not a JSON object", 'write {"prompt": ..., "response": ...} on each line')
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                raise UserError(f"{where} has no {key} string", f'add "{key}": "..." to that line')
        reading = row.get("reading")
        if reading is not None and reading not in LABELS:
            raise UserError(f"{where}: reading {reading!r} is not one of {', '.join(LABELS)}", "fix that line")
        reasoning = row.get("reasoning") or ""
        if not isinstance(reasoning, str):
            raise UserError(f"{where}: reasoning is not a string", "write the reasoning as one string or leave it out")
        rows.append(ReplyRow(n, row["prompt"], row["response"], reasoning, reading, row))
    if not rows:
        raise UserError(f"{path} holds no replies", "write one JSON object per line")
    return rows


def reply_files(path: Path) -> list[Path]:
    """A replies file, or every .jsonl file of a folder (prove --save-replies writes OUT/replies/MODEL/)."""
    if not path.is_dir():
        return [path]
    files = sorted(path.glob("*.jsonl"))
    if not files:
        raise UserError(
            f"{path} holds no .jsonl files", "pass a replies file, or a folder of them (prove's OUT/replies/MODEL/)"
        )
    return files


@dataclass(frozen=True)
class Scores:
    """What a label rests on: a refusal marker, a moralising deflection, repetition, and the base's
    likelihood where one was used."""

    marker: bool
    deflection: bool
    repetition: float
    likelihood: float | None = None
    threshold: float | None = None


def scored(
    scorer: Scorer, markers: Sequence[str], prompts: list[str], replies: list[str]
) -> tuple[list[str], list[Scores]]:
    """Labels and the evidence behind them; coherence's likelihoods come from the pass that labelled."""
    lik: list[float | None] = [None] * len(replies)
    threshold = None
    if isinstance(scorer, CoherenceScorer):
        labels, lik = scorer.labels_and_likelihoods(prompts, replies)
        threshold = scorer.threshold
    else:
        labels = scorer.labels(prompts, replies)
    evidence = [
        Scores(is_refusal(r, markers), is_deflection(r), repetition(r), x, threshold)
        for r, x in zip(replies, lik, strict=True)
    ]
    return labels, evidence


@dataclass(frozen=True)
class Agreement:
    """Labels against a human reading: overall, refused-or-not, per reading (recall), and the confusion matrix."""

    n: int
    overall: float
    refused_or_not: float
    per_reading: dict[str, float | None]
    confusion: dict[str, dict[str, int]]  # reading -> label -> count

    @staticmethod
    def of(readings: Sequence[str], labels: Sequence[str]) -> Agreement | None:
        pairs = list(zip(readings, labels, strict=True))
        if not pairs:
            return None
        confusion = {r: {lab: 0 for lab in LABELS} for r in LABELS}
        for r, lab in pairs:
            confusion[r][lab] += 1
        per = {
            r: (confusion[r][r] / sum(confusion[r].values()) if sum(confusion[r].values()) else None) for r in LABELS
        }
        overall = sum(r == lab for r, lab in pairs) / len(pairs)
        binary = sum((r == "refused") == (lab == "refused") for r, lab in pairs) / len(pairs)
        return Agreement(len(pairs), overall, binary, per, confusion)


@dataclass(frozen=True)
class LabelSummary:
    """Rates with Wilson intervals, and agreement with the rows' readings where they have one."""

    scorer: str
    n: int
    of: int  # rows in the input (more than n when a judge stopped part-way)
    rates: dict[str, Rate]
    agreement: Agreement | None
    judge_failed: str | None = None
    judge_unparsed: int | None = None  # judge answers that named no option (labelled broken); None: no judge

    @staticmethod
    def of_labels(
        scorer: Scorer, rows: Sequence[ReplyRow], labels: Sequence[str], total: int, failed: str | None = None
    ) -> LabelSummary:
        rates = {lab: Rate(sum(x == lab for x in labels), len(labels)) for lab in LABELS}
        read = [(r.reading, lab) for r, lab in zip(rows, labels, strict=False) if r.reading]
        agreement = Agreement.of([r for r, _ in read], [lab for _, lab in read])
        unparsed = scorer.unparsed if isinstance(scorer, JudgeScorer) else None
        return LabelSummary(scorer.name, len(labels), total, rates, agreement, failed, unparsed)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    def markdown(self) -> str:
        out = [f"# Labels ({self.scorer})", "", f"{self.n} of {self.of} replies labelled.", ""]
        if self.judge_failed:
            out += [f"The judge stopped answering: {self.judge_failed}", ""]
        if self.judge_unparsed:
            out += [f"Judge answers that named no option (labelled broken): {self.judge_unparsed}", ""]
        out += ["| label | count | rate | Wilson 95% |", "|---|---|---|---|"]
        for lab, r in self.rates.items():
            out.append(f"| {lab} | {r.k} | {100 * r.rate:.1f}% | {r.interval} |")
        a = self.agreement
        if a is not None:
            out += ["", f"Agreement with the reading on {a.n} rows: {100 * a.overall:.1f}% "
                    f"(refused or not: {100 * a.refused_or_not:.1f}%).", ""]  # fmt: skip
            out += ["| reading \\ label | " + " | ".join(LABELS) + " | agrees |", "|---" * (len(LABELS) + 2) + "|"]
            for r in LABELS:
                share = a.per_reading[r]
                cells = " | ".join(str(a.confusion[r][lab]) for lab in LABELS)
                out.append(f"| {r} | {cells} | {'-' if share is None else f'{100 * share:.1f}%'} |")
        return "\n".join(out) + "\n"


@dataclass(frozen=True)
class Labels:
    """What `label` made: one summary per replies file, in order (a folder of files gives several)."""

    files: tuple[tuple[str, LabelSummary], ...]  # (file name, its summary)

    @property
    def failed(self) -> LabelSummary | None:
        """The summary of the file where the judge stopped, if it did (later files were not labelled)."""
        return next((s for _, s in self.files if s.judge_failed), None)

    def markdown(self) -> str:
        """The one file's summary; for several, a row per file (rates, Wilson intervals, agreement)."""
        if len(self.files) == 1:
            return self.files[0][1].markdown()
        out = [f"# Labels ({self.files[0][1].scorer})", ""]
        out += ["| replies | n | refused | complied | broken | agreement (refused or not) |", "|---" * 6 + "|"]
        for name, s in self.files:
            cells = [f"{r.k} ({100 * r.rate:.1f}%, {r.interval})" for r in s.rates.values()]
            a = s.agreement
            agrees = "-" if a is None else f"{100 * a.overall:.1f}% ({100 * a.refused_or_not:.1f}%) of {a.n}"
            out.append(f"| {name} | {s.n} of {s.of} | " + " | ".join(cells) + f" | {agrees} |")
        if (stopped := self.failed) is not None:
            out += ["", f"The judge stopped answering ({stopped.judge_failed}); later files were not labelled."]
        return "\n".join(out) + "\n"


@dataclass(frozen=True)
class Labelled:
    rows: list[ReplyRow]
    labels: list[str]
    scores: list[Scores]
    failed: str | None  # why the judge stopped, if it did (rows after it are left unlabelled)


def label_rows(
    rows: Sequence[ReplyRow],
    scorer: Scorer,
    markers: Sequence[str],
    errors: Errors = (),
    progress: Any = None,
) -> Labelled:
    """Label in chunks; an exception in `errors` (a judge outage) stops there and keeps what was labelled."""
    labels: list[str] = []
    scores: list[Scores] = []
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        prompts, replies = [r.prompt for r in chunk], [r.response for r in chunk]
        try:
            got, evidence = scored(scorer, markers, prompts, replies)
        except errors as exc:
            return Labelled(list(rows[: len(labels)]), labels, scores, str(exc))
        labels += got
        scores += evidence
        if progress is not None:
            progress(len(chunk))
    return Labelled(list(rows), labels, scores, None)


def write_labels(out: Path, done: Labelled, summary: LabelSummary) -> None:
    """labels.jsonl (each input row, in order, with its label and scores), summary.json and summary.md."""
    with (out / "labels.jsonl").open("w", encoding="utf-8") as f:
        for row, lab, sc in zip(done.rows, done.labels, done.scores, strict=True):
            f.write(json.dumps({**row.row, "label": lab, "scores": asdict(sc)}) + "\n")
    (out / "summary.json").write_text(summary.to_json(), encoding="utf-8")
    (out / "summary.md").write_text(summary.markdown(), encoding="utf-8")


def base_scorer(loaded: Loaded, s: Settings) -> Scorer:
    """The model-free scorer eval uses for copies of `loaded` (`choose_scorer`): exact where the folder
    declares its templates, else coherence calibrated on the base's own replies to the harmless prompts."""
    from refusal_lab.core.scoring import choose_scorer
    from refusal_lab.evaluate.runner import Reference

    source = Source.of(loaded.source)
    own = source.scorer()
    if own.name == "exact":
        return own  # the base's reference replies would go unread
    given = load_prompts(s.prompts.harmless, s.prompts.column) if s.prompts.harmless else None
    harmless = given or builtin_prompts("harmless", "eval")
    ref = Reference.of(loaded, harmless, s.eval, s.batch_size, s.generation_batch_size)
    return choose_scorer(source, loaded, ref.prompts, ref.replies, s.eval.coherence_quantile, s.batch_size)


def label_scorer(s: Settings, base: str | None, log: Log) -> tuple[Scorer, tuple[str, ...], Errors]:
    """The scorer eval would use for copies of `base` (keywords without one), the judge first where [eval] names
    one; with the refusal markers it reads and the exceptions that mean the judge stopped answering."""
    from refusal_lab.evaluate.judge import JudgeCache, JudgeUnavailable
    from refusal_lab.evaluate.runner import make_judge

    if base is None:
        free: Scorer = KeywordScorer(REFUSAL_MARKERS)
        markers = REFUSAL_MARKERS
    else:
        loaded = load_model(s, base)
        free, markers = base_scorer(loaded, s), Source.of(loaded.source).markers
    judge = make_judge(s, log)
    if judge is None or free.name == "exact":
        return free, markers, ()
    cache = JudgeCache(s.cache_dir / "judge" / "answers.jsonl")
    return JudgeScorer(judge, cache, tuple(markers)), markers, (JudgeUnavailable,)


def run_label(path: Path, s: Settings, base: str | None, out: Path, force: bool, log: Log) -> Labels:
    """`refusal-lab label`: read and check every row of every file, label them, write OUT atomically (also
    after a judge outage). A folder of replies files (prove's OUT/replies/MODEL/) is labelled file by
    file with one scorer: OUT/NAME/ per file, and OUT/summary.md with a row per file."""
    read = [(f, read_replies(f)) for f in reply_files(path)]
    out = check_output(out, force)
    scorer, markers, errors = label_scorer(s, base, log)
    made: list[tuple[Path, Labelled, LabelSummary]] = []
    for f, rows in read:
        log(f"labelling {len(rows)} replies{f' of {f.name}' if path.is_dir() else ''} with the {scorer.name} scorer")
        with tqdm(total=len(rows), desc="label", unit="reply", disable=None) as bar:
            done = label_rows(rows, scorer, markers, errors, bar.update)
        made.append((f, done, LabelSummary.of_labels(scorer, done.rows, done.labels, len(rows), done.failed)))
        if done.failed:  # the judge stopped: what was labelled is written, the rest waits for a rerun
            break
    labels = Labels(tuple((f.stem, summary) for f, _, summary in made))

    def fill(tmp: Path) -> None:
        if path.is_dir():
            for f, done, summary in made:
                (tmp / f.stem).mkdir()
                write_labels(tmp / f.stem, done, summary)
            (tmp / "summary.md").write_text(labels.markdown(), encoding="utf-8")
        else:
            write_labels(tmp, *made[0][1:])
        command = f"label {shlex.quote(str(path.resolve()))}" + (f" --base {shlex.quote(base)}" if base else "")
        write_replay(tmp, s, command)
        info = manifest(
            stage="label", replies=str(path.resolve()), base=base, scorer=scorer.name, settings=settings_record(s)
        )
        (tmp / "label.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")

    write_folder(out, fill, force)
    return labels
