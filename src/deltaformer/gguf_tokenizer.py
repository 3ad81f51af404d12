"""The tokenizer a GGUF file describes in its metadata, rebuilt over ``tokenizers`` as ``transformers`` does.

Byte-level BPE (``tokenizer.ggml.model == "gpt2"``, used by GPT-2, Llama 3, SmolLM, Qwen): the vocabulary
(``tokenizer.ggml.tokens``, already spelled in GPT-2's byte alphabet), the merges, GPT-2's byte-level
pre-tokenizer (or the split regex llama.cpp's ``tokenizer.ggml.pre`` names, for the vocabularies whose merges
were learned with one), tokens marked CONTROL as special tokens and USER_DEFINED as added tokens, and the
bos/eos/unk/pad roles from their ids. Sentencepiece (``"llama"``) vocabularies are not rebuilt here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from .errors import CheckpointError

_CONTROL, _USER_DEFINED = 3, 4
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
#: llama.cpp pre-tokenizer names whose split differs from GPT-2's (the ones ``transformers`` maps too).
_SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx")}
_ROLES = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}


def backend_from_metadata(metadata: dict[str, Any], path: Path) -> tuple[Tokenizer, dict[str, str | None]]:
    """``(tokenizers.Tokenizer, special token roles)`` for the vocabulary in ``metadata`` (of file ``path``)."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{path} has a {kind!r} tokenizer; deltaformer rebuilds byte-level BPE ('gpt2') "
                              "tokenizers from GGUF: pass a tokenizer.json directory instead")
    tokens: list[str] = list(metadata.get("tokenizer.ggml.tokens") or [])
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]
    if not tokens or not merges:
        raise CheckpointError(f"{path} lacks tokenizer.ggml.tokens or tokenizer.ggml.merges: the file is incomplete")
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
    split = _SPLITS.get(metadata.get("tokenizer.ggml.pre", ""))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    types = list(metadata.get("tokenizer.ggml.token_type") or [])
    control = [t for t, kind in zip(tokens, types) if kind == _CONTROL]
    if control:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, kind in zip(tokens, types) if kind == _USER_DEFINED]
    if user:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    roles: dict[str, str | None] = {}
    for role, key in _ROLES.items():
        index = metadata.get(f"tokenizer.ggml.{key}")
        roles[role] = tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None
    bos = roles["bos"]
    if metadata.get("tokenizer.ggml.add_bos_token") and bos is not None:  # as HF's Llama tokenizers add it
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])])
    return backend, roles
