"""Search: resumable after kill -9, shared by workers through SQLite, guarded against mismatches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import optuna
import pytest
from transformers import AutoModelForCausalLM

from cli_process import CLI, run_cli

FAST = ["--methods", "kernel", "--eval-count", "6", "--max-new-tokens", "12"]


def _cfg(tmp_path):
    (tmp_path / "c.toml").write_text(f'cache_dir = "{tmp_path / "cache"}"\n')
    return ["--config", str(tmp_path / "c.toml")]


def _journal(path):
    from optuna.storages.journal import JournalFileBackend

    return optuna.load_study(
        study_name="refusal-lab", storage=optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    )


def _complete(study):
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


@pytest.mark.slow
def test_a_run_ended_after_its_third_trial_resumes_with_finished_trials_kept(organism_dir, tmp_path):
    """The worker is ended right after its third trial is stored (fault injection, as a kill -9 would end
    it: no clean-up, no front written); the rerun keeps those trials and runs on to the budget."""
    from refusal_lab.core.faults import FAULT_ENV, FAULT_EXIT_CODE

    out = tmp_path / "s"
    cmd = [*CLI, "search", str(organism_dir), "-o", str(out), "--trials", "10", *FAST, *_cfg(tmp_path)]
    ended = run_cli(cmd, env={**os.environ, FAULT_ENV: "3"})
    assert ended.returncode == FAULT_EXIT_CODE, ended.stderr
    study = _journal(out / "study.journal")
    assert len([t for t in study.trials if t.state.is_finished()]) == 3 and not (out / "pareto.json").exists()
    before = {t.number: t.params for t in _complete(study)}
    assert before
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    run = run_cli(cmd, env=env)
    assert run.returncode == 0, run.stderr
    assert "layer selection" not in run.stderr  # the starts were chosen when the study was made, not again
    study = _journal(out / "study.journal")
    finished = [t for t in study.trials if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL]
    assert len(finished) == 10
    after = {t.number: t.params for t in _complete(study)}
    assert all(after[n] == p for n, p in before.items())
    assert json.loads((out / "pareto.json").read_text())


def test_a_trial_left_running_by_a_dead_worker_is_failed_not_waited_for():
    """A worker killed mid-trial leaves its trial RUNNING; the next run fails it instead of counting it."""
    import socket

    from refusal_lab.search.study import run_trials

    study = optuna.create_study(directions=["minimize", "minimize"])
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    study.ask().set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    run_trials(study, 2, lambda trial: (trial.suggest_float("x", 0.0, 1.0), 0.0))
    states = [t.state for t in study.trials]
    assert states[0] == optuna.trial.TrialState.FAIL
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(organism_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    common = [*CLI, "search", str(organism_dir), "--storage", url, "--study-name", "shared", *FAST, *_cfg(tmp_path)]
    # create the study first, so the two workers do not race to create it
    assert run_cli([*common, "--trials", "1", "-o", str(tmp_path / "w0")]).returncode == 0
    procs = [
        subprocess.Popen(
            [*common, "--trials", "16", "-o", str(tmp_path / f"w{i}")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in (1, 2)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    study = optuna.load_study(study_name="shared", storage=url)
    done = [t for t in study.trials if t.state.is_finished()]
    assert len(done) >= 16 and len({t.number for t in done}) == len(done)
    assert len(done) <= 17  # together they stop at the budget (before: each added its own, 31 trials)
    workers = {t.user_attrs.get("worker") for t in done[1:]}
    assert len(workers) == 2  # both processes ran trials of the one study


def test_a_trial_another_worker_finished_first_is_dropped_not_fatal(tmp_path):
    """SQLite has no row locks, so two workers can pop the same enqueued trial (seen in the test above:
    "Trial#1 has already finished"). The one that loses the race must go on, not crash."""
    from refusal_lab.search.study import run_trials

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=url, directions=["minimize", "minimize"])
    other = optuna.load_study(study_name="s", storage=url)  # the second worker
    study.enqueue_trial({"x": 0.5})
    calls = []

    def objective(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        if not calls:  # the other worker popped the same trial and finished it while we ran it
            other.tell(trial.number, [1.0, 1.0])
        calls.append(trial.number)
        trial.set_user_attr("kl", x)
        return x, x

    run_trials(study, 3, objective)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3 and done[0].values == [1.0, 1.0]  # the other worker's result stands
    assert len(calls) == 3  # the lost trial was dropped, counted as the other's, and the run went on


def test_a_trial_another_worker_finished_while_this_one_stored_it_is_dropped_not_fatal():
    """The race can also land between tell's finished-check and its write (the two-worker test failed on
    it: 'Trial#1 has already finished' raised from the final tell): that trial is the other's too."""
    from refusal_lab.search.study import run_trials

    study = optuna.create_study(directions=["minimize", "minimize"])
    real, raced = study.tell, []

    def tell(trial, values=None, state=None, skip_if_finished=False):
        if not raced:  # the other worker stores this trial just before our write
            raced.append(real(trial, [1.0, 1.0]).number)
            raise optuna.exceptions.UpdateFinishedTrialError("Trial#0 has already finished")
        return real(trial, values, state=state, skip_if_finished=skip_if_finished)

    study.tell = tell
    run_trials(study, 3, lambda trial: (trial.suggest_float("x", 0.0, 1.0), 0.0))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert raced == [0] and len(done) == 3 and done[0].values == [1.0, 1.0]


@pytest.mark.slow
def test_study_from_other_prompts_is_refused(organism_dir, tmp_path):
    out = tmp_path / "s"
    base = [*CLI, "search", str(organism_dir), "-o", str(out), "--trials", "1", *FAST[:2], *_cfg(tmp_path)]
    assert run_cli([*base, "--eval-count", "6"]).returncode == 0
    run = run_cli([*base, "--eval-count", "5"])
    assert run.returncode == 2 and "prompts_hash" in run.stderr


@pytest.mark.slow
def test_unreachable_storage_is_a_clear_error(organism_dir, tmp_path):
    run = run_cli(
        [
            *CLI,
            "search",
            str(organism_dir),
            "--storage",
            "postgresql://nobody@127.0.0.1:1/none",
            "-o",
            str(tmp_path / "s"),
            "--trials",
            "1",
            *FAST,
            *_cfg(tmp_path),
        ],
    )
    assert run.returncode == 2 and "storage" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
@pytest.mark.parametrize("limit", [["--min-complied", "0"], ["--max-kl", "1000"]])
def test_pick_exports_through_the_ablate_path(organism_dir, tmp_path, limit):
    out = tmp_path / "s"
    base = [
        *CLI,
        "search",
        str(organism_dir),
        "-o",
        str(out),
        "--methods",
        "saber",
        "--eval-count",
        "8",
        "--max-new-tokens",
        "12",
        *_cfg(tmp_path),
    ]
    assert run_cli([*base, "--trials", "2"]).returncode == 0
    pick = [*CLI, "pick", str(out), *limit, "-o", str(tmp_path / "m")]
    run = run_cli(pick)
    assert run.returncode == 0, run.stderr
    manifest = json.loads((tmp_path / "m" / "ablation.json").read_text())
    assert manifest["method"] == "search:saber" and "refusal-lab pick" in (tmp_path / "m" / "reproduce.sh").read_text()
    AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_early_stopped_replies_keep_every_label_and_end_refusing_batches_early(organism, organism_dir):
    """A reply stops once a refusal word settles its verdict: the same labels, fewer tokens."""
    from refusal_lab.ablate.edit import hooked
    from refusal_lab.ablate.saber import saber
    from refusal_lab.config import ProbeSettings, SaberSettings
    from refusal_lab.core.generate import generate
    from refusal_lab.core.metrics import is_refusal
    from refusal_lab.core.sources import Source
    from refusal_lab.organism.build import prompt_sets

    m, src = organism, Source.of(organism_dir)
    probe, held = prompt_sets(organism_dir, "probe"), prompt_sets(organism_dir, "eval")
    harmful = [p.prompt for p in held["harmful"]][:32]
    texts = [[p.prompt for p in probe[k]] for k in ("harmful", "harmless", "capability")]
    edit = saber(m.model, m.tokenizer, m.adapter, *texts, ProbeSettings(), SaberSettings()).ablations
    scorer = src.scorer()
    seen = set()
    for ablations in ([], edit):  # the base refuses everything; SABER's edit makes most comply
        with hooked(m.adapter, ablations):
            full = generate(m.model, m.tokenizer, harmful, 24)
            short = generate(m.model, m.tokenizer, harmful, 24, settled=lambda t: is_refusal(t, src.markers))
        labels = scorer.labels(harmful, full)
        assert scorer.labels(harmful, short) == labels
        seen |= set(labels)
        refused = [i for i, x in enumerate(labels) if x == "refused"]
        if refused:  # always for the base; the edit may leave none
            assert sum(len(short[i].split()) for i in refused) < sum(len(full[i].split()) for i in refused)
    assert {"refused", "complied"} <= seen  # both kinds of reply were compared


@pytest.mark.slow
def test_proxy_pruned_trials_never_reach_the_front_and_the_proxy_is_reported(organism_dir, tmp_path):
    out = tmp_path / "s"
    cmd = [*CLI, "search", str(organism_dir), "-o", str(out), "--trials", "12", *FAST, *_cfg(tmp_path)]
    run = run_cli(cmd)
    assert run.returncode == 0, run.stderr
    assert "layer selection: layer" in run.stderr
    study = _journal(out / "study.journal")
    chosen = study.user_attrs["layer_selection"]
    n = 6  # --eval-count
    assert chosen["predicted_refused"] < n  # the base refuses every prompt: the chosen direction moved some
    assert chosen["within_limit"] and chosen["kl"] <= 0.1
    # warm start: the selected direction at full then gentler strengths, flat over every layer
    for trial, strength in zip(study.trials[:3], (1.0, 0.75, 0.5), strict=True):
        p = trial.params
        assert p["method"] == "kernel" and p["direction_index"] == chosen["layer"]
        assert p["attn_max"] == p["mlp_max"] == strength and p["attn_min"] == p["mlp_min"] == 1.0
    complete = {t.number for t in _complete(study)}
    front = json.loads((out / "pareto.json").read_text())
    assert front and {p["trial"] for p in front} <= complete
    proxy = json.loads((out / "proxy.json").read_text())
    assert proxy["trials"] == 12 and proxy["measured_with_proxy"] == len(complete) and proxy["refusal_openers"]
    for t in _complete(study):  # the proxy counted refusals of the same replies the scorer labelled
        assert 0 <= t.user_attrs["proxy_refused"] <= n
    assert proxy["mean_abs_error"] <= n / 3
    again = run_cli([*cmd, "--no-proxy"])
    assert again.returncode == 2 and "fidelity" in again.stderr  # a full-fidelity study is another study


def test_a_model_without_an_exact_scorer_is_searched_by_coherence_so_babble_is_not_compliance(organism_dir, tmp_path):
    import shutil

    from refusal_lab.config import load_settings
    from refusal_lab.core.generate import generate
    from refusal_lab.core.metrics import KeywordScorer
    from refusal_lab.core.model import load
    from refusal_lab.search.setup import search_scorer

    plain = tmp_path / "plain"  # the organism as any other model: no shipped eval split, so no exact scorer
    shutil.copytree(organism_dir, plain)
    (plain / "prompts" / "harmful_eval.jsonl").unlink()
    (plain / "prompts" / "templates.json").unlink()
    m = load(plain, dtype="float32", device="cpu")
    harmless = [json.loads(x)["prompt"] for x in (organism_dir / "prompts" / "harmless_eval.jsonl").open()][:12]
    scorer = search_scorer(m, harmless, load_settings(**{"cache_dir": tmp_path / "cache"}))
    assert scorer.name == "coherence"
    own = generate(m.model, m.tokenizer, harmless[:2], 24)
    babble = "minus 2 is 3 . minus 2 is 3 . minus 2 is 3 . minus 2 is 3 ."
    replies = [*own, babble, "sorry , i must decline ."]
    prompts = [*harmless[:2], harmless[2], harmless[3]]
    assert scorer.labels(prompts, replies) == ["complied", "complied", "broken", "refused"]
    assert KeywordScorer(scorer.markers).labels(prompts, replies)[2] == "complied"  # what it used to count
    settings = load_settings(**{"cache_dir": tmp_path / "cache"})
    named = search_scorer(m, harmless, settings, calibrate_it=False)  # pick: the study's identity, no generation
    assert named.name == scorer.name
    with pytest.raises(RuntimeError):
        named.labels(prompts, replies)


def test_the_proxy_margin_is_learned_from_its_own_over_predictions_and_never_widened():
    from types import SimpleNamespace

    from refusal_lab.search.proxy import Proxy

    proxy, n = Proxy(margin=0.25, learn=3), 16  # fixed: 4 prompts

    def measured(predicted: int, not_complied: int) -> SimpleNamespace:
        counts = {"refused": not_complied, "complied": n - not_complied, "broken": 0, "proxy_refused": predicted}
        return SimpleNamespace(user_attrs=counts, values=[float(not_complied), 0.0])

    exact = [measured(6, 6), measured(3, 3)]
    assert proxy.slack(exact, n) == 4.0  # two trials: too few to learn from
    assert proxy.slack([*exact, measured(2, 3)], n) == 0.0  # exact or under: it prunes what it predicts
    assert proxy.slack([*exact, measured(5, 3)], n) == 2.0  # over-predicted by 2 once: that is the margin
    assert proxy.slack([*exact, measured(12, 3)], n) == 4.0  # never above the fixed margin
    assert Proxy(margin=0.25, learn=0).slack(exact * 3, n) == 4.0


def test_a_front_point_round_trips_and_a_misspelt_field_fails_at_once():
    from refusal_lab.errors import UserError
    from refusal_lab.search.result import FrontPoint, front_from_json, front_to_json

    front = [FrontPoint(3, 5, 1, 1, 0, 0.02, {"method": "kernel"}), FrontPoint(7, 6, 0, None, None, 0.3, {})]
    assert front_from_json(json.loads(json.dumps(front_to_json(front)))) == front
    assert list(front[0].to_json()) == ["trial", "complied", "not_complied", "refused", "broken", "kl", "params"]
    row = front[0].to_json()
    row["complyed"] = row.pop("complied")
    with pytest.raises(UserError, match="complied, complyed"):
        FrontPoint.from_json(row)


def test_pick_chooses_the_most_compliant_under_a_kl_limit_or_the_gentlest_under_a_compliance_limit():
    from refusal_lab.errors import UserError
    from refusal_lab.search.pick import choose
    from refusal_lab.search.result import FrontPoint

    front = [FrontPoint(i, 6 - nc, nc, nc, 0, kl, {}) for i, (nc, kl) in enumerate([(0, 0.5), (2, 0.1), (5, 0.01)])]
    assert choose(front, 0.2, None).trial == 1 and choose(front, 1.0, None).trial == 0
    assert choose(front, None, 2).trial == 1 and choose(front, None, 6).trial == 2
    with pytest.raises(UserError):
        choose(front, 0.001, None)
    with pytest.raises(UserError):
        choose(front, None, None)


def test_starts_put_the_selected_direction_first_and_keep_each_methods_default():
    from types import SimpleNamespace

    import torch

    from refusal_lab.search.space import candidate_layers, starts

    fdr = torch.tensor([[9.0], [1.0], [2.0], [5.0], [3.0], [0.5], [8.0], [9.0]])  # layers 0 and 7 are out of range
    loaded = SimpleNamespace(adapter=SimpleNamespace(num_layers=8))
    setup = SimpleNamespace(probe=SimpleNamespace(fdr=fdr), loaded=loaded)
    assert candidate_layers(8) == [2, 3, 4, 5, 6]
    setup.methods = ("saber", "kernel")
    plain = starts(setup)
    assert [p["method"] for p in plain] == ["kernel", "saber"]
    assert plain[0]["direction_index"] == 6.0  # the most separable candidate, not layer 0 or 7
    chosen = starts(setup, selected=4)
    assert [p.get("direction_index") for p in chosen[:4]] == [4.0, 4.0, 4.0, 6.0] and chosen[4] == plain[1]
    assert [p["attn_max"] for p in chosen[:4]] == [1.0, 0.75, 0.5, 1.0]
    setup.methods = ("saber",)
    assert [p["method"] for p in starts(setup, selected=4)] == ["saber"]  # a kernel start needs the kernel method
