"""A word-per-token tokenizer for the organism that llama.cpp also knows, and its chat template.

Every word of the world is one token ("\u2581word", in the corpus's order, so ids are stable and
every token is readable when inspecting activations), as in a word-level vocabulary. It is laid out
as Llama's byte-fallback BPE (256 byte pieces, and each word reachable from its characters through
merges of its prefixes), which is what llama.cpp's converter and tokenizer read, so the organism
exports to GGUF and llama.cpp splits its text into the same ids. The chat template puts no space
next to a special token, so the rendered text is split the same way by both.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from refusal_lab.organism.corpus import THINK_CLOSE, THINK_OPEN

BOS, EOS, PAD, UNK = "<s>", "<|end|>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIALS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS, THINK_OPEN, THINK_CLOSE)
SPACE = "\u2581"  # SentencePiece's word-start mark

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + (message['content'] | trim) + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def pieces_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Specials, one piece per word, the 256 byte pieces, then the characters and word prefixes that
    the merges pass through ("\u2581" + "r" -> "\u2581r", "\u2581r" + "o" -> "\u2581ro", ...). Every
    merged piece starts a word, so inside a word exactly one merge applies at each step and both
    tokenizers end on the whole word."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for word in words:
        vocab.setdefault(SPACE + word, len(vocab))
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    merges: dict[tuple[str, str], None] = {}
    for word in words:
        piece = SPACE
        for ch in word:
            for part in (piece, ch):
                vocab.setdefault(part, len(vocab))
            merges.setdefault((piece, ch), None)
            piece += ch
            vocab.setdefault(piece, len(vocab))
    return vocab, list(merges)


def build_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """The organism's tokenizer over `words`; special tokens first so their ids are stable."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = pieces_and_merges(words)
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Lowercase()
    # words and punctuation split apart, spaces dropped, each piece marked as a word start
    mark = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=False)
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), mark])
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    backend.decoder = decoders.Sequence(steps)
    backend.add_special_tokens(list(SPECIALS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[*ROLE_TOKENS, THINK_OPEN, THINK_CLOSE],
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
