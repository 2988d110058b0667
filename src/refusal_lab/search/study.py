"""The Optuna study behind the search: storage, resume, shared workers and the front.

Objectives, both minimised: harmful evaluation prompts *not* complied with (refused + broken:
a trial that silences or breaks the model is no attack) and first-token KL on harmless
prompts. A study remembers what made it (model fingerprint, prompts, space, objectives) and
refuses to be resumed with anything else.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from refusal_lab.core.faults import maybe_fail
from refusal_lab.errors import UserError

OBJECTIVES = ("not_complied", "kl")
STALE_AFTER = timedelta(hours=6)  # a RUNNING trial of another machine older than this is not waited for


def storage_for(url: str | None, folder: Path) -> Any:
    """Default: an Optuna journal file in the output folder (kill -9 safe, resumable)."""
    import optuna

    if url is None:
        from optuna.storages.journal import JournalFileBackend

        folder.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(folder / "study.journal")))
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    except Exception as exc:  # sqlalchemy raises many kinds; all mean "cannot use this storage"
        raise UserError(
            f"cannot open the study storage {url}: {exc.__class__.__name__}: {str(exc)[:200]}",
            "check the URL, that the server is up, and that its driver is installed",
        ) from exc


def open_study(
    storage: Any, name: str, meta: dict, sampler_name: str, seed: int, starts: Callable[[], list[dict]]
) -> Any:
    """Create or resume a study; refuse one made with another model, prompts, space or objectives.

    `starts` is called only for a new study: choosing them may cost forward passes a resume need not repeat.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (
        optuna.samplers.NSGAIISampler(seed=seed)
        if sampler_name == "nsga2"
        else optuna.samplers.TPESampler(multivariate=True, seed=seed, n_startup_trials=10)
    )
    study = optuna.create_study(
        study_name=name, storage=storage, directions=["minimize", "minimize"], sampler=sampler, load_if_exists=True
    )
    old = study.user_attrs.get("meta")
    if old is None:
        study.set_user_attr("meta", meta)
        for start in starts():  # the methods' own defaults come first
            study.enqueue_trial(start)
    elif old != meta:
        diff = [k for k in meta if old.get(k) != meta[k]]
        raise UserError(
            f"study {name!r} was made with a different {', '.join(diff)}",
            "use a new --study-name or output folder for this model/prompts/space/objectives",
        )
    return study


def _alive(worker: str | None, started: datetime | None) -> bool:
    """Whether a RUNNING trial's worker (host:pid) may still be running it.

    On this machine the process is asked; another machine's trial counts until STALE_AFTER.
    """
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return started is None or datetime.now() - started < STALE_AFTER
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _counts(study: Any) -> tuple[int, int]:
    """(finished trials, trials other live workers are running); dead workers' trials are failed."""
    import optuna

    TS = optuna.trial.TrialState
    finished = running = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TS.COMPLETE, TS.PRUNED):
            finished += 1
        elif t.state == TS.RUNNING:
            if _alive(t.user_attrs.get("worker"), t.datetime_start):
                running += 1
            else:  # a worker killed mid-trial (kill -9): its trial will never finish
                study.tell(t.number, state=TS.FAIL)
    return finished, running


def run_trials(study: Any, n_trials: int, objective: Callable[[Any], tuple[float, float]]) -> None:
    """Ask and tell until the study holds n_trials finished trials, counting other workers' running
    ones, so that several workers stop together instead of each adding its own budget.

    After each trial it stores, the worker calls core.faults.maybe_fail with how many it has stored, so
    the fault variable set to N ends it right after its N-th trial is in the study, as a kill would.
    """
    import optuna

    worker = f"{socket.gethostname()}:{os.getpid()}"
    stored = 0
    while True:
        finished, running = _counts(study)
        if finished + running >= n_trials:
            return
        trial = study.ask()
        try:
            trial.set_user_attr("worker", worker)
            values = objective(trial)
        except optuna.TrialPruned:
            told = _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
        except optuna.exceptions.UpdateFinishedTrialError:
            told = False
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            raise
        else:
            told = _tell(study, trial, values)
        if told:
            stored += 1
            maybe_fail(stored)


def _tell(study: Any, trial: Any, values: tuple[float, float] | None = None, state: Any = None) -> bool:
    """Store a trial's outcome; False where another worker finished it first (its result stands).

    SQLite has no row locks, so two workers can pop the same enqueued trial, and the other can finish
    it between this worker's check and its write (skip_if_finished checks before writing).
    """
    import optuna

    try:
        study.tell(trial, values, state=state, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    return True


def pareto(study: Any) -> list:
    return sorted(study.best_trials, key=lambda t: (t.values[0], t.values[1]))
