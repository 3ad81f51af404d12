"""Tokenizers for deltaformer models, built on the ``tokenizers`` library (never on ``transformers``).

``AutoTokenizer.from_pretrained`` reads a Hugging Face model directory: ``tokenizer.json`` when there is one,
else a BERT ``vocab.txt`` (the same WordPiece pipeline HF builds), plus ``tokenizer_config.json`` and
``special_tokens_map.json`` for the special tokens and ``model_max_length``. Calls take HF's arguments and
give HF's ids, so models ported from HF see exactly the inputs they were trained on.
``train_tokenizer`` makes a new WordPiece (BERT) or byte-level BPE (GPT-2) tokenizer for pretraining.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from .chat_template import render_chat_template
from .checkpoints.gguf import find_gguf, open_gguf
from .errors import DeltaformerError
from .gguf_tokenizer import backend_from_metadata

VERY_LARGE_INTEGER = int(1e30)
"""HF's ``model_max_length`` for "no limit"; kept as is so configs round-trip unchanged."""
_NO_LIMIT_ABOVE = int(1e20)  # HF's LARGE_INTEGER: any model_max_length above it means "no limit"

SPECIAL_KINDS = ("unk", "pad", "cls", "sep", "mask", "bos", "eos")
BERT_SPECIALS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
ENDOFTEXT = "<|endoftext|>"
# HF's clean_up_tokenization: each of these loses its leading space (" ' " becomes "'")
_CLEANUPS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")
_PADDINGS = {False: None, "do_not_pad": None, True: "longest", "longest": "longest", "max_length": "max_length"}
_TRUNCATIONS = {False: None, "do_not_truncate": None, True: "longest_first"} | {
    s: s for s in ("longest_first", "only_first", "only_second")
}


class TokenizerError(DeltaformerError, ValueError):
    """A tokenizer cannot be loaded, saved or called as asked."""


class Encoding(dict):
    """What a tokenizer call returns: a dict (so ``model(**enc)`` works) whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> Encoding:
        """Move tensor values to ``device`` (for ``return_tensors="pt"``); other values are kept."""
        return Encoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


class AutoTokenizer:
    """A ``tokenizers.Tokenizer`` plus what HF keeps beside it: special token roles and ``model_max_length``.

    The backend's own truncation and padding are set on every call, the way HF does, so settings baked into a
    ``tokenizer.json`` (MiniLM's pads everything to 128) never leak into results. A lock makes that
    set-then-encode step safe to share between threads.
    """

    def __init__(
        self,
        backend: Tokenizer,
        special_tokens: dict[str, str | None] | None = None,
        model_max_length: int = VERY_LARGE_INTEGER,
        padding_side: str = "right",
        truncation_side: str = "right",
        clean_up_tokenization_spaces: bool = False,
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        self.chat_template = chat_template
        self._backend.no_truncation()
        self._backend.no_padding()
        self._special = {kind: (special_tokens or {}).get(kind) for kind in SPECIAL_KINDS}
        self.model_max_length = int(model_max_length)
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._lock = threading.Lock()
        # HF marks every named special token as a special added token, so "[CLS]" typed in text stays whole
        # and skip_special_tokens drops it; do the same for tokens the backend does not know as added yet.
        added = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in dict.fromkeys(v for v in self._special.values() if v) if t not in added]
        if missing:
            backend.add_special_tokens([AddedToken(t, special=True) for t in missing])

    # ---- loading -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_asset: str | Path) -> AutoTokenizer:
        """Load from an HF model directory, its ``tokenizer.json``/``vocab.txt``, a GGUF file (its metadata holds
        the tokenizer and chat template), or a deltaformer asset name."""
        path = _resolve(path_or_asset)
        gguf = find_gguf(path)
        if gguf is not None:
            checkpoint = open_gguf(gguf)
            backend, roles = backend_from_metadata(checkpoint.metadata, gguf)
            return cls(backend, roles, chat_template=checkpoint.chat_template)
        if path.is_file():
            path = path.parent
        if not path.is_dir():
            raise TokenizerError(
                f"tokenizer path {path} does not exist; pass a model directory holding tokenizer.json or vocab.txt"
            )
        config = _read_json(path / "special_tokens_map.json") | _read_json(path / "tokenizer_config.json")
        specials: dict[str, str | None] = {kind: _content(config.get(f"{kind}_token")) for kind in SPECIAL_KINDS}
        if (path / "tokenizer.json").is_file():
            try:
                backend = Tokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as exc:
                raise TokenizerError(
                    f"{path / 'tokenizer.json'} is not a valid tokenizers file ({_one_line(exc)}); "
                    "re-download it or delete it to fall back to vocab.txt"
                ) from None
            if not any(specials.values()):  # a bare tokenizer.json names no roles: take the usual ones it has
                vocab = backend.get_vocab()
                specials = {
                    k: v
                    for k, v in (BERT_SPECIALS | {"bos": ENDOFTEXT, "eos": ENDOFTEXT}).items()
                    if v in vocab
                }
        elif (path / "vocab.txt").is_file():
            found = specials
            specials = {k: found.get(k) or v for k, v in BERT_SPECIALS.items()}
            specials.update({k: found[k] for k in ("bos", "eos")})
            backend = _bert_from_vocab(path / "vocab.txt", config, specials)
        else:
            raise TokenizerError(
                f"{path} has neither tokenizer.json nor vocab.txt; point at the model directory that has them"
            )
        _add_config_tokens(backend, config)
        return cls(
            backend,
            specials,
            model_max_length=config.get("model_max_length") or VERY_LARGE_INTEGER,
            padding_side=config.get("padding_side", "right"),
            truncation_side=config.get("truncation_side", "right"),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            chat_template=_chat_template_of(path, config),
        )

    # ---- encoding ------------------------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
    ) -> Encoding:
        """Encode one text, a pair, or a batch of either, with HF's padding and truncation rules.

        ``truncation=None`` (the default) truncates only when ``max_length`` is given without padding, as HF
        does. Without ``max_length``, truncation and ``padding="max_length"`` use ``model_max_length``,
        unless that is HF's "no limit" sentinel. Lists come back unless ``return_tensors`` is "pt" or "np".
        """
        batched = not isinstance(text, str)
        inputs = _inputs(text, text_pair)
        if padding not in _PADDINGS:
            raise TokenizerError(f"padding={padding!r} is not one of {sorted(map(str, _PADDINGS))}")
        if truncation is not None and truncation not in _TRUNCATIONS:
            raise TokenizerError(f"truncation={truncation!r} is not one of {sorted(map(str, _TRUNCATIONS))}")
        pad = _PADDINGS[padding]
        if truncation is None:
            truncation = max_length is not None and pad is None
        trunc = _TRUNCATIONS[truncation]
        if max_length is None:
            limit = None if self.model_max_length > _NO_LIMIT_ABOVE else self.model_max_length
            pad = None if pad == "max_length" and limit is None else pad
            trunc, max_length = (trunc, limit) if limit is not None else (None, None)
        padding_side = padding_side or self.padding_side
        if padding_side not in ("left", "right"):
            raise TokenizerError(f"padding_side={padding_side!r} should be 'left' or 'right'")
        if pad is not None and self.pad_token_id is None:
            raise TokenizerError("asked to pad but this tokenizer has no pad token; set tok.pad_token first")
        encodings = self._encode(
            inputs, add_special_tokens, trunc, max_length, pad, pad_to_multiple_of, padding_side
        )
        out = Encoding(
            input_ids=[e.ids for e in encodings],
            token_type_ids=[e.type_ids for e in encodings],
            attention_mask=[e.attention_mask for e in encodings],
        )
        if return_tensors is not None:
            return _to_tensors(out, return_tensors)
        return out if batched else Encoding({k: v[0] for k, v in out.items()})

    def _encode(
        self,
        inputs: list,
        add_special_tokens: bool,
        trunc: str | None,
        max_length: int | None,
        pad: str | None,
        pad_to_multiple_of: int | None,
        padding_side: str,
    ) -> list:
        with self._lock:
            if trunc is None:
                self._backend.no_truncation()
            else:
                assert max_length is not None  # a truncation strategy comes with a length
                self._backend.enable_truncation(max_length, strategy=trunc, direction=self.truncation_side)
            if pad is None:
                self._backend.no_padding()
            else:
                self._backend.enable_padding(
                    direction=padding_side,
                    pad_id=self.pad_token_id,
                    pad_token=self.pad_token,
                    length=max_length if pad == "max_length" else None,
                    pad_to_multiple_of=pad_to_multiple_of,
                )
            try:
                return self._backend.encode_batch(inputs, add_special_tokens=add_special_tokens)
            except Exception as exc:
                hint = (
                    "only_second needs text pairs; use truncation=True for single texts"
                    if "Second sequence not provided" in str(exc)
                    else "use a larger max_length or truncation='longest_first'"
                )
                raise TokenizerError(f"cannot encode: {_one_line(exc)}; {hint}") from None

    def encode(
        self,
        text: str,
        text_pair: str | None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
    ) -> list[int]:
        """The ``input_ids`` of one text (or pair)."""
        return self(
            text,
            text_pair,
            add_special_tokens=add_special_tokens,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
        )["input_ids"]

    def tokenize(
        self, text: str, text_pair: str | None = None, add_special_tokens: bool = False
    ) -> list[str]:
        """The token strings of a text, without special tokens unless asked (as HF)."""
        (encoding,) = self._encode(
            _inputs(text, text_pair), add_special_tokens, None, None, None, None, "right"
        )
        return encoding.tokens

    # ---- decoding and vocabulary ---------------------------------------------------------------------

    def decode(
        self, ids: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None
    ) -> str:
        """Text of one id sequence (list, tensor or array); the backend decoder joins word pieces."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        ids = [ids] if isinstance(ids, int) else list(ids)
        text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = (
            self.clean_up_tokenization_spaces
            if clean_up_tokenization_spaces is None
            else clean_up_tokenization_spaces
        )
        # HF skips this cleanup for BPE, where it would delete real spaces before punctuation.
        if clean and type(self._backend.model).__name__ != "BPE":
            for old in _CLEANUPS:
                text = text.replace(old, old.strip() if old != " ' " else "'")
        return text

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        """``decode`` of each sequence of a batch (list of lists, or a 2-D tensor or array)."""
        sequences = sequences.tolist() if hasattr(sequences, "tolist") else sequences
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Ids of tokens; unknown tokens map to the unk id (None when there is no unk token)."""
        if isinstance(tokens, str):
            found = self._backend.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]  # type: ignore[misc]  # each t is a str, so each result an int

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False) -> Any:
        """Token strings of ids (one id gives one string)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._backend.id_to_token(i) for i in ids if i not in skip]

    def get_vocab(self) -> dict[str, int]:
        """Token → id, added tokens included."""
        return self._backend.get_vocab(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens (HF's meaning); ``len(tok)`` counts them."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._backend

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Role → token for the roles this tokenizer has, e.g. ``{"cls_token": "[CLS]"}``."""
        return {f"{k}_token": v for k, v in self._special.items() if v}

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens plus any added token flagged special, without repeats."""
        flagged = [t.content for t in self._backend.get_added_tokens_decoder().values() if t.special]
        return list(dict.fromkeys([v for v in self._special.values() if v] + flagged))

    @property
    def all_special_ids(self) -> list[int]:
        return [i for i in map(self._backend.token_to_id, self.all_special_tokens) if i is not None]

    def _token_id(self, kind: str) -> int | None:
        token = self._special[kind]
        return None if token is None else self._backend.token_to_id(token)

    def _set_special(self, kind: str, token: str | None) -> None:
        if token is not None and self._backend.token_to_id(token) is None:
            self._backend.add_special_tokens([AddedToken(token, special=True)])
        self._special[kind] = token

    unk_token = property(lambda self: self._special["unk"], lambda self, t: self._set_special("unk", t))
    pad_token = property(lambda self: self._special["pad"], lambda self, t: self._set_special("pad", t))
    cls_token = property(lambda self: self._special["cls"], lambda self, t: self._set_special("cls", t))
    sep_token = property(lambda self: self._special["sep"], lambda self, t: self._set_special("sep", t))
    mask_token = property(lambda self: self._special["mask"], lambda self, t: self._set_special("mask", t))
    bos_token = property(lambda self: self._special["bos"], lambda self, t: self._set_special("bos", t))
    eos_token = property(lambda self: self._special["eos"], lambda self, t: self._set_special("eos", t))
    unk_token_id = property(lambda self: self._token_id("unk"))
    pad_token_id = property(lambda self: self._token_id("pad"))
    cls_token_id = property(lambda self: self._token_id("cls"))
    sep_token_id = property(lambda self: self._token_id("sep"))
    mask_token_id = property(lambda self: self._token_id("mask"))
    bos_token_id = property(lambda self: self._token_id("bos"))
    eos_token_id = property(lambda self: self._token_id("eos"))

    # ---- chat -----------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation: Sequence[dict[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        chat_template: str | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
        documents: Sequence[dict[str, Any]] | None = None,
        **template_variables: Any,
    ) -> str | list[int]:
        """``conversation`` rendered by the chat template (``transformers``' rendering, see
        :mod:`deltaformer.chat_template`); token ids unless ``tokenize=False``. The template writes the special
        tokens itself, so tokenizing adds none, as in HF."""
        template = chat_template or self.chat_template
        if not template:
            raise TokenizerError("this tokenizer has no chat template: pass chat_template=..., or use a model that "
                                 "ships one (tokenizer_config.json 'chat_template' or GGUF metadata)")
        specials = {f"{kind}_token": token for kind, token in self._special.items() if token is not None}
        text = render_chat_template(template, conversation, add_generation_prompt, tools=tools, documents=documents,
                                    **(specials | template_variables))
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ---- saving --------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json (and vocab.txt for WordPiece).

        The config names ``BertTokenizer`` only for a BERT pipeline and repeats its normalizer settings,
        because HF's ``BertTokenizer`` rebuilds normalization from the config, not from tokenizer.json.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._backend.no_truncation()
            self._backend.no_padding()
            self._backend.save(str(directory / "tokenizer.json"))
        spec = json.loads(self._backend.to_str())
        config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
        norm, pre, model = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}, spec["model"]
        if model.get("type") == "WordPiece":
            vocab = sorted(self.get_vocab().items(), key=lambda kv: kv[1])
            if [i for _, i in vocab] == list(range(len(vocab))):
                (directory / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
            if norm.get("type") == "BertNormalizer" and pre.get("type") == "BertPreTokenizer":
                config = {
                    "tokenizer_class": "BertTokenizer",
                    "do_lower_case": norm["lowercase"],
                    "strip_accents": norm["strip_accents"],
                    "tokenize_chinese_chars": norm["handle_chinese_chars"],
                }
        config |= {
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            **self.special_tokens_map,
            **({"chat_template": self.chat_template} if self.chat_template else {}),
            "added_tokens_decoder": {
                str(i): {
                    "content": t.content,
                    "lstrip": t.lstrip,
                    "normalized": t.normalized,
                    "rstrip": t.rstrip,
                    "single_word": t.single_word,
                    "special": t.special,
                }
                for i, t in sorted(self._backend.get_added_tokens_decoder().items())
            },
        }
        _write_json(directory / "tokenizer_config.json", config)
        _write_json(directory / "special_tokens_map.json", self.special_tokens_map)
        return directory

    # ---- plumbing ------------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # locks do not pickle; DataLoader workers pickle the tokenizer
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"AutoTokenizer({type(self._backend.model).__name__}, vocab={len(self)}, "
            f"model_max_length={self.model_max_length}, specials={self.special_tokens_map})"
        )


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "wordpiece",
    vocab_size: int = 30_522,
    min_frequency: int = 2,
    lowercase: bool = True,
    model_max_length: int | None = None,
) -> AutoTokenizer:
    """Train a tokenizer for pretraining from scratch.

    ``kind="wordpiece"`` gives a BERT tokenizer (specials [PAD] [UNK] [CLS] [SEP] [MASK], ``[CLS] A [SEP]``
    templates); ``kind="bpe"`` a GPT-2 style byte-level BPE whose only special token, ``<|endoftext|>``, is
    bos, eos, unk and also pad, so batches can be padded (the attention mask hides the padding).
    """
    if kind == "wordpiece":
        backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        specials: dict[str, str | None] = dict(BERT_SPECIALS)
        trainer: trainers.Trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(BERT_SPECIALS.values()),
            show_progress=False,
        )
    elif kind == "bpe":
        backend = Tokenizer(models.BPE())
        backend.normalizer = normalizers.Lowercase() if lowercase else None
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        specials = {"bos": ENDOFTEXT, "eos": ENDOFTEXT, "unk": ENDOFTEXT, "pad": ENDOFTEXT}
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[ENDOFTEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    else:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}; use 'wordpiece' or 'bpe'")
    backend.train_from_iterator(texts, trainer=trainer)
    if kind == "wordpiece":
        backend.post_processor = _bert_template(backend, "[CLS]", "[SEP]")
    return AutoTokenizer(
        backend,
        specials,
        model_max_length=model_max_length or VERY_LARGE_INTEGER,
        clean_up_tokenization_spaces=False,
    )


# ---- helpers -------------------------------------------------------------------------------------------


def _resolve(path_or_asset: str | Path) -> Path:
    """An existing path or a path with folders as is; a bare name goes to the asset registry when installed."""
    path = Path(path_or_asset).expanduser()
    if path.exists() or len(path.parts) != 1:  # only a bare name can be an asset
        return path
    try:
        from .data.assets import resolve_model_path
    except ImportError:
        return path
    return Path(resolve_model_path(str(path_or_asset)))


def _chat_template_of(directory: Path, config: dict[str, Any]) -> str | None:
    """``chat_template.jinja`` (newer ``transformers``) or ``tokenizer_config.json``'s ``chat_template``."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: HF uses the "default" one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _bert_from_vocab(vocab_file: Path, config: dict[str, Any], specials: dict[str, str | None]) -> Tokenizer:
    """The pipeline HF's ``BertTokenizer`` builds from vocab.txt and its config."""
    try:
        vocab = models.WordPiece.read_file(str(vocab_file))  # the reader HF uses too: same ids for odd lines
    except Exception as exc:
        raise TokenizerError(
            f"cannot read {vocab_file} ({_one_line(exc)}); it should be UTF-8, one token a line"
        ) from None
    unk = specials["unk"] or "[UNK]"
    if unk not in vocab:
        raise TokenizerError(f"{vocab_file} lacks the unknown token {unk!r}; is this a BERT vocab.txt?")
    backend = Tokenizer(models.WordPiece(vocab, unk_token=unk))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"),
        lowercase=config.get("do_lower_case", True),
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = _bert_template(backend, specials["cls"] or "[CLS]", specials["sep"] or "[SEP]")
    return backend


def _add_config_tokens(backend: Tokenizer, config: dict[str, Any]) -> None:
    """Added tokens that HF lists in tokenizer_config.json but the backend lacks (always so for vocab.txt)."""
    known = {t.content for t in backend.get_added_tokens_decoder().values()}
    entries = config.get("added_tokens_decoder") or {}
    for _, tok in sorted(entries.items(), key=lambda kv: int(kv[0])):
        if isinstance(tok, dict) and tok.get("content") and tok["content"] not in known:
            options = ("single_word", "lstrip", "rstrip", "normalized", "special")
            backend.add_tokens([AddedToken(tok["content"], **{k: tok[k] for k in options if k in tok})])


def _bert_template(backend: Tokenizer, cls: str, sep: str) -> processors.TemplateProcessing:
    ids = {t: backend.token_to_id(t) for t in (cls, sep)}
    if None in ids.values():
        raise TokenizerError(f"the vocabulary lacks {cls!r} or {sep!r}; a BERT tokenizer needs both")
    return processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=list(ids.items()),
    )


def _inputs(text: Any, text_pair: Any) -> list:
    """Backend inputs for one text, a pair, or batches of either; wrong shapes get a clear error."""
    if isinstance(text, str):
        if text_pair is not None and not isinstance(text_pair, str):
            raise TokenizerError(
                "text is one string but text_pair is not; pass both as strings or both as lists"
            )
        return [text if text_pair is None else (text, text_pair)]
    if not isinstance(text, (list, tuple)):
        raise TokenizerError(f"text must be a string or a list of strings, not {type(text).__name__}")
    if text_pair is None and text and all(_is_pair(t) for t in text):
        return [tuple(t) for t in text]  # a batch of (text, text_pair) tuples, as HF accepts
    if not all(isinstance(t, str) for t in text):
        raise TokenizerError(
            "text must be a string, a list of strings, or a list of (text, text_pair) tuples"
        )
    if text_pair is None:
        return list(text)
    if isinstance(text_pair, str) or len(text_pair) != len(text):
        raise TokenizerError("text_pair must be a list as long as text when text is a list")
    return list(zip(text, text_pair))


def _is_pair(item: Any) -> bool:
    return isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(t, str) for t in item)


def _to_tensors(enc: Encoding, kind: str) -> Encoding:
    lengths = {len(row) for row in enc["input_ids"]}
    if len(lengths) > 1:
        raise TokenizerError("sequences differ in length, so they cannot form one tensor; pass padding=True")
    if kind == "pt":
        import torch

        return Encoding(
            {k: torch.tensor(v, dtype=torch.long).reshape(len(v), -1 if v else 0) for k, v in enc.items()}
        )
    if kind == "np":
        import numpy as np

        return Encoding(
            {k: np.asarray(v, dtype=np.int64).reshape(len(v), -1 if v else 0) for k, v in enc.items()}
        )
    raise TokenizerError(f"return_tensors={kind!r} is not supported; use 'pt', 'np' or None for lists")


def _content(token: Any) -> str | None:
    """A special token from a config, which HF writes as a string or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path} is not valid JSON ({_one_line(exc)}); fix or delete it") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} should hold a JSON object; fix or delete it")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
