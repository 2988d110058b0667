"""Where a model named on the command line comes from: 'organism' is built here, anything else is a path.

The organism is one source among others: core never imports it; the stages and the CLI resolve a
model name through this module, and the organism folder itself ships its prompt splits, refusal
words and compliant templates as data that core's `Source` reads.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from refusal_lab.config import Settings
    from refusal_lab.core.model import Loaded


def model_path(s: Settings, name: str | None = None) -> Path:
    """A model name as a path: 'organism' is built once into the cache (keyed by its config)."""
    name = name or s.model.path
    if name != "organism":
        return Path(os.path.expanduser(name))
    from refusal_lab.organism.build import default_organism, organism_config

    return default_organism(
        s.cache_dir,
        organism_config(s.organism),
        log=lambda m: print(m, file=sys.stderr, flush=True),
        prebuilt=s.organism.prebuilt,
    )


def load_model(s: Settings, name: str | None = None, quantize: str | None = None) -> Loaded:
    """Load a model with the [model] section's options (dtype, device, template, remote code, arch,
    quantize); `quantize` overrides model.quantize (harden's QLoRA base)."""
    from refusal_lab.core.model import load

    m = s.model
    path = model_path(s, name)
    q = m.quantize if quantize is None else quantize
    return load(path, m.dtype, m.device, m.trust_remote_code, m.chat_template, m.allow_unverified_arch, q, m.download)
