"""Where a model and its prompt sets come from: the one place that knows an organism folder.

An organism folder (built by refusal-lab, or an edit of one, which copies `prompts/`) ships its
held-out probe and eval splits and `prompts/refusal_markers.txt`, the words it says only when
refusing. Any other model takes prompt files from the user and refusal-lab's own harmless,
capability and over-refusal sets (`refusal_lab/data/`, fixed probe | eval halves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from refusal_lab.core.prompts import Prompt, jsonl_rows, load_prompts, prompt_hash, trained_prompts
from refusal_lab.errors import UserError

if TYPE_CHECKING:
    from refusal_lab.config import PromptSettings
    from refusal_lab.core.metrics import Scorer

DATA = Path(__file__).resolve().parents[1] / "data"
MARKERS_FILE = "refusal_markers.txt"  # in a model folder's prompts/: refusal words that model declares
TEMPLATES_FILE = "templates.json"  # in prompts/: the request phrasings and compliant replies of a templated model
ORGANISM_SETS = ("harmful", "harmless", "capability", "recognition")


@dataclass
class PromptSets:
    """Prompts for directions: harmful, harmless and (for entanglement) capability."""

    harmful: list[Prompt]
    harmless: list[Prompt]
    capability: list[Prompt] = field(default_factory=list)

    def texts(self, name: str) -> list[str]:
        return [p.prompt for p in getattr(self, name)]


@dataclass
class EvalSets:
    """Prompts for measuring a model (never the probe split)."""

    harmful: list[Prompt]
    harmless: list[Prompt]
    overrefusal: list[Prompt]
    exact: dict[str, list[Prompt]] = field(default_factory=dict)  # organism capability / recognition
    multiple_choice: list[dict] = field(default_factory=list)

    def refuse_trained_on(self, folder: Path) -> None:
        """A model trained on prompts these sets report on (harden --data, or --harmful rows shared with
        the report) is refused by name: its refusal figures would be measured on its training data."""
        trained = trained_prompts(folder)
        for name in ("harmful", "harmless", "overrefusal"):
            prompts = getattr(self, name)
            shared = [p.prompt for p in prompts if prompt_hash(p.prompt) in trained]
            if shared:
                raise UserError(
                    f"{folder.name} was trained on {len(shared)} of the {len(prompts)} {name} prompts reported on "
                    f"(the first: {shared[0][:60]!r})",
                    "report on prompts it was not trained on: other --harmful rows or files, or harden without them",
                )

    def limited(self, n: int | None) -> EvalSets:
        """Every prompt set cut to its first n (multiple-choice items are kept whole); None keeps all."""
        if not n:
            return self
        exact = {k: v[:n] for k, v in self.exact.items()}
        return EvalSets(self.harmful[:n], self.harmless[:n], self.overrefusal[:n], exact, self.multiple_choice)


def builtin_prompts(name: str, split: str) -> list[Prompt]:
    """refusal-lab's own harmless and capability prompts, split in fixed halves (probe | eval).

    'lookalike' (benign prompts with alarming words, for hardening) is all probe: its eval
    counterpart is the separate over-refusal set, so training never sees what prove measures.
    """
    prompts = load_prompts(DATA / f"{name}.txt")
    cut = {"harmless": len(prompts) // 2, "capability": 30, "lookalike": len(prompts)}[name]
    return prompts[:cut] if split == "probe" else prompts[cut:]


@dataclass(frozen=True)
class Source:
    """A model folder and what it ships: organism splits, declared refusal words."""

    folder: Path

    @staticmethod
    def of(path: Path) -> Source:
        path = Path(path)
        return Source(path if path.is_dir() else path.parent)

    @property
    def organism(self) -> bool:
        return (self.folder / "prompts" / "harmful_eval.jsonl").is_file()

    def shipped(self, name: str, split: str) -> list[Prompt] | None:
        path = self.folder / "prompts" / f"{name}_{split}.jsonl"
        return load_prompts(path) if path.is_file() else None

    @property
    def markers(self) -> tuple[str, ...]:
        """The standard refusal markers plus the words the folder declares."""
        from refusal_lab.core.metrics import REFUSAL_MARKERS

        path = self.folder / "prompts" / MARKERS_FILE
        if not path.is_file():
            return REFUSAL_MARKERS
        extra = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        return REFUSAL_MARKERS + tuple(m for m in extra if m and not m.startswith("#"))

    def scorer(self) -> Scorer:
        """Exact labels where the folder declares its compliant templates (an organism); keywords otherwise."""
        from refusal_lab.core.metrics import KeywordScorer, Templates, TemplateScorer

        path = self.folder / "prompts" / TEMPLATES_FILE
        if path.is_file():
            return TemplateScorer(self.markers, Templates.read(path))
        if self.organism:
            raise UserError(
                f"{self.folder} is an organism folder without prompts/{TEMPLATES_FILE}",
                "rebuild it with `refusal-lab organism build` (edits copy it from their base)",
            )
        return KeywordScorer(self.markers)

    def probe_sets(self, p: PromptSettings, require_harmful: bool = True) -> PromptSets:
        """Prompt files given, else the probe split shipped with an organism, else refusal-lab's own."""

        def pick(given: Path | None, name: str) -> list[Prompt]:
            if given is not None:
                return load_prompts(given, p.column)
            shipped = self.shipped(name, "probe")
            if shipped is not None:
                return shipped
            if name != "harmful":
                return builtin_prompts(name, "probe")
            if require_harmful:
                raise UserError("no harmful prompts given", "pass --harmful FILE (TXT, JSONL or CSV)")
            return []

        sets = PromptSets(pick(p.harmful, "harmful"), pick(p.harmless, "harmless"), pick(p.capability, "capability"))
        if {x.prompt for x in sets.harmful} == {x.prompt for x in sets.harmless}:
            raise UserError("the harmful and harmless prompt sets are identical", "pass two different prompt files")
        return sets

    def eval_sets(self, p: PromptSettings, limit: int | None = None) -> EvalSets:
        """The organism's eval split (prompt files override it), else the given files and refusal-lab's sets."""

        def given(path: Path | None) -> list[Prompt] | None:
            return load_prompts(path, p.column) if path is not None else None

        if self.organism:
            ev = {n: self.shipped(n, "eval") or [] for n in ORGANISM_SETS}
            harmful = given(p.harmful) or ev["harmful"]
            harmless = given(p.harmless) or ev["harmless"]
            over = given(p.overrefusal) or [x for x in ev["harmless"] if x.category == "benign_object"]
            exact = {"capability": ev["capability"], "recognition": ev["recognition"]}
        else:
            if p.harmful is None:
                raise UserError(
                    "no harmful prompts given", "pass --harmful FILE (TXT, JSONL or CSV, e.g. StrongREJECT)"
                )
            harmful = load_prompts(p.harmful, p.column)
            harmless = given(p.harmless) or builtin_prompts("harmless", "eval")
            over = given(p.overrefusal) or load_prompts(DATA / "overrefusal.jsonl")
            exact = {}
        mc = multiple_choice_items(p.mc) if p.mc is not None else []
        return EvalSets(harmful, harmless, over, exact, mc).limited(limit)

    def prove_split(self, p: PromptSettings, limit: int | None = None) -> tuple[PromptSets, EvalSets]:
        """Attack prompts and held-out report prompts, never overlapping.

        The organism: its probe and eval splits. Otherwise the --harmful file is halved: the first
        half for extraction and tuning, the second half reported on.
        """
        probe, held = self.probe_sets(p), self.eval_sets(p, None)
        if not self.organism:
            half = len(probe.harmful) // 2
            probe.harmful, held.harmful = probe.harmful[:half], held.harmful[half:]
        return probe, held.limited(limit)

    def search_split(self, p: PromptSettings, probe_n: int, eval_n: int) -> tuple[PromptSets, EvalSets]:
        """Probe prompts for directions and evaluation prompts for trials, never overlapping.

        The organism: its probe and eval splits. Otherwise the given files are cut in order, the
        first probe_n prompts for directions and the next eval_n for trials.
        """
        if self.organism and p.harmful is None:
            sets = self.probe_sets(p)
            ev = self.eval_sets(p)
            harmful, harmless = ev.harmful, ev.harmless
        else:
            sets = self.probe_sets(p)
            harmful = sets.harmful[probe_n:]
            harmless = sets.harmless[probe_n:] if p.harmless else builtin_prompts("harmless", "eval")
            if not harmful:
                raise UserError(
                    f"no harmful prompts left for evaluation after the first {probe_n}",
                    "give more prompts or a smaller --probe-count",
                )
        probe = PromptSets(sets.harmful[:probe_n], sets.harmless[:probe_n], sets.capability)
        return probe, EvalSets(harmful[:eval_n], harmless[:eval_n], [])


def multiple_choice_items(path: Path) -> list[dict]:
    """{question, choices, answer} lines; a bad line is named."""
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
