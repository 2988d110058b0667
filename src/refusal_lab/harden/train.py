"""Two-stage hardening on a LoRA adapter: midtraining on specification documents, then alignment
fine-tuning on the mixed examples, with the ablation-aware terms of robust.py switched on or off.

The whole schedule (which blocks and examples each step sees) is fixed by the seed up front, so a
run killed at any point resumes from its last checkpoint and takes the same steps it would have.
Several processes (`accelerate launch`) each take a slice of every batch and average gradients.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from refusal_lab.config import HardenSettings
from refusal_lab.core.activations import capture
from refusal_lab.core.artifacts import Log
from refusal_lab.core.generate import tail_forward
from refusal_lab.core.model import Loaded
from refusal_lab.errors import UserError
from refusal_lab.harden.data import Encoded, collate
from refusal_lab.harden.robust import (
    RefusalSubspace,
    ablating,
    estimate_subspace,
    first_reply_logits,
    invariance_loss,
    keep_likely,
    matching_loss,
)

CHECKPOINT = "checkpoint.pt"


@dataclass
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


def first_predicting(labels: torch.Tensor) -> int:
    """The first position whose logits predict a labelled token, over the batch (0 when none is labelled).

    Prompt tokens carry no loss, so the vocabulary projection before this position is skipped: for
    a 150k-word vocabulary that is about a quarter of a small model's compute and most of a step's
    memory.
    """
    rows = (labels != -100).any(1)
    if not rows.any():
        return 0
    return max(int((labels[rows] != -100).int().argmax(1).min()) - 1, 0)


def tail_pass(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], start: int, **kw: Any
) -> tuple[Any, torch.Tensor]:
    """A forward pass and its logits from position `start` on ([batch, T - start, vocab])."""
    keep = batch["input_ids"].shape[1] - start
    out = tail_forward(model, keep, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
    return out, out.logits[:, -keep:]


def reply_loss(logits: torch.Tensor, labels: torch.Tensor, start: int) -> torch.Tensor:
    """Mean next-token loss over the labelled tokens from logits that begin at `start` (what the
    model's own causal-LM loss gives from logits at every position)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().flatten(0, 1), labels[:, start + 1 :].flatten(), ignore_index=-100
    )


def lora_targets(loaded: Loaded, spec: str) -> list[str]:
    """Leaf names of the linear maps inside the decoder layers ('all'), or the given ones, checked."""
    have = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, mod in loaded.adapter.layers.named_modules()
            if isinstance(mod, torch.nn.Linear)
        }
    )
    if spec == "all":
        return have
    wanted = [x.strip() for x in spec.split(",") if x.strip()]
    missing = [x for x in wanted if x not in have]
    if missing:
        raise UserError(f"LoRA targets {missing} are not in the model", f"use some of: {', '.join(have)}, or 'all'")
    return wanted


def merge_onto(model: torch.nn.Module, lora: Any, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A trained adapter (`state`, from a 4-bit QLoRA run) merged into a full-precision copy of its base.

    4-bit weights cannot take the merge, so the adapter moves to the unquantised base. Every LoRA
    tensor must find its place: a key that does not match would leave the base unhardened without a word.
    """
    from peft import get_peft_model

    peft = get_peft_model(model, lora)
    want = {k for k in peft.state_dict() if "lora_" in k}
    if want != set(state):
        missing, extra = sorted(want - set(state))[:3], sorted(set(state) - want)[:3]
        raise RuntimeError(f"the adapter does not fit the full-precision base: missing {missing}, unexpected {extra}")
    peft.load_state_dict(state, strict=False)
    return peft.merge_and_unload()


class Trainer:
    """Runs the plan on a peft model; `loaded.model` is the base the adapter sits on."""

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
        from peft import LoraConfig, get_peft_model

        self.cfg, self.plan, self.blocks, self.examples, self.probes = cfg, plan, blocks, examples, probes
        self.work, self.log, self.batch_size, self.loaded = work, log, batch_size, loaded
        self.acc = Accelerator(cpu=not torch.cuda.is_available())
        torch.manual_seed(cfg.harden_seed)
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=lora_targets(loaded, cfg.lora_targets),
        )
        if getattr(loaded.model, "is_loaded_in_4bit", False):  # QLoRA: cast norms, prepare the inputs' grads
            from peft import prepare_model_for_kbit_training

            loaded.model = prepare_model_for_kbit_training(loaded.model, cfg.gradient_checkpointing)
        elif cfg.gradient_checkpointing:
            loaded.model.gradient_checkpointing_enable()
            loaded.model.enable_input_require_grads()
        self.lora = lora
        self.model = get_peft_model(loaded.model, lora)
        self.wrappers = {id(m.base_layer): m for m in self.model.modules() if hasattr(m, "base_layer")}
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=0.0)
        warm = max(1, plan.total // 20)

        def schedule(step: int) -> float:  # linear warm-up, cosine to 10%
            if step < warm:
                return (step + 1) / warm
            t = (step - warm) / max(1, plan.total - warm)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
        self.step = 0
        self.rng = random.Random(cfg.harden_seed)
        self.subspace: RefusalSubspace | None = None
        self.device = next(loaded.model.parameters()).device
        self.memory_checked = False

    # --- checkpoints -----------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if "lora_" in k}

    def save(self) -> None:
        if not self.acc.is_main_process:
            return
        state = {
            "step": self.step,
            "adapter": self.adapter_state(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
        }
        if self.subspace is not None:  # the directions in use: a resumed run must ablate the same ones
            state["subspace"] = {"per_layer": self.subspace.per_layer, "global": self.subspace.global_dirs}
        tmp = self.work / f".{CHECKPOINT}.{os.getpid()}"
        torch.save(state, tmp)
        tmp.replace(self.work / CHECKPOINT)

    def resume(self) -> bool:
        path = self.work / CHECKPOINT
        if not path.is_file():
            return False
        state = torch.load(path, weights_only=True)  # tensors and plain values only: no pickled code
        self.model.load_state_dict(state["adapter"], strict=False)
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.step = int(state["step"])
        if "subspace" in state:
            self.subspace = RefusalSubspace(state["subspace"]["per_layer"], state["subspace"]["global"])
        self.log(f"resumed from step {self.step} of {self.plan.total}")
        return True

    # --- pieces of a step ---------------------------------------------------------------------
    def mine(self, rows: list[Any]) -> list[Any]:
        """This process's share of a batch."""
        return rows[self.acc.process_index :: self.acc.num_processes] or rows[:1]

    def writer_module(self, module: torch.nn.Module) -> torch.nn.Module:
        return self.wrappers.get(id(module), module)

    def reestimate(self) -> None:
        m, a = self.loaded, self.loaded.adapter
        harmful, harmless = self.probes
        self.model.eval()
        xh = capture(m.model, m.tokenizer, a, harmful, "last", self.batch_size, keep=len(harmful)).vectors[:, 0]
        xb = capture(m.model, m.tokenizer, a, harmless, "last", self.batch_size, keep=len(harmless)).vectors[:, 0]
        self.subspace = estimate_subspace(xh.double(), xb.double(), self.cfg.aware_directions)
        self.model.train()

    def ablation(self, batch: dict[str, torch.Tensor], full: bool) -> Any:
        """The subspace removed as an attacker would: everywhere (full) or at random layers and positions."""
        assert self.subspace is not None
        a = self.loaded.adapter
        if full:
            return ablating(a, self.subspace, None, None, use_global=True, resolve=self.writer_module)
        layers = {i for i in range(a.num_layers) if self.rng.random() < 0.5} or {self.rng.randrange(a.num_layers)}
        g = torch.Generator().manual_seed(self.rng.randrange(2**31))
        positions = (torch.rand(batch["input_ids"].shape, generator=g) < 0.5).to(self.device)
        return ablating(
            a, self.subspace, layers, positions, use_global=self.rng.random() < 0.5, resolve=self.writer_module
        )

    def retain_kl(
        self, batch: dict[str, torch.Tensor], logits: torch.Tensor, keep: torch.Tensor, first: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """KL(frozen base || model) over the reply tokens of the harmless rows, and at their first one.

        `logits` begin at position `start`. The first reply token is where a model answers or
        refuses; averaged with a 128-token reply it weighs 1/128, while the refusals' own short
        targets push that token hard.
        """
        with torch.no_grad(), self.model.disable_adapter():
            base = tail_pass(self.model, batch, start)[1]
        mask = ((batch["labels"] != -100) & keep[:, None])[:, start:]
        if not mask.any():
            return logits.new_zeros(()), logits.new_zeros(())

        def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
            p, q = torch.log_softmax(p.float(), -1), torch.log_softmax(q.float(), -1)
            return (p.exp() * (p - q)).sum(-1).mean()

        rows, at = keep.nonzero()[:, 0], first - start
        return kl(base[mask], logits[mask]), kl(
            first_reply_logits(base[rows], at[rows]), first_reply_logits(logits[rows], at[rows])
        )

    def answer_hinge(
        self, logits: torch.Tensor, labels: torch.Tensor, prompt_end: torch.Tensor, keep: torch.Tensor, start: int
    ) -> torch.Tensor:
        """The hinge on the first reply token of the `keep` rows (harmless ones) whose reply survived truncation.

        Invariance's hinge asks, row by row, that a harmful prompt's refusal opens likely; a harmless
        reply's opening is only one of up to a hundred tokens in the SFT mean. Without a counterpart
        every first-token push is towards refusing.
        """
        width = labels.shape[1]
        first = labels[torch.arange(len(labels), device=labels.device), prompt_end.clamp_max(width - 1)]
        rows = keep & (prompt_end < width) & (first != -100)
        if not rows.any():
            return logits.new_zeros(())
        pe = prompt_end[rows]
        return keep_likely(first_reply_logits(logits[rows], pe - start), labels[rows, pe], self.cfg.invariance_margin)

    def stage2_loss(self, rows: list[Encoded]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        pad = self.loaded.tokenizer.pad_token_id
        batch = {k: v.to(self.device) for k, v in collate(rows, pad).items()}
        prompt_end = batch.pop("prompt_end")
        harmful = torch.tensor([r.kind == "harmful" for r in rows], device=self.device)
        start = first_predicting(batch["labels"])
        out, logits = tail_pass(self.model, batch, start, output_hidden_states=cfg.matching > 0)
        loss = reply_loss(logits, batch["labels"], start)
        parts = {"sft": loss.item()}
        if (cfg.retain > 0 or cfg.retain_first > 0) and (~harmful).any():
            kl, kl_first = self.retain_kl(batch, logits, ~harmful, prompt_end, start)
            loss = loss + cfg.retain * kl + cfg.retain_first * kl_first
            parts["retain"], parts["retain_first"] = kl.item(), kl_first.item()
        if cfg.answer_hinge > 0 and (~harmful).any():
            hinge = self.answer_hinge(logits, batch["labels"], prompt_end, ~harmful, start)
            loss, parts["answer_hinge"] = loss + cfg.answer_hinge * hinge, hinge.item()
        if harmful.any() and (cfg.ablation_aware or cfg.invariance > 0):
            if self.subspace is None or self.step % cfg.reestimate_every == 0:
                self.reestimate()
            sub = {k: v[harmful] for k, v in batch.items()}
            if cfg.ablation_aware:
                rows_aware = batch if cfg.aware_harmless else sub
                with self.ablation(rows_aware, self.rng.random() < cfg.full_ablation):
                    begin = first_predicting(rows_aware["labels"])
                    aware = reply_loss(tail_pass(self.model, rows_aware, begin)[1], rows_aware["labels"], begin)
                loss, parts["aware"] = loss + aware, aware.item()
                parts["aware_rows"], parts["harmful_rows"] = len(rows_aware["input_ids"]), int(harmful.sum())
            if cfg.invariance > 0:
                pe = prompt_end[harmful]
                begin = max(int(pe.min()) - 1, start)  # only the first reply token is compared
                with self.ablation(sub, True):
                    ablated = tail_pass(self.model, sub, begin)[1]
                target = sub["labels"][torch.arange(len(pe)), pe]
                inv = invariance_loss(
                    first_reply_logits(logits[harmful], pe - start),
                    first_reply_logits(ablated, pe - begin),
                    target,
                    cfg.invariance_margin,
                )
                loss, parts["invariance"] = loss + cfg.invariance * inv, inv.item()
        if cfg.matching > 0 and harmful.any() and (~harmful).any():
            dm = matching_loss(out.hidden_states, prompt_end, harmful)
            loss, parts["matching"] = loss + cfg.matching * dm, dm.item()
        return loss, parts

    def steps(self) -> Iterator[tuple[str, list[int]]]:
        for i, idx in enumerate(self.plan.stage1 + self.plan.stage2):
            if i >= self.step:
                yield ("spec" if i < len(self.plan.stage1) else "align"), idx

    def check_memory(self) -> None:
        """Refuse a batch that cannot fit, naming one that can, before the first step runs.

        On the CPU the kernel kills a process that runs out of memory without a word, so one step on
        the longest harmful and harmless examples is measured first (its peak resident memory, or its
        peak CUDA allocation) and scaled to the batch; the trial step's gradients are thrown away.
        """
        self.memory_checked = True
        free = _free_memory(self.device)
        harmful = [e for e in self.examples if e.kind == "harmful"]
        harmless = [e for e in self.examples if e.kind != "harmful"]
        rows = [max(g, key=lambda e: len(e.ids)) for g in (harmful, harmless) if g]
        if free is None or not rows or not self.plan.stage2 or self.acc.num_processes > 1:
            return
        start = _reset_peak(self.device)
        if start is None:
            return
        self.rng = random.Random(self.cfg.harden_seed)
        self.model.train()
        with self.out_of_memory_named("the memory check's step on the two longest examples"):
            loss, _ = self.stage2_loss(rows)
            loss.backward()
        self.opt.zero_grad(set_to_none=True)
        per_row = max(0, _peak(self.device) - start) / len(rows)
        batch = self.cfg.train_batch_size
        if per_row * batch <= 0.8 * free:
            return
        gib, fits = 2**30, int(0.8 * free // per_row)  # per_row > 0: a step of 0 bytes fits any batch
        longest = max(len(e.ids) for e in rows)
        fix = (
            f"pass --train-batch-size {fits} (or --gradient-checkpointing)"
            if fits >= 1
            else f"pass --train-batch-size 1 --max-length {max(8, longest // 2)} --gradient-checkpointing"
        )
        raise UserError(
            f"a training step of {batch} examples of up to {longest} tokens needs about "
            f"{per_row * batch / gib:.1f} GiB, more than 80% of the {free / gib:.1f} GiB of {self.device.type} "
            "memory free",
            fix,
        )

    @contextmanager
    def out_of_memory_named(self, where: str) -> Iterator[None]:
        """A GPU out of memory as one line with the settings that use less (the run resumes)."""
        try:
            yield
        except torch.OutOfMemoryError:
            raise UserError(
                f"out of {self.device.type} memory at {where} (batch {self.cfg.train_batch_size})",
                "pass a smaller --train-batch-size or --max-length, --gradient-checkpointing or --quantize 4bit;"
                " the run resumes from its last checkpoint",
            ) from None

    def run(self) -> dict[str, Any]:
        """Train to the end of the plan (from the last checkpoint, if any); returns the loss history."""
        self.resume()
        if self.step < self.plan.total and not self.memory_checked:
            self.check_memory()
        self.model.train()
        history: list[dict[str, float]] = []
        bar = tqdm(total=self.plan.total, initial=self.step, desc="harden", unit="step", disable=None)
        every, start = max(1, self.plan.total // 10), time.perf_counter()
        for stage, idx in self.steps():
            seed = self.cfg.harden_seed * 100_003 + self.step  # randomness by step: a resumed run repeats it
            self.rng = random.Random(seed)
            torch.manual_seed(seed)
            self.opt.zero_grad(set_to_none=True)
            with self.out_of_memory_named(f"step {self.step + 1}"):
                if stage == "spec":
                    ids = self.blocks[self.mine(idx)].to(self.device)  # type: ignore[index]
                    loss = self.model(input_ids=ids, labels=ids).loss
                    parts = {"spec": loss.item()}
                else:
                    loss, parts = self.stage2_loss(self.mine([self.examples[i] for i in idx]))
                loss.backward()
            if self.acc.num_processes > 1:
                for p in self.params:
                    if p.grad is not None:
                        p.grad = self.acc.reduce(p.grad, reduction="mean")
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
        bar.close()
        self.model.eval()
        return {"steps": self.step, "history": history}


def _free_memory(device: torch.device) -> int | None:
    """Bytes a step may still take on `device`: MemAvailable on the CPU (Linux), free memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return _proc_bytes("/proc/meminfo", "MemAvailable")
    except (OSError, KeyError):
        return None


_STATUS = "/proc/self/status"  # this process's VmRSS (resident now) and VmHWM (its peak)


def _proc_bytes(path: str, field: str) -> int:
    """A 'Field:  N kB' line of a /proc file, in bytes."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak(device: torch.device) -> int | None:
    """Start a peak measurement; returns the memory in use now (None where it cannot be measured)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed blocks back to the system, so reuse does not hide cost
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        return _proc_bytes(_STATUS, "VmRSS")
    except (OSError, KeyError):
        return None


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _proc_bytes(_STATUS, "VmHWM")
