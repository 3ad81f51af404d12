"""Every delta method on GPT-2 and Llama: it changes the output, trains only its own parameters, routes per
sample (each sample as if alone), survives incremental decoding; LoRA files round-trip with peft on Llama."""

from __future__ import annotations

import pytest
import torch

from deltaformer import delta
from deltaformer.config import GPT2Config, LlamaConfig
from deltaformer.models import GPT2LMHeadModel, LlamaForCausalLM

ATOL = 1e-5
VOCAB = 99

METHODS = {
    "lora": lambda: delta.LoraConfig(r=4),
    "ia3": lambda: delta.IA3Config(),
    "bitfit": lambda: delta.BitFitConfig(),
    "adapter": lambda: delta.AdapterConfig(),
    "prefix": lambda: delta.PrefixConfig(),
    "ptuning2": lambda: delta.PTuningV2Config(),
    "prompt": lambda: delta.PromptConfig(),
    "ptuning": lambda: delta.PTuningConfig(),
}


def make(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                            initializer_range=0.1)).eval()
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      initializer_range=0.1)).eval()


def attach(model, method: str, name: str) -> None:
    """Attach a fresh delta and move every delta parameter off its identity init, so it visibly acts."""
    delta.attach(model, METHODS[method](), name)
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in model._base_ids:
                p.add_(0.2 * torch.randn_like(p))


def real_rows(logits: torch.Tensor, mask: torch.Tensor, keep: int) -> list[torch.Tensor]:
    """Per row, the logits of its last ``keep`` real positions (soft tokens come first, padding last)."""
    return [row[m.bool()][-keep:] for row, m in zip(logits, mask)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_attaches_trains_and_routes_per_sample(arch, method):
    model = make(arch)
    model._base_ids = {id(p) for p in model.parameters()}
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        base = model(ids).logits
    attach(model, method, "a")
    attach(model, method, "b")
    delta.freeze_base(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable, f"{method} trains nothing on {arch}"
    assert not any(id(p) in model._base_ids for p in model.parameters() if p.requires_grad)
    delta.set_active(model, "a")
    out = model(ids, labels=ids)
    out.loss.backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        assert not torch.allclose(real_rows(out.logits, out.attention_mask if out.attention_mask is not None
                                            else torch.ones(2, out.logits.shape[1]), 7)[0], base[0], atol=1e-3)
        alone = {}
        for name in ("a", "b", None):
            for row in range(2):
                if name is None:
                    with delta.bare(model):
                        o = model(ids[row:row + 1])
                else:
                    delta.set_active(model, name)
                    o = model(ids[row:row + 1])
                mask = o.attention_mask if o.attention_mask is not None else torch.ones(1, o.logits.shape[1])
                alone[name, row] = real_rows(o.logits, mask, 7)[0]
        for names in (["a", "b"], ["b", None], [None, "a"]):
            with delta.route(model, names):
                o = model(ids, attention_mask=torch.ones(2, 7, dtype=torch.long))
            for row, name in enumerate(names):
                got = real_rows(o.logits, o.attention_mask, 7)[row]
                torch.testing.assert_close(got, alone[name, row], atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["prefix", "prompt", "lora"])
def test_decoding_with_cache_under_a_delta_equals_the_full_forward(method):
    model = make("llama")
    model._base_ids = {id(p) for p in model.parameters()}
    attach(model, method, "a")
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = model.new_cache(2, 40)
        first = model(ids[:, :6], attention_mask=mask[:, :6], cache=cache)
        seen = first.attention_mask if first.attention_mask is not None else mask[:, :6]
        steps = [first.logits]
        for t in range(6, 9):
            seen = torch.cat([seen, mask[:, t:t + 1]], 1)
            steps.append(model(ids[:, t:t + 1], attention_mask=seen, cache=cache).logits)
        stepped = torch.cat(steps, 1)
        real = (full.attention_mask if full.attention_mask is not None else mask).bool()
        torch.testing.assert_close(stepped[real], full.logits[real], atol=ATOL, rtol=0)


def test_peft_lora_on_transformers_llama_loads_here_and_ours_loads_in_peft(tmp_path):
    import peft
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    theirs.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, VOCAB, (2, 9))
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    delta.load_delta(ours, tmp_path / "peft", name="p")
    with torch.no_grad():
        expected = theirs.eval()(ids).logits
        got = ours(ids).logits
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        assert (got - ours.eval()(ids).logits).abs().max() == 0
        with delta.bare(ours):
            assert (ours(ids).logits - expected).abs().max() > 1e-3  # the adapter acts
    with torch.no_grad():  # ours, trained further, written back for peft
        for name, p in ours.named_parameters():
            if "lora" in name.lower() and p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        mine = ours(ids).logits
    delta.save_delta(ours, tmp_path / "ours", "p")
    back = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                          tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, mine, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["prefix", "prompt", "ptuning2", "lora"])
def test_routed_left_padded_batch_equals_each_sample_alone(method):
    model = make("llama")
    model._base_ids = {id(p) for p in model.parameters()}
    attach(model, method, "a")
    ids = torch.randint(3, VOCAB, (3, 8))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :1] = 0
    names = ["a", None, "a"]
    with torch.no_grad():
        with delta.route(model, names):
            batch = model(ids, attention_mask=mask)
        for row, name in enumerate(names):
            own = ids[row][mask[row].bool()][None]
            if name is None:
                with delta.bare(model):
                    alone = model(own)
            else:
                delta.set_active(model, name)
                alone = model(own)
            n = own.shape[1]
            alone_mask = alone.attention_mask if alone.attention_mask is not None else torch.ones(1, n)
            torch.testing.assert_close(real_rows(batch.logits, batch.attention_mask, n)[row],
                                       real_rows(alone.logits, alone_mask, n)[0], atol=ATOL, rtol=0)
