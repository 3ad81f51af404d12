"""The server on the real SmolLM2-135M-Instruct (its GGUF asset): chat through the model's own template,
with a LoRA delta beside the bare model in one batch, equal to offline ``generate``."""

from __future__ import annotations

import concurrent.futures

import openai
import pytest
import torch

from deltaformer import delta
from deltaformer.generation import GenerationConfig, generate
from deltaformer.models.auto import load_model
from deltaformer.serving.server import BackgroundServer
from deltaformer.serving.service import Service
from deltaformer.serving.settings import ServeConfig
from deltaformer.tokenizer import AutoTokenizer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
@pytest.mark.assets
def test_smollm2_chat_with_and_without_a_delta(tmp_path):
    model = load_model("smollm2-135m").eval()
    tokenizer = AutoTokenizer.from_pretrained("smollm2-135m")
    torch.manual_seed(0)
    delta.attach(model, delta.LoraConfig(r=4, targets=("query", "value"), init=False), "lora")
    with torch.no_grad():  # a delta strong enough to change the answer
        for p in delta.delta_parameters(model):
            p.normal_(0, 0.2)
    delta.save_delta(model, tmp_path / "lora", "lora")
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True)
    config = GenerationConfig(max_new_tokens=8)
    want = {name: tokenizer.decode(generate(model, torch.tensor([ids]), config=config, deltas=[name])[0, len(ids):],
                                   skip_special_tokens=True) for name in (None, "lora")}
    delta.detach(model, "lora")
    service = Service(model, tokenizer, ServeConfig(port=0, max_tokens_limit=64), "smollm2")
    service.registry.add("lora", tmp_path / "lora", trusted=True)
    with BackgroundServer(service) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)

        def ask(model_name: str) -> str:
            answer = client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=8,
                                                    temperature=0)
            return answer.choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            bare, tuned = pool.map(ask, ["smollm2", "smollm2:lora"])
    assert "Paris" in bare
    assert (bare, tuned) == (want[None], want["lora"])
    assert tuned != bare
