"""The harden stage's record, typed: what harden.json holds and what the CLI and the model card read.

harden.json: {"tool", "version", "method": "harden", "source", "source_fingerprint",
"data": {"examples", "harmful", "spec_blocks"}, "mix", "steps", "final_losses", "settings"}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_lab.core.artifacts import manifest

RECORD = "harden.json"


@dataclass(frozen=True)
class HardenData:
    """What was trained on: alignment examples (of which harmful) and specification blocks."""

    examples: int
    harmful: int
    spec_blocks: int

    def to_json(self) -> dict[str, int]:
        return {"examples": self.examples, "harmful": self.harmful, "spec_blocks": self.spec_blocks}

    @staticmethod
    def from_json(d: dict[str, Any]) -> HardenData:
        return HardenData(int(d["examples"]), int(d["harmful"]), int(d["spec_blocks"]))


@dataclass(frozen=True)
class HardenRecord:
    """One hardening run: its source, data, mix, steps, last step's loss terms and effective settings."""

    tool: str
    version: str
    source: str
    source_fingerprint: str
    data: HardenData
    mix: dict[str, float]  # category -> weight ({} when no mix was given)
    steps: int
    final_losses: dict[str, Any]  # the last history row ({} when no step ran)
    settings: dict[str, Any]  # settings_record(s): plain JSON values
    method: str = "harden"

    @staticmethod
    def new(
        source: str,
        source_fingerprint: str,
        data: HardenData,
        mix: dict[str, float],
        steps: int,
        final_losses: dict[str, Any],
        settings: dict[str, Any],
    ) -> HardenRecord:
        """A record stamped with this tool and version (the common head of every manifest)."""
        head = manifest()
        return HardenRecord(
            head["tool"], head["version"], source, source_fingerprint, data, mix, steps, final_losses, settings
        )

    def to_json(self) -> dict[str, Any]:
        """harden.json's fields, in its order."""
        return {
            "tool": self.tool,
            "version": self.version,
            "method": self.method,
            "source": self.source,
            "source_fingerprint": self.source_fingerprint,
            "data": self.data.to_json(),
            "mix": self.mix,
            "steps": self.steps,
            "final_losses": self.final_losses,
            "settings": self.settings,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> HardenRecord:
        if d.get("method") != "harden":
            raise ValueError(f"not a harden record (method {d.get('method')!r})")
        return HardenRecord(
            tool=d["tool"],
            version=d["version"],
            source=d["source"],
            source_fingerprint=d["source_fingerprint"],
            data=HardenData.from_json(d["data"]),
            mix={k: float(v) for k, v in d["mix"].items()},
            steps=int(d["steps"]),
            final_losses=d["final_losses"],
            settings=d["settings"],
        )

    def write(self, folder: Path) -> None:
        (folder / RECORD).write_text(json.dumps(self.to_json(), indent=1, default=str) + "\n")

    @staticmethod
    def read(folder: Path) -> HardenRecord:
        return HardenRecord.from_json(json.loads((folder / RECORD).read_text()))
