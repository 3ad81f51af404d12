"""Pretrain on raw text, on the shared :class:`Trainer`: a BERT with masked LM (+ next-sentence prediction),
or a decoder (GPT-2, Llama) with the causal-LM loss on packed blocks.

Text -> documents of segments (:mod:`deltaformer.data.corpus`, streamed) -> ids (batches tokenized in
parallel) -> next-sentence pairs (:mod:`deltaformer.data.nsp`; for ``mlm`` alone the pairs' NSP label is simply
not used) or, for ``clm``, documents joined by eos and cut into blocks -> a token store on disk -> masked
batches (:mod:`deltaformer.data.masking`, drawn from the trainer's seeded generator) -> ``BertForPreTraining`` or
``BertForMaskedLM``; blocks -> the decoder LM. A model comes from a config file, a named size, or a checkpoint (``--from``); a checkpoint
without an MLM head (MiniLM) gets a fresh one, its decoder tied to the word embeddings. Validation is a fixed
masking of held-out pairs, so its MLM and NSP accuracies are comparable from one evaluation to the next.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..checkpoints.io import load_state_dict
from ..config import BertConfig, GPT2Config, ModelConfig, load_config
from ..data.clm import LMBlock, LMCollator
from ..data.corpus import StoreView, TokenStore, iter_documents, pack_blocks, tokenize_stream
from ..data.masking import MaskingConfig, MaskingVocab
from ..data.nsp import PairStats, PretrainingCollator, iter_pairs, pair_from_record, pair_record
from ..data.tabular import DataError
from ..errors import ConfigError
from ..models.base import PreTrainedModel, resolve_path
from ..models.bert import BertForMaskedLM, BertForPreTraining
from .clm import LM_SUFFIXES, causal_lm_class
from .distributed import DistEnv, all_reduce_sum
from .evaluation import _loader, autocast, evaluate_lm, move
from .finetune import _check_out
from .seeding import seed_everything
from .trainer import RESULTS, TrainConfig, Trainer, write_json

OBJECTIVES = ("mlm+nsp", "mlm", "clm")
#: Named sizes for pretraining from scratch: (layers, hidden, heads); feed-forward is 4 x hidden. A BERT for
#: the masked objectives, a GPT-2 for ``clm``.
SIZES = {"tiny": (2, 128, 2), "small": (4, 256, 4)}
DATA = "data"


@dataclass
class PretrainSpec:
    """Everything ``deltaformer pretrain`` takes."""

    objective: str
    text: list[str]
    out: Path
    size: str | None = None
    config_file: Path | None = None
    from_model: str | None = None
    tokenizer: str | None = None
    vocab_size: int = 8000
    max_length: int = 128
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    per_file: bool = False
    validation_share: float = 0.05
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, metric="loss"))
    resume: bool = False
    overwrite: bool = False
    evaluate_first: bool = False  # also score the held-out examples before training (``initial_validation``)


def pretrain(spec: PretrainSpec) -> dict[str, Any]:
    """Train and save ``out/model`` (HF directory with the tokenizer); returns results (also results.json).

    The corpus is read, tokenized and turned into examples (pairs, or packed blocks for ``clm``) as a
    stream written to ``out/data`` (a :class:`~deltaformer.data.corpus.TokenStore`), which training reads
    through memory maps: a corpus larger than memory works. A resumed run reuses the store it made.
    """
    if spec.objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {spec.objective!r}: use one of {', '.join(OBJECTIVES)}")
    if sum(x is not None for x in (spec.size, spec.config_file, spec.from_model)) != 1:
        raise ConfigError("give exactly one of --size, --config or --from")
    if not spec.text:
        raise DataError("no text given: pass text files, folders of .txt files, or brown, bbc-news, rt-reviews")
    out = Path(spec.out)
    _check_out(out, spec.resume, spec.overwrite)
    clm = spec.objective == "clm"
    seed_everything(spec.train.seed)  # a fresh model's initialisation is a function of the seed
    tokenizer, tokenizer_source = _tokenizer(spec)
    vocab = None if clm else MaskingVocab.from_tokenizer(tokenizer, tokenizer_source)
    model = build_model(spec, len(tokenizer), tokenizer)
    positions = model.config.max_position_embeddings
    if spec.max_length > positions:
        raise DataError(f"--max-length {spec.max_length} is above the {positions} positions of {_model_source(spec)}:"
                        " lower --max-length or use a config with more positions")
    store, corpus = build_store(spec, tokenizer, out / DATA)
    order = np.random.default_rng(spec.train.seed).permutation(len(store))
    held = max(1, round(spec.validation_share * len(store)))
    if len(store) - held < 1:
        raise DataError(f"{', '.join(map(str, spec.text))} make(s) only {len(store)} example(s): give more text")
    make: Callable[[list[int], list[int]], Any] = (lambda ids, _: LMBlock(ids, ids)) if clm else pair_from_record
    train_data, eval_data = StoreView(store, order[held:], make), StoreView(store, order[:held], make)
    collate: Any
    evaluator: Callable[..., dict[str, Any]]
    if clm:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        collate, evaluator = LMCollator(pad), evaluate_lm
    else:
        assert vocab is not None
        collate = PretrainingCollator(vocab, tokenizer.pad_token_id or 0, spec.masking, spec.objective == "mlm+nsp")
        evaluator = evaluate_pretraining
    trainer = Trainer(model, spec.train, train_data, collate, out, eval_data=eval_data, evaluator=evaluator)
    initial = None
    if spec.evaluate_first:
        device = torch.device(spec.train.device) if spec.train.device else None
        initial = evaluator(model.to(device) if device else model, eval_data, collate, spec.train.eval_batch_size)
    results = trainer.train(resume=spec.resume)
    if initial is not None:
        results["initial_validation"] = initial
    if trainer.env.is_main:
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        results.update({"objective": spec.objective, **corpus, "train_examples": len(train_data),
                        "validation_examples": len(eval_data), "parameters": model.num_parameters()})
        if not clm:
            results["masking"] = asdict(spec.masking)
        write_json(out / RESULTS, results)
    return results


def _tokenizer(spec: PretrainSpec) -> tuple[Any, str]:
    """The tokenizer (given, the ``--from`` model's, or trained on the text: WordPiece for the masked
    objectives, byte-level BPE for ``clm``) and where it came from, for error messages."""
    from ..tokenizer import AutoTokenizer, train_tokenizer

    name = spec.tokenizer or spec.from_model
    if name:
        return AutoTokenizer.from_pretrained(name), f"the tokenizer of {name}"
    kind = "bpe" if spec.objective == "clm" else "wordpiece"
    segments = (s for doc in _counted(iter_documents(spec.text, spec.per_file), spec.text) for s in doc)
    return train_tokenizer(segments, kind, spec.vocab_size), f"the {kind} tokenizer trained on the text"


def _model_source(spec: PretrainSpec) -> str:
    if spec.from_model is not None:
        return str(spec.from_model)
    return str(spec.config_file) if spec.config_file is not None else f"--size {spec.size}"


def _counted(documents: Iterator[list[str]], sources: list[str], counter: list[int] | None = None
             ) -> Iterator[list[str]]:
    """The documents, counted into ``counter[0]``; none at all is an error naming the sources."""
    n = 0
    for doc in documents:
        n += 1
        if counter is not None:
            counter[0] = n
        yield doc
    if n == 0:
        raise DataError(f"{', '.join(map(str, sources))} hold(s) no text: pretraining needs a non-empty corpus")


def build_store(spec: PretrainSpec, tokenizer, directory: Path) -> tuple[TokenStore, dict[str, Any]]:
    """Stream the corpus into the examples of ``spec.objective`` on disk (reused when a resumed run made
    the same); returns the store and what making it counted."""
    key = {"text": [str(Path(t).resolve()) if Path(t).exists() else str(t) for t in spec.text],
           "per_file": spec.per_file, "objective": spec.objective, "max_length": spec.max_length,
           "seed": spec.train.seed, "vocab": len(tokenizer)}
    info_path = directory / "corpus.json"
    if spec.resume and TokenStore.exists(directory) and info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info.get("key") == key:
            return TokenStore(directory), info["counts"]
    count = [0]
    documents = _counted(iter_documents(spec.text, spec.per_file), spec.text, count)
    counts: dict[str, Any]
    if spec.objective == "clm":
        joined = (["\n".join(doc)] for doc in documents)  # a document's lines read as one text
        blocks = pack_blocks(tokenize_stream(tokenizer, joined), spec.max_length, tokenizer.eos_token_id)
        store = TokenStore.write(directory, ((b, []) for b in blocks), len(tokenizer))
        counts = {"documents": count[0], "blocks": len(store), "tokens": store.tokens}
    else:
        stats = PairStats()
        pairs = iter_pairs(tokenize_stream(tokenizer, documents), spec.max_length, tokenizer.cls_token_id,
                           tokenizer.sep_token_id, seed=spec.train.seed, stats=stats)
        store = TokenStore.write(directory, map(pair_record, pairs), len(tokenizer), extra_fields=2)
        counts = {"documents": count[0], "pairs": stats.pairs, "skipped_documents": stats.skipped_documents,
                  "positive_rate": round(stats.positive_rate, 4), "tokens": store.tokens}
    write_json(info_path, {"key": key, "counts": counts})
    return store, counts


def build_model(spec: PretrainSpec, vocab_size: int, tokenizer=None) -> PreTrainedModel:
    """A fresh model of a named size or config, or a checkpoint with any missing MLM / NSP head initialised."""
    if spec.objective == "clm":
        return _causal_model(spec, vocab_size, tokenizer)
    pad_token_id = (tokenizer.pad_token_id if tokenizer is not None else None) or 0
    cls = BertForPreTraining if spec.objective == "mlm+nsp" else BertForMaskedLM
    if spec.from_model is not None:
        path = resolve_path(spec.from_model)
        config = load_config(path)
        if not isinstance(config, BertConfig) or type(config) is not BertConfig:
            raise ConfigError(f"{spec.from_model} is a {config.model_type!r} model: --objective {spec.objective} "
                              "takes BERT checkpoints (--objective clm trains decoders)")
        model = cls(config)
        report = model.load_hf_state_dict(load_state_dict(path), strict=False)
        lost = [n for n in report.missing if not n.startswith(("mlm_head.", "nsp_head.", "backbone.pooler."))]
        if lost:
            raise ConfigError(f"{spec.from_model} lacks {len(lost)} encoder weight(s), e.g. {lost[0]}: is it a BERT "
                              "checkpoint?")
        return model
    if spec.config_file is not None:
        config = load_config(spec.config_file)
        if type(config) is not BertConfig:
            raise ConfigError(f"{spec.config_file} describes a {config.model_type!r} model: --objective "
                              f"{spec.objective} takes BERT configs (--objective clm trains decoders)")
        # checked a BertConfig above; replace keeps the class
        new_config = cast(BertConfig, config.replace(vocab_size=vocab_size, pad_token_id=pad_token_id))
    else:
        layers, hidden, heads = _size(spec)
        new_config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=4 * hidden,
                                max_position_embeddings=512, pad_token_id=pad_token_id)
    return cls(new_config)


def _size(spec: PretrainSpec) -> tuple[int, int, int]:
    if spec.size not in SIZES:
        raise ConfigError(f"unknown size {spec.size!r}: use {', '.join(SIZES)}")
    return SIZES[spec.size]


def _causal_model(spec: PretrainSpec, vocab_size: int, tokenizer) -> PreTrainedModel:
    """A decoder LM for ``clm``: the ``--from`` checkpoint, a GPT-2 or Llama config file, or a GPT-2 size."""
    from ..models import auto  # noqa: F401  (fills the registry)

    if spec.from_model is not None:
        model = causal_lm_class(spec.from_model).from_pretrained(spec.from_model)
        if vocab_size > model.config.vocab_size:
            raise ConfigError(f"the tokenizer has {vocab_size} tokens and {spec.from_model} embeds only "
                              f"{model.config.vocab_size}: use the model's own tokenizer")
        return model
    ids = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id")}
    ids["bos_token_id"] = ids["bos_token_id"] if ids["bos_token_id"] is not None else ids["eos_token_id"]
    config: ModelConfig
    if spec.config_file is not None:
        config = load_config(spec.config_file)
        changes: dict[str, Any] = {"vocab_size": vocab_size}
        changes.update({k: v for k, v in ids.items() if v is not None and hasattr(config, k)})
        config = config.replace(**changes)
    else:
        layers, hidden, heads = _size(spec)
        config = GPT2Config(vocab_size=vocab_size, n_positions=512, n_embd=hidden, n_layer=layers, n_head=heads,
                            **{k: v for k, v in ids.items() if v is not None})
    for cls in PreTrainedModel.registry.values():
        if cls.config_class is type(config) and cls.hf_architecture.endswith(LM_SUFFIXES):
            return cls(config)
    raise ConfigError(f"{spec.config_file} describes a {config.model_type!r} model: --objective clm trains decoder "
                      "LMs (GPT-2, Llama configs)")


@torch.no_grad()
def evaluate_pretraining(model: nn.Module, dataset, collate: PretrainingCollator, batch_size: int = 64,
                         env: DistEnv | None = None, bf16: bool = False) -> dict[str, float]:
    """Loss, MLM accuracy (over picked tokens) and NSP accuracy, under one fixed masking of ``dataset``."""
    env = env or DistEnv(device=next(model.parameters()).device)
    fixed = dataclasses.replace(collate, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=env.device)  # loss*n, n, mlm hits, mlm n, nsp hits
    for batch in _loader(dataset, fixed, batch_size, env):
        batch = move(batch, env.device)
        with autocast(env.device, bf16):
            out = model(**batch)
        picked = batch["labels"] != -100
        n = batch["labels"].shape[0]
        nsp = 0.0
        if "next_sentence_label" in batch:
            nsp = float((out.extra_logits["seq_relationship"].argmax(-1) == batch["next_sentence_label"]).sum())
        totals += torch.tensor([float(out.loss) * n, n, float((out.logits.argmax(-1)[picked] == batch["labels"][picked])
                                .sum()), float(picked.sum()), nsp], dtype=torch.float64, device=env.device)
    model.train(was_training)
    all_reduce_sum(totals, env)
    result = {"loss": totals[0].item() / max(1.0, totals[1].item()),
              "mlm_accuracy": totals[2].item() / max(1.0, totals[3].item()), "examples": int(totals[1].item())}
    if collate.nsp:
        result["nsp_accuracy"] = totals[4].item() / max(1.0, totals[1].item())
    return result
