"""The Optuna study behind the search: storage, resume, shared workers, the front and picking.

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
    ones, so that several workers stop together instead of each adding its own budget."""
    import optuna

    worker = f"{socket.gethostname()}:{os.getpid()}"
    while True:
        finished, running = _counts(study)
        if finished + running >= n_trials:
            return
        trial = study.ask()
        try:
            trial.set_user_attr("worker", worker)
            values = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
            continue
        except optuna.exceptions.UpdateFinishedTrialError:
            # SQLite has no row locks, so two workers can pop the same enqueued trial; the
            # other finished it first and its result stands
            continue
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            raise
        study.tell(trial, values, skip_if_finished=True)


def pareto(study: Any) -> list:
    return sorted(study.best_trials, key=lambda t: (t.values[0], t.values[1]))


def pick(study: Any, max_kl: float | None, max_not_complied: float | None) -> Any:
    """The front's trial with most compliance under a KL limit, or least KL under a non-compliance limit."""
    front = pareto(study)
    if max_kl is not None:
        ok = [t for t in front if t.values[1] <= max_kl]
        best = min(ok, key=lambda t: (t.values[0], t.values[1])) if ok else None
    elif max_not_complied is not None:
        ok = [t for t in front if t.values[0] <= max_not_complied]
        best = min(ok, key=lambda t: (t.values[1], t.values[0])) if ok else None
    else:
        raise UserError("pick needs --max-kl or --min-complied", "say which constraint chooses the trial")
    if best is None:
        raise UserError("no trial on the Pareto front meets the limit", "relax the limit or run more trials")
    return best
