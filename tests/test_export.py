"""GGUF export: llama.cpp's converter writes a file whose greedy decoding in llama.cpp matches transformers."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cli_process import CLI, run_cli
from refusal_lab.config import default_cache_dir
from refusal_lab.ship.gguf import export_gguf, greedy_ids, llama_server, tokenize
from tiny_models import tiny_model

CACHE = Path(os.environ.get("RLAB_TEST_CACHE", default_cache_dir()))
WORDS = "the cat sat on a mat and a dog ran to the red box while birds sang over quiet fields of green grass"
VOCAB = 320  # 256 byte pieces, the corpus's characters and a few merges
FAMILIES = ("llama", "apertus", "gemma4_text")  # Qwen2 converts as Llama does
SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}
PROMPTS = [[1, 5, 9, 13, 20], [1, 40, 41, 42], [1, 7, 7, 7, 7, 7, 30], [1, 88, 3, 60, 17, 2, 9]]


def sentencepiece_vocab(folder: Path) -> None:
    """tokenizer.model: a SentencePiece BPE vocabulary (what Llama-style converters read)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([WORDS] * 50),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=VOCAB,
        byte_fallback=True,  # llama.cpp spells characters outside the vocabulary (a chat template's) in bytes
        model_type="bpe",
        unk_id=3,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        character_coverage=1.0,
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()


def llama_bpe_vocab(folder: Path) -> None:
    """tokenizer.json in Llama's byte-fallback BPE layout (what Gemma's converter reads): specials,
    256 byte pieces, then pieces and merges learned on the corpus."""
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    norm = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    trained = Tokenizer(BPE())
    trained.normalizer = norm
    trained.train_from_iterator([WORDS] * 20, BpeTrainer(vocab_size=VOCAB - 260, show_progress=False))
    learned = json.loads(trained.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>"])}
    vocab |= {f"<0x{b:02X}>": 4 + b for b in range(256)}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = norm
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    backend.decoder = decoders.Sequence(steps)
    PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS).save_pretrained(folder)


def tiny_folder(family: str, folder: Path) -> Path:
    """A tiny random model saved as a Hugging Face folder with a byte-fallback BPE vocabulary of its size."""
    folder.mkdir(parents=True)
    (llama_bpe_vocab if family == "gemma4_text" else sentencepiece_vocab)(folder)
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' ' }}{% endfor %}"
    config = folder / "tokenizer_config.json"
    settings = json.loads(config.read_text()) if config.is_file() else {}
    config.write_text(json.dumps(settings | {"chat_template": template + "assistant: "}))
    extra = {}
    if family == "gemma4_text":  # E-style: per-layer inputs; the last two layers reuse the first two's KV caches
        kinds = ["sliding_attention", "full_attention"] * 2
        extra = {"vocab_size_per_layer_input": VOCAB, "num_hidden_layers": 4, "layer_types": kinds}
        extra |= {"num_kv_shared_layers": 2}
    model = tiny_model(family, vocab_size=VOCAB, **extra)
    with torch.no_grad():  # weights exactly representable in f16, so only llama.cpp's arithmetic differs
        for p in model.parameters():
            p.copy_(p.half().float())
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (model folder, its f16 GGUF), made once per module."""
    tmp, made = tmp_path_factory.mktemp("gguf"), {}
    for family in FAMILIES:
        folder = tiny_folder(family, tmp / family)
        made[family] = (folder, export_gguf(folder, tmp / f"{family}.gguf", "f16", CACHE))
    return made


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_f16_gguf_decodes_the_same_greedy_tokens_in_llama_cpp(family, exported):
    folder, gguf = exported[family]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with llama_server(gguf) as url:
        for ids in PROMPTS:
            ours = greedy_ids(url, ids, 12)
            with torch.no_grad():
                hf = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
            assert ours == hf, ids  # both stop after the end-of-sequence token


@pytest.fixture(scope="module")
def tiny_gguf(exported) -> Path:
    return exported["llama"][1]


@pytest.mark.slow
def test_bad_exports_fail_in_one_line_and_write_nothing(tmp_path, organism_dir, tiny_gguf):
    word_level = word_level_folder(tmp_path / "words")

    def export(*args: str) -> subprocess.CompletedProcess:
        cfg = ["--cache-dir", str(CACHE)]
        return run_cli([*CLI, "export", *args, *cfg])

    out = tmp_path / "x.gguf"
    cases = {
        (str(tmp_path), "-o", str(out)): "is not a model folder",
        (str(tiny_gguf), "-o", str(out)): "is already a GGUF file",
        (str(organism_dir), "-o", str(out), "--gguf", "q4_k"): "use one of f32, f16, bf16, q8_0",
        (str(organism_dir), "-o", str(out), "--converter", str(tmp_path / "none.tar.gz")): "pip download",
        (str(organism_dir), "-o", str(tmp_path / "no" / "x.gguf")): "does not exist",
        # a word-level vocabulary has no llama.cpp tokenizer: the converter's reason, in one line
        (str(word_level), "-o", str(out)): "does not know",
    }
    for args, message in cases.items():
        run = export(*args)
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr)
        assert len(run.stderr.strip().splitlines()) <= 2, run.stderr  # the progress line and the error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["words"]  # no partial file left behind


def word_level_folder(folder: Path) -> Path:
    """A tiny Llama whose tokenizer maps whole words to ids with nothing to merge (llama.cpp has no such type)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>", *dict.fromkeys(WORDS.split())]
    backend = Tokenizer(WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS).save_pretrained(folder)
    tiny_model("llama", vocab_size=len(words)).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_the_organism_exports_and_llama_cpp_splits_and_continues_its_chats_the_same(organism_dir, organism, tmp_path):
    """The organism's tokenizer is one llama.cpp knows: the chat-templated text of held-out prompts becomes
    the same ids in llama.cpp as in transformers, and the f16 file continues them with the same greedy ids."""
    from refusal_lab.core.sources import Source

    gguf = tmp_path / "organism.gguf"  # by name, as every command takes it
    run = run_cli([*CLI, "export", "organism", "-o", str(gguf), "--cache-dir", str(CACHE)])
    assert run.returncode == 0 and gguf.stat().st_size > 0, run.stderr
    tok, model = organism.tokenizer, organism.model
    source = Source.of(organism_dir)
    prompts = [p.prompt for name in ("harmful", "harmless", "capability") for p in source.shipped(name, "eval")[:3]]
    with llama_server(gguf) as url:
        for prompt in prompts:
            chat = [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids and len(ids) > 5
            assert tokenize(url, text) == ids, text
            with torch.no_grad():
                hf = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
            assert greedy_ids(url, ids, 24) == hf, prompt  # both stop after <|end|>


@pytest.mark.slow
def test_eval_through_an_openai_endpoint_gets_the_servers_replies(tiny_gguf, tmp_path):
    """llama.cpp's own server answers eval's requests; the saved replies are the server's."""
    from refusal_lab.evaluate.endpoint import Remote

    harmful = tmp_path / "harmful.txt"
    harmful.write_text("the cat sat on a mat\nthe dog ran to the red box\n")
    out = tmp_path / "ev"

    def evaluate(url: str, folder: Path) -> subprocess.CompletedProcess:
        cmd = [*CLI, "eval", "tiny", "-o", str(folder), "--harmful", str(harmful), "--endpoint", f"{url}/v1"]
        cmd += ["--max-new-tokens", "8", "--limit", "2", "--escalation", "none", "--cache-dir", str(CACHE)]
        return run_cli(cmd)

    with llama_server(tiny_gguf) as url:
        direct = Remote(f"{url}/v1", "tiny", tmp_path).replies(["the cat sat on a mat"], 8)
        run = evaluate(url, out)
    assert run.returncode == 0, run.stderr
    model = json.loads((out / "results.json").read_text())["models"][0]
    assert model["endpoint"]["url"] == f"{url}/v1" and model["kl"] == {}
    rows = model["harmful"]["rows"]
    assert len(rows) == 2 and rows[0]["response"] == direct[0].answer and direct[0].answer
    dead = evaluate(url, tmp_path / "ev2")
    assert dead.returncode == 2 and "cannot be reached" in dead.stderr  # the server is gone
