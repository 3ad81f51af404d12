"""GGUF: block dequantization bit for bit against ``gguf.quants``, the checkpoint mapping, the writer round
trip, bad files; and on the real SmolLM2 file, tokenizer, chat template and logits against ``transformers``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from deltaformer.checkpoints.gguf import GGUFCheckpoint, find_gguf, permute_rotary, unpermute_rotary
from deltaformer.checkpoints.gguf_writer import save_gguf
from deltaformer.config import LlamaConfig
from deltaformer.errors import CheckpointError
from deltaformer.models import LlamaForCausalLM
from deltaformer.quant.gguf_blocks import SUPPORTED_TYPES, dequantize
from deltaformer.tokenizer import AutoTokenizer

QUANTIZABLE = ["BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]  # gguf.quants can pack these
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]  # unpack only: random blocks with finite scales
_SCALE_BYTES = {"Q2_K": [(80, 84)], "Q3_K": [(108, 110)], "Q4_K": [(0, 4)], "Q5_K": [(0, 4)], "Q6_K": [(208, 210)]}


def _random_k_blocks(kind: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]][1]
    blocks = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for start, stop in _SCALE_BYTES[kind]:
        scales = rng.normal(0, 0.05, size=(n_blocks, (stop - start) // 2)).astype(np.float16)
        blocks[:, start:stop] = scales.view(np.uint8)
    return blocks


@pytest.mark.parametrize("kind", QUANTIZABLE + K_QUANTS + ["F16", "F32"])
def test_dequantize_equals_gguf_bit_for_bit(kind):
    rng = np.random.default_rng(0)
    qtype = GGMLQuantizationType[kind]
    rows, cols = 6, 512
    if kind in K_QUANTS:
        packed = _random_k_blocks(kind, rows * cols // 256, rng).reshape(rows, -1)
    else:
        weights = rng.normal(0, 1, size=(rows, cols)).astype(np.float32)
        weights[0, :32] = 0.0  # an all-zero block (scale 0)
        packed = quants.quantize(weights, qtype)
    expected = quants.dequantize(packed, qtype).reshape(rows, cols)
    ours = dequantize(packed, qtype, (rows, cols))
    assert ours.dtype == torch.float32
    assert torch.equal(ours.view(torch.int32), torch.from_numpy(np.ascontiguousarray(expected)).view(torch.int32))
    assert torch.equal(dequantize(torch.from_numpy(packed.view(np.uint8).copy()), kind, (rows, cols)), ours)


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "Q6_K", "F16", "F32"])
def test_dequantize_in_chunks_into_out(kind, monkeypatch):
    """Unpacking a few blocks at a time, into a given tensor, gives the same bits as one pass."""
    from deltaformer.quant import gguf_blocks

    rng = np.random.default_rng(1)
    qtype = GGMLQuantizationType[kind]
    packed = (_random_k_blocks(kind, 12, rng) if kind in K_QUANTS
              else quants.quantize(rng.normal(0, 1, size=(6, 512)).astype(np.float32), qtype))
    whole = dequantize(packed, qtype, (6, 512))
    monkeypatch.setattr(gguf_blocks, "CHUNK_WEIGHTS", 300)  # not a multiple of any block size
    out = torch.full((6, 512), float("nan"))
    assert dequantize(packed, qtype, (6, 512), out=out) is out
    assert torch.equal(out.view(torch.int32), whole.view(torch.int32))
    with pytest.raises(CheckpointError, match="cannot unpack"):
        dequantize(packed, qtype, (6, 512), out=torch.empty(6, 511))


def test_every_type_gguf_reads_is_covered():
    assert {t.name for t in SUPPORTED_TYPES} >= set(QUANTIZABLE + K_QUANTS + ["F16", "F32"])


def test_unsupported_or_truncated_blocks_are_one_line_errors():
    with pytest.raises(CheckpointError, match="IQ2_XXS is not supported"):
        dequantize(np.zeros(66, np.uint8), GGMLQuantizationType.IQ2_XXS, (256,))
    with pytest.raises(CheckpointError, match="unknown GGUF tensor type"):
        dequantize(np.zeros(34, np.uint8), "Q9_9", (32,))
    packed = quants.quantize(np.ones((2, 64), np.float32), GGMLQuantizationType.Q8_0)
    with pytest.raises(CheckpointError, match="truncated"):
        dequantize(packed.reshape(-1)[:-1], "Q8_0", (2, 64))


def test_rotary_permutation_round_trips():
    w = torch.randn(4 * 8, 5)
    assert torch.equal(unpermute_rotary(permute_rotary(w, 4), 4), w)
    assert not torch.equal(permute_rotary(w, 4), w)


def _tiny_llama(**overrides) -> LlamaForCausalLM:
    settings = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5,
                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(LlamaConfig(**{**settings, **overrides})).eval()


@pytest.mark.parametrize("tensor_type, atol", [("F32", 0.0), ("F16", 1e-2), ("Q8_0", 5e-2), ("Q4_1", 0.5)])
def test_save_gguf_round_trips(tmp_path, tensor_type, atol):
    model = _tiny_llama()
    with torch.no_grad():  # a fine-tuned model: weights that are not the init's
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = save_gguf(model, tmp_path / "tiny.gguf", tensor_type)
    loaded = LlamaForCausalLM.from_pretrained(path)
    assert loaded.config.num_key_value_heads == 2 and not loaded.config.tie_word_embeddings
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ours, back = model(ids).logits, loaded(ids).logits
    assert (ours - back).abs().max().item() <= atol
    types = set(GGUFCheckpoint(path).tensor_types().values())
    assert tensor_type in types and (types <= {tensor_type, "F32"})


def test_save_gguf_matches_transformers_loader(tmp_path):
    """Our writer's file in transformers' GGUF loader gives our logits: names, shapes, permutation agree."""
    transformers = pytest.importorskip("transformers")
    model = _tiny_llama(tie_word_embeddings=True)
    save_gguf(model, tmp_path / "tiny.gguf", "F32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-5, rtol=0)


def _reader_metadata(path):
    from gguf import GGUFReader

    reader = GGUFReader(path)
    metadata = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, tuple(reversed(t.shape.tolist())), int(t.data_offset), int(t.n_bytes))
               for t in reader.tensors}
    return metadata, tensors


def _our_metadata(path):
    from deltaformer.checkpoints.gguf import parse_header

    metadata, infos = parse_header(path)
    return metadata, {n: (t.type.name, t.shape, t.offset, t.nbytes) for n, t in infos.items()}


def test_header_parser_equals_gguf_reader(tmp_path):
    """Our one-pass header parser reads what ``gguf.GGUFReader`` reads: every metadata value and tensor."""
    import gguf

    model = _tiny_llama()
    tok_path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(tok_path, "llama")
    writer.add_array("tokenizer.ggml.tokens", ["a", "ĠbÃ©", "<|im_end|>", ""])
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.25, 3.0, 0.0])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_float64("test.f64", 1e-300)
    writer.add_int64("test.i64", -(2**40))
    writer.add_bool("test.flag", True)
    writer.add_custom_alignment(64)
    writer.add_tensor("token_embd.weight", model.backbone.embeddings.tokens.weight.detach().numpy())
    writer.add_tensor("output_norm.weight", np.arange(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours, theirs = _our_metadata(tok_path), _reader_metadata(tok_path)
    assert ours[0].pop("test.nested") == [[1, 2], [3]]  # gguf's reader flattens arrays of arrays (its FIXME)
    assert theirs[0].pop("test.nested") == [1, 2, 3]
    assert ours == theirs
    path = save_gguf(model, tmp_path / "tiny.gguf", "Q4_1")
    assert _our_metadata(path) == _reader_metadata(path)


def test_loading_writes_each_weight_once_and_initialises_only_missing_ones(tmp_path):
    """Built without init, filled in place: the load equals the tensors; a head the file lacks is initialised
    the same way under the same seed (and not left as garbage)."""
    from deltaformer.models import LlamaForSequenceClassification

    model = _tiny_llama()
    path = save_gguf(model, tmp_path / "tiny.gguf", "Q8_0")
    checkpoint = GGUFCheckpoint(path)
    loaded = LlamaForCausalLM.from_pretrained(path)
    hf = dict(loaded.hf_state_dict())
    for name, tensor in checkpoint.hf_tensors():
        assert torch.equal(hf[name], tensor), name
    heads = []
    for _ in range(2):
        torch.manual_seed(3)
        heads.append(LlamaForSequenceClassification.from_pretrained(path, num_labels=3, log_report=False)
                     .score.weight.detach())
    assert torch.equal(heads[0], heads[1]) and torch.isfinite(heads[0]).all()
    assert 0.5 * 0.02 < heads[0].std().item() < 2 * 0.02  # normal(0, initializer_range)


def test_bad_gguf_files(tmp_path):
    good = save_gguf(_tiny_llama(), tmp_path / "good.gguf", "F32")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        LlamaForCausalLM.from_pretrained(cut)
    header_cut = tmp_path / "header_cut.gguf"
    header_cut.write_bytes(good.read_bytes()[:200])  # inside the metadata
    with pytest.raises(CheckpointError, match=r"not a readable GGUF file \(the header ends at byte 200"):
        LlamaForCausalLM.from_pretrained(header_cut)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        GGUFCheckpoint(junk)
    with pytest.raises(CheckpointError, match="save_gguf writes Llama"):
        from deltaformer.config import GPT2Config
        from deltaformer.models import GPT2LMHeadModel

        save_gguf(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)), tmp_path / "g.gguf")
    both = tmp_path / "two"
    both.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (both / name).write_bytes(good.read_bytes())
    with pytest.raises(CheckpointError, match="2 GGUF files"):
        find_gguf(both)


def test_unsupported_architecture(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "mamba.gguf", "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="'mamba' model; deltaformer reads GGUF files of llama"):
        LlamaForCausalLM.from_pretrained(tmp_path / "mamba.gguf")


# --- the real file: SmolLM2-135M-Instruct, Q4_1 -------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_file():
    from deltaformer.data.assets import resolve_model_path

    return find_gguf(resolve_model_path("smollm2-135m"))


@pytest.mark.assets
@pytest.mark.slow
def test_smollm2_header_parser_equals_gguf_reader(smollm_file):
    assert _our_metadata(smollm_file) == _reader_metadata(smollm_file)


@pytest.mark.assets
@pytest.mark.slow
def test_smollm2_tokenizer_and_chat_template_equal_transformers(smollm_file):
    transformers = pytest.importorskip("transformers")
    from deltaformer.data.tasks import load_task

    hf = transformers.AutoTokenizer.from_pretrained(smollm_file.parent, gguf_file=smollm_file.name)
    ours = AutoTokenizer.from_pretrained("smollm2-135m")
    sentences = [ex.text for ex in load_task("rt-polarity").split("train")[:300]]
    sentences[:3] = ["<|im_start|>user\nhi<|im_end|>", "  two  spaces\tand tab\n", "naïve café — 2024's 12345"]
    assert [ours.encode(s) for s in sentences] == [hf.encode(s) for s in sentences]
    assert ours.decode(ours.encode(sentences[5])) == hf.decode(hf.encode(sentences[5]))
    for messages in ([{"role": "user", "content": "What is the capital of France?"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]):
        for prompt in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False) == \
                hf.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == \
                list(hf.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True,
                                            return_dict=False))


@pytest.mark.assets
@pytest.mark.slow
def test_smollm2_logits_equal_transformers_gguf_loader(smollm_file):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm_file.parent, gguf_file=smollm_file.name,
                                                           dtype=torch.float32).eval()
    ours = LlamaForCausalLM.from_pretrained("smollm2-135m")
    assert ours.num_parameters() == hf.num_parameters() == 134_515_008
    tok = AutoTokenizer.from_pretrained("smollm2-135m")
    batch = tok(["The capital of France is", "a gripping, funny and moving film about two brothers"],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        mine = ours(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["attention_mask"].bool()
    assert (theirs[keep] - mine[keep]).abs().max().item() < 1e-4


# --- packed GGUF layers ---------------------------------------------------------------------------------------

PACKED = ["Q8_0", "Q4_0", "Q4_1"]


@pytest.mark.parametrize("kind", PACKED + ["Q5_1", "F16"])
def test_gguf_linear_rows_equal_gguf_bit_for_bit_and_forward_equals_dense(kind):
    from deltaformer.quant.gguf_linear import GGUFLinear

    torch.manual_seed(0)
    dense = torch.nn.Linear(512, 300)  # 300 rows: two blocks of rows, the last one short
    layer = GGUFLinear.from_linear(dense, kind)
    expected = quants.dequantize(layer.packed.numpy(), GGMLQuantizationType[kind]).reshape(300, 512)
    weight = layer.dequantize()
    assert torch.equal(weight.view(torch.int32), torch.from_numpy(np.ascontiguousarray(expected)).view(torch.int32))
    assert torch.equal(layer.rows(7, 290), weight[7:290]) and torch.equal(layer.weight, weight)
    assert layer.scheme == kind.lower() and not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(3, 5, 512, requires_grad=True)
    y = layer(x)
    reference = torch.nn.functional.linear(x, weight, dense.bias.detach())
    torch.testing.assert_close(y, reference, atol=1e-5, rtol=0)
    grad = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, x, grad)
    (want,) = torch.autograd.grad(reference, x, grad)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_gguf_embedding_and_bad_packed_shapes():
    from deltaformer.errors import QuantError
    from deltaformer.quant.gguf_linear import GGUFEmbedding, GGUFLinear, pack_rows

    table = torch.randn(40, 64)
    packed = pack_rows(table, "Q8_0")
    embedding = GGUFEmbedding(packed, "Q8_0", 64)
    ids = torch.tensor([[3, 0, 39], [3, 3, 7]])
    assert torch.equal(embedding(ids), torch.nn.functional.embedding(ids, embedding.dequantize()))
    head = GGUFLinear.tied(embedding)
    assert head.packed_rows is embedding.packed and "packed" not in head.state_dict()
    with pytest.raises(QuantError, match="do not fill whole Q4_1 blocks"):
        GGUFLinear(torch.zeros(4, 20, dtype=torch.uint8), "Q4_1", 48)
    with pytest.raises(QuantError, match=r"must be a \(rows, 40\) uint8"):
        GGUFLinear(torch.zeros(4, 20, dtype=torch.uint8), "Q4_1", 64)
    with pytest.raises(QuantError, match="F32 cannot be kept packed"):
        GGUFLinear(torch.zeros(4, 256, dtype=torch.uint8), "F32", 64)


@pytest.mark.parametrize("tensor_type, tied", [("Q4_1", False), ("Q8_0", True), ("F16", False)])
def test_keep_packed_load_equals_fp32_load(tmp_path, tensor_type, tied):
    from deltaformer.quant.gguf_linear import GGUFEmbedding, GGUFLinear

    model = _tiny_llama(tie_word_embeddings=tied)
    path = save_gguf(model, tmp_path / "tiny.gguf", tensor_type)
    dense = LlamaForCausalLM.from_pretrained(path)
    packed = LlamaForCausalLM.from_pretrained(path, keep_packed=True)
    layers = dict(dense.named_modules())
    kinds = [type(m) for m in packed.modules()]
    assert kinds.count(GGUFLinear) == 2 * 7 + 1 and kinds.count(GGUFEmbedding) == 1
    for name, module in packed.named_modules():
        if isinstance(module, GGUFLinear | GGUFEmbedding):
            assert torch.equal(module.dequantize(), layers[name].weight), name
    assert isinstance(packed.lm_head, GGUFLinear) and (packed.lm_head.packed_rows is
                                                       packed.backbone.embeddings.tokens.packed) == tied
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)
    with pytest.raises(CheckpointError, match="keep_packed=True needs a GGUF file"):
        LlamaForCausalLM.from_pretrained(dense.save_pretrained(tmp_path / "hf"), keep_packed=True)


@pytest.mark.assets
@pytest.mark.slow
def test_smollm2_packed_load_equals_fp32_load(smollm_file):
    from deltaformer.quant.gguf_linear import GGUFEmbedding, GGUFLinear

    dense = LlamaForCausalLM.from_pretrained("smollm2-135m")
    packed = LlamaForCausalLM.from_pretrained("smollm2-135m", keep_packed=True)
    layers = dict(dense.named_modules())
    checked = 0
    for name, module in packed.named_modules():
        if isinstance(module, GGUFLinear | GGUFEmbedding):
            assert torch.equal(module.dequantize().view(torch.int32), layers[name].weight.view(torch.int32)), name
            checked += 1
    assert checked == 30 * 7 + 2
    tok = AutoTokenizer.from_pretrained("smollm2-135m")
    batch = tok(["The capital of France is", "a gripping, funny and moving film about two brothers"],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = packed(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reference = dense(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["attention_mask"].bool()
    assert (ours[keep] - reference[keep]).abs().max().item() < 1e-4


_PEAK_SCRIPT = """
import json, sys
from deltaformer.models import LlamaForCausalLM

def status(field):  # KiB; VmHWM is this process's own peak (ru_maxrss would carry the parent's across exec)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

import torch, deltaformer.quant.files, deltaformer.quant.gguf_linear  # what the load imports or starts lazily
torch.randn(512, 512).mm(torch.randn(512, 512)).argsort(dim=-1)  # torch's thread pool and per-thread buffers
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current resident set
model = LlamaForCausalLM.from_pretrained(sys.argv[1], keep_packed=sys.argv[2] == "packed")
print(json.dumps({"load_peak": 1024 * (status("VmHWM") - before), "fp32": 4 * model.num_parameters()}))
"""


@pytest.mark.assets
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp32", "packed"])
def test_smollm2_load_peak_memory(smollm_file, mode):
    """Peak RSS of a load (fresh process, above what it held before): fp32 at most the fp32 model plus its largest
    tensor; packed at most 1.3x the file."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(smollm_file), mode], capture_output=True,
                         text=True, env=env, check=True, timeout=600).stdout
    result = json.loads(out.strip().splitlines()[-1])
    largest = max(4 * int(np.prod(t.shape)) for t in GGUFCheckpoint(smollm_file).tensor_infos().values())
    limit = result["fp32"] + largest if mode == "fp32" else 1.3 * smollm_file.stat().st_size
    assert result["load_peak"] <= limit, (result, limit)


def test_deferred_init_records_in_its_thread_only():
    import threading

    from deltaformer.checkpoints.gguf import deferred_init

    original = torch.nn.init.normal_
    other: list[torch.Tensor] = []
    with deferred_init() as calls:
        torch.manual_seed(0)
        mine = torch.nn.Linear(4, 3)
        worker = threading.Thread(target=lambda: other.append(torch.nn.init.normal_(torch.zeros(50))))
        worker.start()
        worker.join()
        with deferred_init() as inner:
            torch.nn.Embedding(5, 2)
    assert torch.nn.init.normal_ is original
    assert other[0].std() > 0.5  # the other thread's init ran
    assert [c.fn.__name__ for c in calls] == ["kaiming_uniform_", "uniform_"] and len(inner) == 1
    calls[0].replay()
    assert mine.weight.abs().max() <= 0.5 and mine.weight.std() > 0  # kaiming bound 1/sqrt(4)


@pytest.mark.parametrize("tied", [False, True])
def test_save_gguf_of_a_packed_load(tmp_path, tied):
    """A packed load saved in its own type is the file's tensors byte for byte; in another type, its weights."""
    model = _tiny_llama(tie_word_embeddings=tied)
    path = save_gguf(model, tmp_path / "a.gguf", "Q4_1")
    packed = LlamaForCausalLM.from_pretrained(path, keep_packed=True)
    again = save_gguf(packed, tmp_path / "b.gguf", "Q4_1")
    first, second = GGUFCheckpoint(path), GGUFCheckpoint(again)
    assert first.tensor_types() == second.tensor_types()
    for name in first.tensor_infos():
        assert torch.equal(first.raw(name).data, second.raw(name).data), name
    wide = LlamaForCausalLM.from_pretrained(save_gguf(packed, tmp_path / "c.gguf", "F32"))
    dense = LlamaForCausalLM.from_pretrained(path)
    for (name, mine), (_, theirs) in zip(wide.hf_state_dict().items(), dense.hf_state_dict().items(), strict=True):
        assert torch.equal(mine, theirs), name
