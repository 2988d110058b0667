"""GGUF export with llama.cpp's own converter, and greedy decoding in llama.cpp to check it.

No GGUF writer is written here: llama.cpp's maintained `convert_hf_to_gguf.py` (with its
`conversion` package and its own `gguf-py`) knows every architecture llama.cpp runs. It is taken
from the llama-cpp-python source distribution (nothing is compiled) and run as a program with its
own gguf-py first on the path, so it never mixes with the `gguf` package installed here. The
check decodes through xllamacpp, a prebuilt llama.cpp for Python (optional extra `gguf`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from refusal_lab.core.http import post_json
from refusal_lab.errors import UserError

CONVERTER_PACKAGE = "llama-cpp-python==0.3.36"
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")  # under vendor/llama.cpp/
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # the converter's types that need no imatrix or ternary weights
OFFLINE_FIX = (
    f"on a machine with a package index run `pip download --no-deps --no-binary=:all: {CONVERTER_PACKAGE}` "
    "and pass the .tar.gz with --converter"
)


def _extract(sdist: Path, dest: Path) -> None:
    """Only the converter, its package and its gguf-py out of the sdist (no paths outside dest)."""
    with tarfile.open(sdist) as tar:
        wanted = []
        for member in tar.getmembers():
            _, _, rest = member.name.partition("/vendor/llama.cpp/")
            if rest and any(rest == p or rest.startswith(p) for p in CONVERTER_PARTS) and member.isfile():
                member.name = rest
                wanted.append(member)
        if not any(m.name == "convert_hf_to_gguf.py" for m in wanted):
            raise UserError(
                f"{sdist} holds no vendor/llama.cpp/convert_hf_to_gguf.py", f"pass {CONVERTER_PACKAGE}'s sdist"
            )
        tar.extractall(dest, members=wanted, filter="data")


def converter(cache_dir: Path, given: Path | None = None) -> Path:
    """The folder holding convert_hf_to_gguf.py: given, cached, or fetched once from the package index."""
    if given is not None:
        given = Path(given).expanduser()
        if (given / "convert_hf_to_gguf.py").is_file():
            return given
        if not given.is_file():
            raise UserError(f"converter {given} does not exist", OFFLINE_FIX)
    home = Path(cache_dir) / f"llama.cpp-converter-{CONVERTER_PACKAGE.split('==')[1]}"
    if (home / "convert_hf_to_gguf.py").is_file() and given is None:
        return home
    home.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home.parent) as tmp:
        sdist = given
        if sdist is None:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "-d", tmp]
            run = subprocess.run([*cmd, CONVERTER_PACKAGE], capture_output=True, text=True)
            found = sorted(Path(tmp).glob("*.tar.gz"))
            if run.returncode or not found:
                last = (run.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
                raise UserError(f"could not fetch llama.cpp's converter ({last})", OFFLINE_FIX)
            sdist = found[0]
        _extract(sdist, Path(tmp) / "converter")
        shutil.rmtree(home, ignore_errors=True)
        os.replace(Path(tmp) / "converter", home)
    return home


def check_model_folder(folder: Path) -> None:
    folder = Path(folder)
    if folder.suffix == ".gguf":
        raise UserError(f"{folder} is already a GGUF file", "export a Hugging Face model folder")
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise UserError(
            f"{folder} is not a model folder (no config.json and .safetensors weights)",
            "pass a folder written by save_pretrained, refusal-lab ablate, search --pick or harden",
        )


def export_gguf(folder: Path, out: Path, outtype: str, cache_dir: Path, given: Path | None = None) -> Path:
    """Convert a model folder to one GGUF file at `out`, written whole or not at all."""
    folder, out = Path(folder), Path(out).expanduser().resolve()
    if outtype not in GGUF_TYPES:
        raise UserError(f"unsupported GGUF type {outtype!r}", f"use one of {', '.join(GGUF_TYPES)}")
    check_model_folder(folder)
    if not out.parent.is_dir():
        raise UserError(f"folder {out.parent} does not exist", "create it or pass another -o FILE")
    tool = converter(cache_dir, given)
    tmp = out.with_name(f".{out.name}.partial")
    env = {**os.environ, "PYTHONPATH": str(tool / "gguf-py"), "NO_LOCAL_GGUF": ""}
    cmd = [sys.executable, str(tool / "convert_hf_to_gguf.py"), str(folder), "--outtype", outtype]
    run = subprocess.run([*cmd, "--outfile", str(tmp)], capture_output=True, text=True, env=env)
    if run.returncode or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise UserError(_why(run.stderr, folder), "see llama.cpp's supported models; export another folder")
    os.replace(tmp, out)
    return out


def _why(stderr: str, folder: Path) -> str:
    """The converter's own reason, in one line."""
    arch = re.search(r"Model (\S+) is not supported", stderr)
    if arch:
        return f"llama.cpp does not know the architecture {arch.group(1)} of {folder}"
    if "pre-tokenizer was not recognized" in stderr:
        return f"llama.cpp's converter does not know {folder}'s tokenizer (it needs a SentencePiece or known BPE one)"
    last = [line for line in stderr.strip().splitlines() if line.strip()]
    return f"llama.cpp's converter failed on {folder}: {last[-1] if last else 'no message'}"


@contextmanager
def llama_server(gguf: Path, threads: int = 2, ctx: int = 1024) -> Iterator[str]:
    """llama.cpp's own server (xllamacpp) on a local port for the block; yields its base URL."""
    try:
        import xllamacpp as xl
    except ImportError as exc:
        raise UserError("xllamacpp is not installed", "pip install 'refusal-lab[gguf]'") from exc
    params = xl.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx, params.n_parallel, params.warmup = ctx, 1, False
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    server = xl.Server(params)
    try:
        yield server.listening_address
    finally:
        del server


def greedy_ids(url: str, prompt_ids: list[int], n: int) -> list[int]:
    """llama.cpp's greedy continuation of token ids (its native /completion endpoint returns ids)."""
    body = {"prompt": prompt_ids, "n_predict": n, "temperature": 0, "top_k": 1, "return_tokens": True}
    body |= {"cache_prompt": False, "samplers": ["top_k"]}
    return list(post_json(f"{url}/completion", body)["tokens"])


def tokenize(url: str, text: str) -> list[int]:
    """llama.cpp's own split of `text` into ids, special tokens written in it read as such, no BOS added."""
    return list(post_json(f"{url}/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"])
