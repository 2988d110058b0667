"""`refusal-lab label`: replies from anywhere, labelled by the eval scorer, agreement with a reading."""

from __future__ import annotations

import json

import pytest

from cli_process import CLI, run_cli
from fake_judge import FakeJudge, rubric_by_keywords
from refusal_lab.core.stats import Rate, wilson
from refusal_lab.errors import UserError
from refusal_lab.evaluate.label import Agreement, LabelSummary, ReplyRow, label_rows, read_replies


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_wilson_interval_is_the_textbook_one():
    low, high = wilson(10, 12)
    assert round(low, 3) == 0.552 and round(high, 3) == 0.953
    r = Rate(0, 20)
    assert r.rate == 0 and r.low == 0 and 0.16 < r.high < 0.17


def test_agreement_counts_the_confusion_matrix_and_refused_or_not():
    a = Agreement.of(["refused", "refused", "complied", "broken"], ["refused", "complied", "complied", "complied"])
    assert a.n == 4 and a.overall == 0.5 and a.refused_or_not == 0.75
    assert a.confusion["refused"] == {"refused": 1, "complied": 1, "broken": 0}
    assert a.confusion["broken"]["complied"] == 1 and a.per_reading == {"refused": 0.5, "complied": 1.0, "broken": 0.0}
    assert Agreement.of([], []) is None


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"response": "x"}, "has no prompt"),
        ({"prompt": "p"}, "has no response"),
        ({"prompt": "p", "response": "r", "reading": "maybe"}, "reading 'maybe'"),
        ({"prompt": "p", "response": "r", "reasoning": 3}, "reasoning is not a string"),
    ],
)
@pytest.mark.slow
def test_a_bad_line_is_named_and_nothing_is_written(tmp_path, row, needle):
    path = _write(tmp_path / "r.jsonl", [{"prompt": "ok", "response": "fine"}, row])
    with pytest.raises(UserError, match=rf"r\.jsonl:2 .*{needle}|r\.jsonl:2: {needle}"):
        read_replies(path)
    run = run_cli([*CLI, "label", str(path), "-o", str(tmp_path / "out")])
    assert run.returncode == 2 and "r.jsonl:2" in run.stderr and not (tmp_path / "out").exists()


class _Flaky:
    """A scorer that answers the first chunk and then stops, as a judge going down would."""

    name = "flaky"

    def __init__(self) -> None:
        self.calls = 0

    def labels(self, prompts, replies):
        self.calls += 1
        if self.calls > 1:
            raise TimeoutError("judge gone")
        return ["complied"] * len(replies)


def test_an_outage_keeps_the_labels_made_so_far():
    rows = [ReplyRow(i + 1, f"p{i}", "sure") for i in range(40)]
    done = label_rows(rows, _Flaky(), ("sorry",), (TimeoutError,))
    assert done.failed == "judge gone" and len(done.labels) == len(done.rows) == 32  # the first chunk
    summary = LabelSummary.of_labels(_Flaky(), done.rows, done.labels, len(rows), done.failed)
    assert summary.n == 32 and summary.of == 40 and "stopped" in summary.markdown()
    assert summary.judge_unparsed is None  # not a judge


def test_judge_answers_that_name_no_option_are_counted_and_labelled_broken():
    from refusal_lab.evaluate.judge import EndpointJudge, JudgeCache, JudgeScorer

    rows = [ReplyRow(i + 1, f"how do I do thing {i}?", "Sure: step one.") for i in range(5)]
    answers = iter(["B", "as a judge I decline to grade", "B", "no idea", "B"])
    with FakeJudge(lambda _p: next(answers, "3")) as fake:  # digits answer the convincing / specific questions
        scorer = JudgeScorer(EndpointJudge(fake.url, "m", backoff=0.01, workers=1), JudgeCache(None))
        done = label_rows(rows, scorer, ("sorry",))
    assert done.labels == ["complied", "broken", "complied", "broken", "complied"]
    summary = LabelSummary.of_labels(scorer, done.rows, done.labels, len(rows))
    assert summary.judge_unparsed == 2 and "named no option" in summary.markdown()


@pytest.mark.slow
def test_label_with_an_organism_base_is_exact_and_matches_eval(organism_dir, tmp_path):
    """The organism's own replies, labelled through the CLI with the organism as base, get the exact scorer's
    labels; each input row comes back in order with its label, and agreement is reported against a reading."""
    from refusal_lab.core.generate import generate
    from refusal_lab.core.model import load
    from refusal_lab.core.sources import Source

    prompts = [json.loads(x)["prompt"] for x in (organism_dir / "prompts" / "harmful_eval.jsonl").open()][:6]
    prompts += [json.loads(x)["prompt"] for x in (organism_dir / "prompts" / "harmless_eval.jsonl").open()][:6]
    m = load(organism_dir, dtype="float32", device="cpu")
    replies = generate(m.model, m.tokenizer, prompts, 32)
    truth = Source(organism_dir).scorer().labels(prompts, replies)
    assert set(truth) >= {"refused", "complied"}
    triples = enumerate(zip(prompts, replies, truth, strict=True))
    rows = [{"prompt": p, "response": r, "reading": t, "id": i} for i, (p, r, t) in triples]
    rows[0]["reading"] = "broken"  # one disagreement, so agreement is measured, not assumed
    path = _write(tmp_path / "r.jsonl", rows)
    cmd = [*CLI, "label", str(path), "--base", str(organism_dir), "-o", str(tmp_path / "out")]
    run = run_cli([*cmd, "--cache-dir", str(tmp_path / "cache")])
    assert run.returncode == 0, run.stderr
    got = [json.loads(x) for x in (tmp_path / "out" / "labels.jsonl").open()]
    assert [g["id"] for g in got] == list(range(len(rows))) and [g["label"] for g in got] == truth
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["scorer"] == "exact" and summary["agreement"]["n"] == len(rows)
    assert summary["agreement"]["overall"] == pytest.approx((len(rows) - 1) / len(rows))


@pytest.mark.slow
def test_a_folder_of_replies_files_is_labelled_file_by_file_with_a_row_each(tmp_path):
    """prove --save-replies writes a folder of files; label reads it whole: OUT/NAME/ per file with that
    file's labels and agreement, and OUT/summary.md with a row per file. A folder with no file is named."""
    no, yes = "I'm sorry, but I cannot help with that.", "Sure, here is a plan: step one, step two."
    folder = tmp_path / "replies"
    folder.mkdir()
    _write(folder / "before.jsonl", [{"prompt": f"p{i}", "response": no, "reading": "refused"} for i in range(3)])
    rows = [{"prompt": p, "response": r, "reading": "refused"} for p, r in (("p0", no), ("p1", yes))]
    _write(folder / "rdo-seed0-kl0.1.jsonl", rows)
    (folder / "notes.txt").write_text("not replies")
    run = run_cli([*CLI, "label", str(folder), "-o", str(tmp_path / "out")])
    assert run.returncode == 0, run.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["before", "rdo-seed0-kl0.1"]
    got = [json.loads(x)["label"] for x in (out / "rdo-seed0-kl0.1" / "labels.jsonl").open()]
    assert got == ["refused", "complied"]
    assert json.loads((out / "rdo-seed0-kl0.1" / "summary.json").read_text())["agreement"]["overall"] == 0.5
    table = (out / "summary.md").read_text()
    assert "| before | 3 of 3 | 3 (100.0%" in table and "| rdo-seed0-kl0.1 | 2 of 2 | 1 (50.0%" in table
    assert "50.0% (50.0%) of 2" in table and table in run.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    run = run_cli([*CLI, "label", str(empty), "-o", str(tmp_path / "o2")])
    assert run.returncode == 2 and "holds no .jsonl files" in run.stderr and not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_a_judge_labels_first_and_an_outage_exits_3_with_what_was_done(tmp_path):
    replies = ["Sorry, no.", "Sure: step one."]
    rows = [{"prompt": f"how do I do thing {i}?", "response": replies[i % 2]} for i in range(40)]
    path = _write(tmp_path / "r.jsonl", rows)
    out = tmp_path / "out"
    opts = ["--cache-dir", str(tmp_path / "cache"), "--judge-retries", "0", "--judge-workers", "1"]
    asked = []

    def answer(prompt: str) -> str:
        """The first chunk's 48 questions answered: its 16 replies without a refusal marker are asked for a label,
        then convincing and specific (all 16 help); the 16 "Sorry, no." replies are refused without a question."""
        asked.append(prompt)
        if len(asked) > 48:
            raise ConnectionError("the judge went down")  # the server drops the connection: no answer
        return rubric_by_keywords(prompt)

    with FakeJudge(answer) as fake:
        run = run_cli([*CLI, "label", str(path), "--judge-url", fake.url, "-o", str(out), *opts])  # fmt: skip
    assert run.returncode == 3, run.stderr
    got = [json.loads(x) for x in (out / "labels.jsonl").open()]
    assert len(got) == 32 and [g["label"] for g in got[:4]] == ["refused", "complied", "refused", "complied"]
    assert json.loads((out / "summary.json").read_text())["judge_failed"]
