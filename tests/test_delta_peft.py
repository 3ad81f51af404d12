"""Delta files are peft's files: LoRA, IA3, prompt and prefix tuning load both ways with the same outputs.

Every test builds the peft model on the real MiniLM from ``transformers`` (test-only oracles), gives the
delta random (non-trivial) weights, and compares our model's outputs with peft's on a padded batch of real
sentences. The HF and our MiniLM are loaded once per module and deep-copied per test, which keeps the file fast.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from deltaformer import delta
from deltaformer.delta.base import DeltaWrapper
from deltaformer.models import BertForSequenceClassification, BertModel

from .conftest import ORACLE_RTOL, make_hf_bert

pytestmark = pytest.mark.assets

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5
SENTENCES = [
    "the film is a charming, funny and moving story about growing up",
    "dull.",
    "a thriller without thrills and a comedy without a single laugh, it drags on",
    "I would watch it again",
]
KINDS = ("bare", "cls")


# --- fixtures and helpers ------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    """Batches here are tiny: on a shared 2-core machine a second thread only waits (about 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    from deltaformer.tokenizer import AutoTokenizer

    return AutoTokenizer.from_pretrained("minilm")


@pytest.fixture(scope="module")
def batch(tokenizer) -> dict[str, Tensor]:
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert not bool(enc["attention_mask"].all()), "the batch must be padded"
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.fixture(scope="module")
def pair_batch(tokenizer) -> dict[str, Tensor]:
    """Sentence pairs: token type ids 1 on the second sentence (soft tokens must get type 0, as in peft)."""
    enc = tokenizer(SENTENCES[:3], SENTENCES[1:], padding=True, return_tensors="pt")
    assert bool(enc["token_type_ids"].any())
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.fixture(scope="module")
def models(minilm_dir) -> dict[str, tuple[nn.Module, nn.Module]]:
    """(HF model, our model) with equal weights, per kind; tests deep-copy them (peft edits in place)."""
    torch.manual_seed(0)
    hf_bare = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    hf_cls = transformers.BertForSequenceClassification.from_pretrained(
        minilm_dir, num_labels=2, attn_implementation="eager").eval()
    ours_cls = BertForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    ours_cls.load_hf_state_dict(hf_cls.state_dict())
    return {"bare": (hf_bare, BertModel.from_pretrained(minilm_dir)), "cls": (hf_cls, ours_cls.eval())}


class Fresh:
    """``fresh(kind)``: private copies of the HF and our model, so a test may change them; ``plain[kind]``:
    the outputs without a delta, computed once."""

    def __init__(self, models: dict[str, tuple[nn.Module, nn.Module]], batch: dict[str, Tensor]) -> None:
        self.models = models
        self.plain = {kind: outputs(ours, batch) for kind, (_, ours) in models.items()}

    def __call__(self, kind: str) -> tuple[nn.Module, nn.Module]:
        hf, ours = self.models[kind]
        return copy.deepcopy(hf), copy.deepcopy(ours)

    def ours(self, kind: str) -> nn.Module:
        return copy.deepcopy(self.models[kind][1])


@pytest.fixture(scope="module")
def fresh(models, batch) -> Fresh:
    torch.set_num_threads(1)
    return Fresh(models, batch)


def perturb(module: nn.Module, keep: Callable[[str], bool], seed: int = 1, std: float = 0.03) -> int:
    """Add noise to the parameters whose name ``keep`` accepts (LoRA B starts at zero, IA3 at ones)."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            if keep(name):
                p.add_(torch.randn(p.shape, generator=gen) * std)
                count += 1
    assert count, "nothing was perturbed"
    return count


def perturb_peft(pm: nn.Module, seed: int = 1) -> None:
    """Perturb the adapter (and the saved head copy) of a peft model."""
    marks = ("lora_", "ia3_", "prompt_encoder", "modules_to_save")
    perturb(pm, lambda n: any(m in n for m in marks), seed)


def perturb_ours(model: nn.Module, seed: int = 1) -> None:
    ids = {id(p) for p in delta.delta_parameters(model)} | {id(p) for p in delta.head_parameters(model)}
    perturb(model, lambda n: id(dict(model.named_parameters())[n]) in ids, seed)


def outputs(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The comparable output: logits of classifiers; else the pooled output and the last hidden states of
    real tokens (soft tokens included). Padded rows are left out: they carry only float noise (~1e-5)."""
    with torch.no_grad():
        out = model(**batch)
    if getattr(out, "logits", None) is not None:
        return out.logits
    hidden, mask = out.last_hidden_state, batch["attention_mask"]
    extra = hidden.shape[1] - mask.shape[1]
    mask = torch.cat([mask.new_ones(mask.shape[0], extra), mask], 1).bool()
    return torch.cat([out.pooler_output.flatten(), hidden[mask].flatten()])


def assert_same(ours: nn.Module, theirs: nn.Module, batch: dict[str, Tensor], plain: Tensor | None = None) -> None:
    """Equal outputs; and, given the model's output without the delta, that the delta changed it."""
    a, b = outputs(ours, batch), outputs(theirs, batch)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=ORACLE_RTOL)
    if plain is not None and plain.shape == a.shape:
        assert (plain - a).abs().max() > 1e-3, "the delta does not change the output: the test proves nothing"


def task(kind: str) -> str:
    return "SEQ_CLS" if kind == "cls" else "FEATURE_EXTRACTION"


def peft_to_ours(fresh, batch, tmp_path: Path, kind: str, peft_config, name: str = "d") -> tuple[nn.Module, nn.Module]:
    """Build peft's delta, perturb, save; load it into ours; assert equal outputs. Returns (ours, peft model)."""
    hf, ours = fresh(kind)
    pm = peft.get_peft_model(hf, peft_config).eval()
    perturb_peft(pm)
    pm.save_pretrained(tmp_path / "peft")
    delta.load_delta(ours, tmp_path / "peft", name)
    assert list(delta.deltas(ours)) == [name]
    assert_same(ours, pm, batch, fresh.plain[kind])
    return ours, pm


def ours_to_peft(fresh, batch, tmp_path: Path, kind: str, config: delta.DeltaConfig) -> tuple[nn.Module, nn.Module]:
    """Attach ours, perturb, save_delta; load it with peft; assert equal outputs. Returns (ours, peft model)."""
    hf, ours = fresh(kind)
    delta.attach(ours, config, "d")
    perturb_ours(ours)
    delta.save_delta(ours, tmp_path / "ours", "d")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    assert_same(ours, pm, batch, fresh.plain[kind])
    return ours, pm


def peft_targets(pm: nn.Module) -> set[str]:
    """HF names (without the ``bert.`` prefix) of the modules peft put a LoRA on."""
    return {n.removeprefix("base_model.model.").removeprefix("bert.").removesuffix(".lora_A")
            for n, _ in pm.named_modules() if n.endswith(".lora_A")}


def our_targets(model: nn.Module) -> set[str]:
    from deltaformer.delta.base import backbone_relative, hf_name

    return {backbone_relative(model, hf_name(model, n)) for n, m in model.named_modules()
            if isinstance(m, DeltaWrapper) and m.part("lora") is not None}


# --- LoRA ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_lora_from_peft(fresh, batch, tmp_path, kind):
    cfg = peft.LoraConfig(task_type=task(kind), r=4, lora_alpha=8, target_modules=["query", "value"])
    peft_to_ours(fresh, batch, tmp_path, kind, cfg)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_to_peft(fresh, batch, tmp_path, kind):
    cfg = delta.LoraConfig(r=4, alpha=8, dropout=0.2, targets=("query", "value", "mlp.down"))
    ours_to_peft(fresh, batch, tmp_path, kind, cfg)


@pytest.mark.parametrize("targets", ["all-linear", r".*layers\.[24]\.attn\.(key|out)"])
def test_lora_regex_and_all_linear_to_peft(fresh, batch, tmp_path, targets):
    ours, pm = ours_to_peft(fresh, batch, tmp_path, "cls", delta.LoraConfig(r=2, alpha=4, targets=targets))
    assert our_targets(ours) == peft_targets(pm)


def test_lora_layers_to_transform_both_ways(fresh, batch, tmp_path):
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"], layers_to_transform=[1, 4],
                          layers_pattern="layer")
    ours, pm = peft_to_ours(fresh, batch, tmp_path, "cls", cfg)
    assert our_targets(ours) == peft_targets(pm) and len(peft_targets(pm)) == 4
    ours, pm = ours_to_peft(fresh, batch, tmp_path, "cls", delta.LoraConfig(r=2, targets=("query",), layers=(0, 5)))
    assert our_targets(ours) == peft_targets(pm) and len(peft_targets(pm)) == 2


def test_task_model_delta_loads_into_the_bare_encoder(fresh, batch, tmp_path):
    """peft's SEQ_CLS file (``bert.`` names, a head) gives BertModel the encoder of the task model."""
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "intermediate.dense"])
    ours_cls, _ = peft_to_ours(fresh, batch, tmp_path, "cls", cfg)
    bare = fresh.ours("bare")
    delta.load_delta(bare, tmp_path / "peft")
    with torch.no_grad():
        want = ours_cls.backbone(**batch).last_hidden_state
    torch.testing.assert_close(bare(**batch).last_hidden_state, want, atol=0, rtol=0)


def test_lora_rslora_both_ways(fresh, batch, tmp_path):
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, use_rslora=True, target_modules=["query", "key"])
    ours, _ = peft_to_ours(fresh, batch, tmp_path, "cls", cfg)
    assert ours.delta_router.deltas["d"].config.rslora
    ours_to_peft(fresh, batch, tmp_path, "cls", delta.LoraConfig(r=4, alpha=8, rslora=True, targets=("query",)))


def test_lora_rank_and_alpha_patterns_both_ways(fresh, batch, tmp_path):
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value", "output.dense"],
                          rank_pattern={"layer.0.attention.self.query": 2, "value": 6},
                          alpha_pattern={"query": 3.0, r"layer\.5\.output\.dense": 20.0})
    ours, pm = peft_to_ours(fresh, batch, tmp_path, "cls", cfg)
    assert our_targets(ours) == peft_targets(pm)
    ours_cfg = delta.LoraConfig(r=4, alpha=8, targets=("query", "value", "attn.out"),
                                rank_pattern={"layers.1.attn.query": 2, "value": 6}, alpha_pattern={"query": 3.0})
    ours, pm = ours_to_peft(fresh, batch, tmp_path / "back", "cls", ours_cfg)
    assert our_targets(ours) == peft_targets(pm)


@pytest.mark.parametrize("targets", [
    ["query", "key", "value", "attention.output.dense"],
    ["dense"],
    r".*\.(query|value)",
    r".*layer\.[03]\..*dense",
    "all-linear",
])
@pytest.mark.parametrize("kind", KINDS)
def test_lora_target_selection_matches_peft(fresh, batch, tmp_path, kind, targets):
    """Lists, regexes and all-linear pick the modules peft picks, and the loaded delta gives its outputs."""
    cfg = peft.LoraConfig(task_type=task(kind), r=2, lora_alpha=4, target_modules=targets)
    if kind == "cls":
        ours, pm = peft_to_ours(fresh, batch, tmp_path, kind, cfg)
        assert our_targets(ours) == peft_targets(pm)
    else:  # the selection only: parity of the outputs is the task model's test
        pm = peft.get_peft_model(fresh(kind)[0], cfg)
    mine = fresh.ours(kind)
    delta.attach(mine, delta.LoraConfig(r=2, targets=targets if isinstance(targets, str) else tuple(targets)))
    assert our_targets(mine) == peft_targets(pm)


def test_lora_dropout_is_off_in_eval(fresh, batch, tmp_path):
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["query"])
    ours, _ = peft_to_ours(fresh, batch, tmp_path, "cls", cfg)
    torch.testing.assert_close(outputs(ours, batch), outputs(ours, batch), atol=0, rtol=0)


# --- IA3 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_ia3_with_feedforward_from_peft(fresh, batch, tmp_path, kind):
    cfg = peft.IA3Config(task_type=task(kind), target_modules=["key", "value", "output.dense"],
                         feedforward_modules=["output.dense"])
    ours, _ = peft_to_ours(fresh, batch, tmp_path, kind, cfg)
    wrapper = ours.get_submodule(("backbone." if kind == "cls" else "") + "layers.0.mlp.down")
    assert wrapper.part("ia3").feedforward


def test_ia3_default_targets_from_peft(fresh, batch, tmp_path):
    """peft's own default IA3 modules for BERT (no target_modules given)."""
    peft_to_ours(fresh, batch, tmp_path, "cls", peft.IA3Config(task_type="SEQ_CLS"))


@pytest.mark.parametrize("exclude", [["attention.output.dense", "layer.2.attention.self.key"], r".*layer\.[14]\..*"])
def test_ia3_exclude_modules_from_peft(fresh, batch, tmp_path, exclude):
    cfg = peft.IA3Config(task_type="SEQ_CLS", target_modules=["key", "value", "output.dense"],
                         feedforward_modules=["output.dense"], exclude_modules=exclude)
    peft_to_ours(fresh, batch, tmp_path, "cls", cfg)


def test_lora_exclude_modules_from_peft(fresh, batch, tmp_path):
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules="all-linear", exclude_modules=["intermediate.dense"])
    ours, pm = peft_to_ours(fresh, batch, tmp_path, "cls", cfg)
    assert our_targets(ours) == peft_targets(pm)


@pytest.mark.parametrize("kind", KINDS)
def test_ia3_to_peft(fresh, batch, tmp_path, kind):
    ours_to_peft(fresh, batch, tmp_path, kind, delta.IA3Config())


# --- prompt tuning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_tuning_from_peft(fresh, batch, tmp_path, kind):
    cfg = peft.PromptTuningConfig(task_type=task(kind), num_virtual_tokens=6, prompt_tuning_init="RANDOM")
    peft_to_ours(fresh, batch, tmp_path, kind, cfg)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_learning_on_sentence_pairs(fresh, pair_batch, tmp_path, method):
    """Token types survive the soft tokens (prompt) and the shifted positions (prefix) as in peft."""
    cls = peft.PromptTuningConfig if method == "prompt" else peft.PrefixTuningConfig
    peft_to_ours(fresh, pair_batch, tmp_path, "cls", cls(task_type="SEQ_CLS", num_virtual_tokens=4))


@pytest.mark.parametrize("init", ["random", "text"])
@pytest.mark.parametrize("kind", KINDS)
def test_prompt_tuning_to_peft(fresh, batch, tmp_path, kind, init):
    text = {"init_text": "classify the sentiment of this review", "tokenizer": "minilm"} if init == "text" else {}
    ours_to_peft(fresh, batch, tmp_path, kind, delta.PromptConfig(num_virtual_tokens=7, init=init, **text))


@pytest.mark.parametrize("k", [3, 12])
def test_prompt_text_init_equals_peft(fresh, minilm_dir, k):
    """TEXT init (tokenized with special tokens, truncated or repeated to k) gives peft's initial tokens."""
    text = "classify the sentiment"
    hf, ours = fresh("bare")
    cfg = peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=k, prompt_tuning_init="TEXT",
                                  prompt_tuning_init_text=text, tokenizer_name_or_path=str(minilm_dir))
    pm = peft.get_peft_model(hf, cfg)
    theirs = pm.prompt_encoder["default"].embedding.weight
    delta.attach(ours, delta.PromptConfig(num_virtual_tokens=k, init="text", init_text=text, tokenizer="minilm"))
    store = ours.prompt.prompt
    torch.testing.assert_close(store.tokens[0, :k], theirs, atol=0, rtol=0)


# --- prefix tuning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_prefix_tuning_from_peft(fresh, batch, tmp_path, kind, projection):
    cfg = peft.PrefixTuningConfig(task_type=task(kind), num_virtual_tokens=5, prefix_projection=projection,
                                  encoder_hidden_size=32)
    peft_to_ours(fresh, batch, tmp_path, kind, cfg)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_prefix_tuning_to_peft(fresh, batch, tmp_path, kind, projection):
    cfg = delta.PrefixConfig(num_virtual_tokens=5, projection=projection, encoder_hidden_size=32 if projection else None)
    ours_to_peft(fresh, batch, tmp_path, kind, cfg)


def test_lora_gradients_equal_peft(fresh, batch, tmp_path):
    """Training sees the same delta: gradients of LoRA A and B (and the head) equal peft's."""
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "intermediate.dense"])
    ours, pm = peft_to_ours(fresh, batch, tmp_path, "cls", cfg)
    labels = torch.tensor([1, 0, 0, 1])
    ours(**batch, labels=labels).loss.backward()
    pm(**batch, labels=labels).loss.backward()
    from deltaformer.delta.base import hf_name

    theirs = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    compared = 0
    for path, module in ours.named_modules():
        if isinstance(module, DeltaWrapper) and module.part("lora") is not None:
            part, hf = module.part("lora"), f"base_model.model.{hf_name(ours, path)}"
            torch.testing.assert_close(part.A.grad[0, :4], theirs[f"{hf}.lora_A.default.weight"], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(part.B.grad[0, :, :4], theirs[f"{hf}.lora_B.default.weight"], atol=1e-5, rtol=1e-4)
            compared += 1
    assert compared == 12
    head = pm.base_model.model.classifier.modules_to_save["default"]
    torch.testing.assert_close(ours.classifier.weight.grad, head.weight.grad, atol=1e-5, rtol=1e-4)


# --- several peft files in one model ---------------------------------------------------------------------


def test_routed_peft_deltas_equal_each_peft_model(fresh, batch, tmp_path):
    """A LoRA and an IA3 file from peft, loaded side by side and routed per sample: each sample's logits are
    those of its own peft model (or of the bare model)."""
    configs = {"lora": peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]),
               "ia3": peft.IA3Config(task_type="SEQ_CLS")}
    ours = fresh.ours("cls")
    expected = {}
    for i, (name, cfg) in enumerate(configs.items()):
        hf, _ = fresh("cls")
        pm = peft.get_peft_model(hf, cfg).eval()
        perturb(pm, lambda n: "lora_" in n or "ia3_" in n, seed=10 + i)
        pm.save_pretrained(tmp_path / name)
        delta.load_delta(ours, tmp_path / name, name, head=False)
        expected[name] = outputs(pm, batch)
    expected[None] = fresh.plain["cls"]
    names = ["ia3", None, "lora", "ia3"]
    with delta.route(ours, names):
        got = outputs(ours, batch)
    for b, name in enumerate(names):
        torch.testing.assert_close(got[b], expected[name][b], atol=ATOL, rtol=0)


# --- our own files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [
    delta.LoraConfig(r=3, targets="all-linear", rank_pattern={"value": 5}),
    delta.IA3Config(init=False),
    delta.PromptConfig(num_virtual_tokens=4, init="vocab"),
    delta.PrefixConfig(num_virtual_tokens=3, projection=True),
], ids=["lora", "ia3", "prompt", "prefix-projection"])
def test_own_files_round_trip(fresh, batch, tmp_path, config):
    """save_delta then load_delta into a fresh model: same outputs, same config, and it saves again the same."""
    ours = fresh.ours("cls")
    delta.attach(ours, config, "mine")
    perturb_ours(ours)
    delta.save_delta(ours, tmp_path / "a", "mine")
    again = fresh.ours("cls")
    delta.load_delta(again, tmp_path / "a")
    assert delta.deltas(again) == {"mine": config.method}
    if isinstance(config, delta.PrefixConfig):  # files hold the computed prefix, not the MLP
        assert not again.delta_router.deltas["mine"].config.projection
    torch.testing.assert_close(outputs(again, batch), outputs(ours, batch), atol=ATOL, rtol=0)
    delta.save_delta(again, tmp_path / "b", "mine")
    from safetensors.torch import load_file

    first, second = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert sorted(first) == sorted(second)
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, atol=1e-6, rtol=0)


# --- the classification head (peft's modules_to_save) ------------------------------------------------------


def _classifier(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.classifier.named_parameters()}


def test_head_from_peft_round_trips(fresh, batch, tmp_path):
    cfg = peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"])
    ours, pm = peft_to_ours(fresh, batch, tmp_path, "cls", cfg)
    theirs = pm.base_model.model.classifier.modules_to_save["default"]
    for key, value in _classifier(ours).items():
        torch.testing.assert_close(value, getattr(theirs, key), atol=0, rtol=0)
    plain = fresh.ours("cls")
    before = _classifier(plain)
    delta.load_delta(plain, tmp_path / "peft", head=False)
    for key, value in _classifier(plain).items():
        torch.testing.assert_close(value, before[key], atol=0, rtol=0)


@pytest.mark.parametrize("config", [delta.LoraConfig(r=2, targets=("query",)), delta.PromptConfig(num_virtual_tokens=3, init="random")])
def test_head_to_peft_round_trips(fresh, batch, tmp_path, config):
    ours, pm = ours_to_peft(fresh, batch, tmp_path, "cls", config)
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["classifier"]
    head = pm.get_submodule("base_model.model.classifier" if config.method == "lora" else "base_model.classifier")
    theirs = head.modules_to_save["default"]
    for key, value in _classifier(ours).items():
        torch.testing.assert_close(value, getattr(theirs, key), atol=0, rtol=0)
    # and back into a fresh model of ours
    again = fresh.ours("cls")
    delta.load_delta(again, tmp_path / "ours")
    torch.testing.assert_close(outputs(again, batch), outputs(ours, batch), atol=0, rtol=0)


# --- bad files ---------------------------------------------------------------------------------------


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, state: dict[str, Tensor], names: dict[str, str], out: Tensor, batch) -> None:
    """No half-attached delta: same deltas, same parameters, no stray wrappers, same outputs."""
    assert delta.deltas(model) == names
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        torch.testing.assert_close(now[key], value, atol=0, rtol=0)
    if not names:
        assert not any(isinstance(m, DeltaWrapper) for m in model.modules())
        assert model.backbone.prompt is None
    torch.testing.assert_close(outputs(model, batch), out, atol=0, rtol=0)


@pytest.fixture(scope="module")
def peft_lora_dir(fresh, tmp_path_factory) -> Path:
    hf, _ = fresh("cls")
    pm = peft.get_peft_model(hf, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]))
    perturb_peft(pm)
    directory = tmp_path_factory.mktemp("peft") / "lora"
    pm.save_pretrained(directory)
    return directory


@pytest.fixture
def saved_lora(peft_lora_dir, tmp_path) -> Path:
    """A private copy of a peft LoRA folder (SEQ_CLS, with the head), for a test to damage."""
    return Path(shutil.copytree(peft_lora_dir, tmp_path / "lora"))


def _rewrite_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _rewrite_tensors(directory: Path, edit: Callable[[dict[str, Tensor]], None]) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _truncate(directory: Path) -> None:
    path = directory / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble(directory: Path) -> None:
    (directory / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")


def _drop_a_key(tensors: dict[str, Tensor]) -> None:
    del tensors[next(k for k in sorted(tensors) if "layer.3" in k and "lora_B" in k)]


def _add_a_key(tensors: dict[str, Tensor]) -> None:
    tensors["base_model.model.bert.encoder.layer.2.attention.self.key.lora_A.weight"] = torch.zeros(2, 384)


def _wrong_head(tensors: dict[str, Tensor]) -> None:
    tensors["base_model.model.classifier.weight"] = torch.zeros(3, 384)
    tensors["base_model.model.classifier.bias"] = torch.zeros(3)


BAD_FILES = {
    "no config": (lambda d: (d / "adapter_config.json").unlink(), "no adapter_config.json"),
    "no weights": (lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    "pickled weights": (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"),
                        "safe_serialization=True"),
    "bad json": (lambda d: (d / "adapter_config.json").write_text("{oops"), "not valid JSON"),
    "truncated": (_truncate, "truncated or corrupted"),
    "garbled": (_garble, "truncated or corrupted"),
    "unknown peft_type": (lambda d: _rewrite_config(d, peft_type="LOHA"), "unknown delta method peft_type='LOHA'"),
    "dora": (lambda d: _rewrite_config(d, use_dora=True), "use_dora"),
    "missing key": (lambda d: _rewrite_tensors(d, _drop_a_key), "lacks 1 tensor"),
    "extra key": (lambda d: _rewrite_tensors(d, _add_a_key), "does not explain"),
    "head of other size": (lambda d: _rewrite_tensors(d, _wrong_head), r"head tensor classifier\.(weight|bias) has shape"),
    "targets of another architecture": (lambda d: _rewrite_config(d, target_modules=["c_attn"]), "matched no module"),
    "bad value": (lambda d: _rewrite_config(d, r="four"), "bad value"),
    "no peft_type": (lambda d: _rewrite_config(d, peft_type=None), "unknown delta method peft_type=None"),
}


#: Failures that come after the new delta was attached: a delta attached before must survive them too.
LATE_FAILURES = ("missing key", "extra key", "head of other size", "targets of another architecture")


@pytest.mark.parametrize(("case", "already"), [(case, False) for case in BAD_FILES]
                         + [(case, True) for case in LATE_FAILURES])
def test_bad_file_is_a_clear_error_and_changes_nothing(fresh, batch, saved_lora, case, already):
    damage, message = BAD_FILES[case]
    damage(saved_lora)
    ours = fresh.ours("cls")
    if already:
        delta.attach(ours, delta.IA3Config(init=False), "kept")
    state, names, out = _state(ours), delta.deltas(ours), outputs(ours, batch)
    active = delta.active(ours)
    with pytest.raises(delta.DeltaError, match=message):
        delta.load_delta(ours, saved_lora, "new")
    assert delta.active(ours) == active
    assert_unchanged(ours, state, names, out, batch)


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt", "prefix"])
def test_delta_of_another_model_size_is_refused(fresh, batch, tmp_path, method):
    """A delta trained on a narrower BERT with as many layers: a shape error, and the model is unchanged."""
    hf, _ = make_hf_bert(tmp_path / "small", "BertForSequenceClassification", hidden_size=48, num_attention_heads=12,
                         num_hidden_layers=6, intermediate_size=64, num_labels=2)
    cfg = {
        "lora": peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"]),
        "ia3": peft.IA3Config(task_type="SEQ_CLS"),
        "prompt": peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
        "prefix": peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
    }[method]
    peft.get_peft_model(hf, cfg).save_pretrained(tmp_path / "delta")
    ours = fresh.ours("cls")
    state, out = _state(ours), outputs(ours, batch)
    with pytest.raises(delta.DeltaError, match="another size"):
        delta.load_delta(ours, tmp_path / "delta")
    assert_unchanged(ours, state, {}, out, batch)


def test_loading_under_a_taken_name_changes_nothing(fresh, batch, saved_lora):
    ours = fresh.ours("cls")
    delta.attach(ours, delta.IA3Config(init=False), "taken")
    state, out = _state(ours), outputs(ours, batch)
    with pytest.raises(delta.DeltaError, match="already attached"):
        delta.load_delta(ours, saved_lora, "taken")
    assert_unchanged(ours, state, {"taken": "ia3"}, out, batch)
