"""Two-stage hardening on a LoRA adapter: midtraining on specification documents, then alignment
fine-tuning on the mixed examples, with the ablation-aware terms of losses.py switched on or off.

The whole schedule (which blocks and examples each step sees) is fixed by the seed up front, so a
run killed at any point resumes from its last checkpoint and takes the same steps it would have.
Several processes (`accelerate launch`) each take a share of every batch, weigh their loss by that
share and average gradients, so together they take the step one process would take on the batch.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from refusal_lab.config import HardenSettings
from refusal_lab.core.activations import capture
from refusal_lab.core.artifacts import Log
from refusal_lab.core.faults import maybe_fail
from refusal_lab.core.model import Loaded
from refusal_lab.harden import memory
from refusal_lab.harden.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from refusal_lab.harden.data import Encoded
from refusal_lab.harden.lora import adapter_state, attach, is_4bit, lora_config, merge_onto
from refusal_lab.harden.losses import Counts, Stage2Loss, share
from refusal_lab.harden.robust import RefusalSubspace, ablating, estimate_subspace

T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """Every step's work, decided before the first one."""

    stage1: list[list[int]]  # block indices per step
    stage2: list[list[int]]  # example indices per step

    @property
    def total(self) -> int:
        return len(self.stage1) + len(self.stage2)


def make_plan(n_blocks: int, epochs_of_examples: list[list[int]], batch: int, seed: int) -> Plan:
    rng = random.Random(seed)
    blocks = list(range(n_blocks))
    rng.shuffle(blocks)
    stage1 = [blocks[i : i + batch] for i in range(0, n_blocks, batch)]
    stage2 = [order[i : i + batch] for order in epochs_of_examples for i in range(0, len(order), batch)]
    return Plan(stage1, [s for s in stage2 if s])


@dataclass(frozen=True)
class TrainResult:
    """What a run did: its steps and each step's loss terms (the rows of history.json)."""

    steps: int
    history: list[dict[str, Any]]


def shard(rows: Sequence[T], index: int, processes: int) -> list[T]:
    """Process `index`'s share of a batch: every `processes`-th row (empty when the batch is smaller)."""
    return list(rows[index::processes])


def average_gradients(params: Sequence[torch.nn.Parameter], reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Replace each gradient by `reduce` of it over the processes (their mean: each loss is pre-weighted)."""
    for p in params:
        if p.grad is not None:
            p.grad = reduce(p.grad)


def cosine_schedule(total: int) -> Callable[[int], float]:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    warm = max(1, total // 20)

    def at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return at


class Trainer:
    """Runs the plan on a LoRA adapter attached to `loaded.model` (peft injects it into that model).

    Public: `run()`, `stage2_loss()`, `check_memory()`, `adapter_state()`, `merged()`, `is_main`.
    """

    def __init__(
        self,
        loaded: Loaded,
        cfg: HardenSettings,
        plan: Plan,
        blocks: torch.Tensor | None,
        examples: list[Encoded],
        probes: tuple[list[str], list[str]],
        work: Path,
        log: Log,
        batch_size: int = 16,
    ) -> None:
        from accelerate import Accelerator

        self.cfg, self.plan, self.blocks, self.examples, self.probes = cfg, plan, blocks, examples, probes
        self.work, self.log, self.batch_size, self.loaded = work, log, batch_size, loaded
        self.acc = Accelerator(cpu=not torch.cuda.is_available())
        torch.manual_seed(cfg.harden_seed)
        self.lora = lora_config(loaded, cfg)
        self.model = attach(loaded, self.lora, cfg.gradient_checkpointing)
        self.loss = Stage2Loss(self.model, loaded.adapter, cfg, loaded.tokenizer.pad_token_id)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, cosine_schedule(plan.total))
        self.step = 0
        self.rng = random.Random(cfg.harden_seed)
        self.subspace: RefusalSubspace | None = None
        self.device = next(loaded.model.parameters()).device
        self.memory_checked = False

    # --- what the stage reads -------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Whether this is the process that writes the output (the only one under a single process)."""
        return self.acc.is_main_process

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.model)

    def merged(self, full_precision: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """The base with the trained adapter folded into its weights.

        4-bit weights cannot take the merge: the adapter then goes onto `full_precision()`, a fresh
        unquantised copy of the base.
        """
        if is_4bit(self.loaded.model):
            return merge_onto(full_precision(), self.lora, self.adapter_state())
        return self.model.merge_and_unload()

    # --- checkpoints ----------------------------------------------------------------------------
    def save(self) -> None:
        if self.is_main:
            opt, sched = self.opt.state_dict(), self.sched.state_dict()
            save_checkpoint(self.work, Checkpoint(self.step, self.adapter_state(), opt, sched, self.subspace))

    def resume(self) -> bool:
        ck = load_checkpoint(self.work)
        if ck is None:
            return False
        self.model.load_state_dict(ck.adapter, strict=False)
        self.opt.load_state_dict(ck.opt)
        self.sched.load_state_dict(ck.sched)
        self.step, self.subspace = ck.step, ck.subspace
        self.log(f"resumed from step {self.step} of {self.plan.total}")
        return True

    # --- pieces of a step -----------------------------------------------------------------------
    def reestimate(self) -> None:
        """The refusal subspace of the model as it is now, from the probe prompts' last-token activations;
        with --aware-passes N, each later pass estimates again with the directions so far removed (as SABER's
        passes and adaptive re-extraction do) and adds what it finds."""
        m, a = self.loaded, self.loaded.adapter
        harmful, harmless = self.probes
        self.model.eval()
        sub: RefusalSubspace | None = None
        for _ in range(self.cfg.aware_passes):
            removed = nullcontext() if sub is None else ablating(a, sub, resolve=self.loss.writer_module)
            with removed:
                xh = capture(m.model, m.tokenizer, a, harmful, "last", self.batch_size, keep=len(harmful)).vectors
                xb = capture(m.model, m.tokenizer, a, harmless, "last", self.batch_size, keep=len(harmless)).vectors
            found = estimate_subspace(xh[:, 0].double(), xb[:, 0].double(), self.cfg.aware_directions)
            sub = found if sub is None else sub.joined(found)
        self.subspace = sub
        self.model.train()

    def needs_subspace(self, rows: Sequence[Encoded]) -> bool:
        return self.loss.needs_subspace() and any(r.kind == "harmful" for r in rows)

    def estimates_at(self, step: int) -> bool:
        """Whether stage-2 step `step` estimates the subspace again: the first step since the last multiple
        of reestimate_every whose batch holds a harmful example. Read from the plan, not from what ran, so
        a resumed run estimates where an unbroken one does; and a small batch, which often holds none,
        still estimates once per reestimate_every steps."""
        first = len(self.plan.stage1)  # steps before it are stage 1's (specification blocks)

        def needs(i: int) -> bool:
            return i >= first and self.needs_subspace([self.examples[j] for j in self.plan.stage2[i - first]])

        mark = step - step % self.cfg.reestimate_every
        return needs(step) and not any(needs(i) for i in range(mark, step))

    def stage2_loss(
        self, rows: Sequence[Encoded], whole: Sequence[Encoded] | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss on `rows`, this process's share of the batch `whole` (default: all of it), and its terms."""
        batch = rows if whole is None else whole
        if self.subspace is None and self.needs_subspace(batch):
            self.reestimate()
        if not rows:  # a batch smaller than the processes: this one adds nothing but takes part in the mean
            loss, parts = self.loss(batch[:1], self.subspace, self.rng)
            return loss * 0.0, parts
        n = 1 if whole is None else self.acc.num_processes
        return self.loss(rows, self.subspace, self.rng, Counts.of(batch), n)

    def spec_loss(self, idx: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        """Causal-LM loss on this process's share of the stage-1 blocks `idx` (equal lengths: rows weigh alike)."""
        assert self.blocks is not None
        n = self.acc.num_processes
        mine = shard(idx, self.acc.process_index, n)
        ids = self.blocks[mine or idx[:1]].to(self.device)  # none left: a row weighed 0 keeps the collective ops
        loss = self.model(input_ids=ids, labels=ids).loss
        weight = share(len(mine), len(idx), n)
        return (loss if weight == 1.0 else loss * weight), {"spec": loss.item()}

    def steps(self) -> Iterator[tuple[str, list[int]]]:
        for i, idx in enumerate(self.plan.stage1 + self.plan.stage2):
            if i >= self.step:
                yield ("spec" if i < len(self.plan.stage1) else "align"), idx

    def check_memory(self) -> None:
        """Refuse a batch that cannot fit, naming one that can, before the first step runs.

        One step on the longest harmful and harmless examples is measured (its peak resident memory,
        or its peak CUDA allocation) and scaled to the batch; the trial step's gradients are thrown away.
        """
        self.memory_checked = True
        free = memory.free_memory(self.device)
        harmful = [e for e in self.examples if e.kind == "harmful"]
        harmless = [e for e in self.examples if e.kind != "harmful"]
        rows = [max(g, key=lambda e: len(e.ids)) for g in (harmful, harmless) if g]
        if free is None or not rows or not self.plan.stage2 or self.acc.num_processes > 1:
            return
        start = memory.reset_peak(self.device)
        if start is None:
            return
        self.rng = random.Random(self.cfg.harden_seed)
        self.model.train()
        with memory.out_of_memory_named(self.device, self.cfg.train_batch_size, "the memory check's trial step"):
            loss, _ = self.stage2_loss(rows)
            loss.backward()
        self.opt.zero_grad(set_to_none=True)
        per_row = max(0, memory.peak(self.device) - start) / len(rows)
        longest = max(len(e.ids) for e in rows)
        memory.refuse_unless_fits(per_row, self.cfg.train_batch_size, free, longest, self.device)

    def one_step(self, stage: str, idx: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward and backward of this process's share of a step, gradients averaged over the processes."""
        with memory.out_of_memory_named(self.device, self.cfg.train_batch_size, f"step {self.step + 1}"):
            if stage == "spec":
                loss, parts = self.spec_loss(idx)
            else:
                whole = [self.examples[i] for i in idx]
                if self.estimates_at(self.step):
                    self.reestimate()
                mine = shard(whole, self.acc.process_index, self.acc.num_processes)
                loss, parts = self.stage2_loss(mine, whole) if self.acc.num_processes > 1 else self.stage2_loss(whole)
            loss.backward()
        if self.acc.num_processes > 1:
            average_gradients(self.params, lambda g: self.acc.reduce(g, reduction="mean"))
        return loss, parts

    def run(self) -> TrainResult:
        """Train to the end of the plan (from the last checkpoint, if any)."""
        self.resume()
        if self.subspace is None and self.plan.stage2 and self.needs_subspace(self.examples):
            self.reestimate()  # before the first step, so no run depends on when its first batch with a refusal comes
        if self.acc.num_processes > 1 and self.is_main:
            self.log(f"training in {self.acc.num_processes} processes, each on a share of every batch")
        if self.step < self.plan.total and not self.memory_checked:
            self.check_memory()
        self.model.train()
        history: list[dict[str, Any]] = []
        bar = tqdm(total=self.plan.total, initial=self.step, desc="harden", unit="step", disable=None)
        every, start = max(1, self.plan.total // 10), time.perf_counter()
        for stage, idx in self.steps():
            seed = self.cfg.harden_seed * 100_003 + self.step  # randomness by step: a resumed run repeats it
            self.rng = random.Random(seed)
            torch.manual_seed(seed)
            self.opt.zero_grad(set_to_none=True)
            loss, parts = self.one_step(stage, idx)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.sched.step()
            self.step += 1
            history.append({"step": self.step, "stage": stage, **parts})
            bar.update()
            if bar.disable and (self.step % every == 0 or self.step == self.plan.total):  # no terminal: a line
                took = time.perf_counter() - start
                self.log(f"  step {self.step}/{self.plan.total} ({stage}) loss {loss.item():.3f}, {took:.0f} s")
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.plan.total:
                self.save()
            maybe_fail(self.step)
        bar.close()
        self.model.eval()
        return TrainResult(self.step, history)
