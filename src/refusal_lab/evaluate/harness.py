"""Capability through the field's harness: EleutherAI's lm-evaluation-harness on a loaded model.

Tasks are named as the harness names them; `include` adds a folder of task YAML files, so tasks
built on local data files run where no dataset can be downloaded. The harness is an optional
extra (pip install '.[lm-eval]'); the model is handed over already loaded (and edited, if it is).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from refusal_lab.core.model import Loaded
from refusal_lab.errors import UserError


def check_tasks(tasks: str, include: Path | None) -> tuple[list[str], Any]:
    """The task names and a task manager that knows them all, or a one-line error (checked before any work)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("--lm-eval needs EleutherAI's lm-evaluation-harness", "pip install '.[lm-eval]' (or lm_eval)")
    from lm_eval.tasks import TaskManager

    if include is not None and not include.is_dir():
        raise UserError(f"lm-eval task folder {include} does not exist", "pass a folder of task YAML files")
    manager = TaskManager(include_path=str(include) if include else None, verbosity="ERROR")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"lm-eval does not know the tasks {unknown}", "check the names, or pass --lm-eval-include DIR")
    return names, manager


def harness_scores(
    loaded: Loaded, tasks: str, include: Path | None = None, limit: int | None = None, batch_size: int = 8
) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm_eval.simple_evaluate on this model."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task files only: nothing is fetched
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names, manager = check_tasks(tasks, include)
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size)
    out: dict[str, Any] = simple_evaluate(
        model=lm, tasks=names, task_manager=manager, limit=limit, apply_chat_template=True, verbosity="ERROR"
    )
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        keep = {k: v for k, v in metrics.items() if isinstance(v, int | float) and "stderr" not in k}
        scores[task] = {k.split(",")[0]: float(v) for k, v in keep.items()}
    return scores
