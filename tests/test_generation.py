"""Generation equals ``transformers``' ``generate`` (greedy, beam, sampled under a seed) on random GPT-2 and
Llama models; processors equal HF's warpers; DecodeState rows equal solo runs however rows come and go;
stop strings, streaming and bad input."""

from __future__ import annotations

import pytest
import torch

from deltaformer.errors import ConfigError, InputError
from deltaformer.generation import DecodeState, GenerationConfig, IncrementalText, generate, stream_text
from deltaformer.generation import processors as P

from .test_decoders import make_hf, ours_for

NEW = 64


def _hf_generate(hf, ids, mask, **settings):
    """HF ``generate`` with every processor we do not model switched off."""
    return hf.generate(ids, attention_mask=mask, min_length=0, no_repeat_ngram_size=0, bad_words_ids=None,
                       suppress_tokens=None, begin_suppress_tokens=None, num_return_sequences=1,
                       **{"do_sample": False, "repetition_penalty": 1.0, **settings})


def _left_padded(lengths=(7, 4, 2), vocab=99, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n:] = 1
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    hf, path = make_hf(tmp_path_factory.mktemp(request.param), request.param, initializer_range=0.5,
                       **({"n_positions": 128} if request.param == "gpt2" else {"max_position_embeddings": 128}))
    return hf, ours_for(request.param).from_pretrained(path).eval()


def test_greedy_and_beam_match_transformers(pair):
    hf, ours = pair
    ids, mask = _left_padded()
    cases = [dict(num_beams=1), dict(num_beams=3, length_penalty=1.0, early_stopping=False),
             dict(num_beams=2, length_penalty=0.5, early_stopping="never"),
             dict(num_beams=3, length_penalty=2.0, early_stopping=True), dict(num_beams=2, repetition_penalty=0.8)]
    for settings in cases:
        expected = _hf_generate(hf, ids, mask, max_new_tokens=NEW, **settings)
        got = generate(ours, ids, mask, max_new_tokens=NEW, **settings)
        assert got.tolist() == expected.tolist(), settings
    # an eos that random weights hit early: rows finish at different steps and are padded as HF pads them
    eos = int(generate(ours, ids, mask, max_new_tokens=3)[1, -2])
    for beams in (1, 3):
        expected = _hf_generate(hf, ids, mask, max_new_tokens=NEW, eos_token_id=eos, num_beams=beams)
        got = generate(ours, ids, mask, max_new_tokens=NEW, eos_token_id=eos, num_beams=beams)
        assert got.tolist() == expected.tolist(), beams


def test_sampling_matches_transformers_under_a_seed(pair):
    hf, ours = pair
    ids, mask = _left_padded(lengths=(5,))
    cases = [dict(temperature=0.7, top_k=0), dict(top_k=5, min_p=0.2), dict(top_k=0, top_p=0.8),
             dict(temperature=1.5, top_k=20, top_p=0.9, repetition_penalty=1.2)]
    for settings in cases:
        torch.manual_seed(7)
        expected = _hf_generate(hf, ids, mask, max_new_tokens=24, do_sample=True, **settings)
        got = generate(ours, ids, mask, max_new_tokens=24, do_sample=True, seed=7, **settings)
        assert got.tolist() == expected.tolist(), settings


def test_processors_equal_transformers_warpers():
    from transformers.generation import logits_process as hf

    scores = torch.randn(4, 50) * 3
    ids = torch.randint(0, 50, (4, 9))
    rows = 4

    def col(v, dtype=torch.float32):
        return torch.full((rows,), v, dtype=dtype)

    for k in (1, 5, 50, 80):
        torch.testing.assert_close(P.top_k_filter(scores, col(k, torch.long)),
                                   hf.TopKLogitsWarper(k)(ids, scores), atol=0, rtol=0)
    for p in (0.1, 0.5, 0.95):
        torch.testing.assert_close(P.top_p_filter(scores, col(p)), hf.TopPLogitsWarper(p)(ids, scores), atol=0, rtol=0)
    for m in (0.05, 0.3):
        torch.testing.assert_close(P.min_p_filter(scores, col(m)), hf.MinPLogitsWarper(m)(ids, scores), atol=0, rtol=0)
    for penalty in (0.7, 1.4):
        expected = hf.RepetitionPenaltyLogitsProcessor(penalty)(ids, scores.clone())
        got = P.repetition_penalty(scores, P.seen_tokens(ids, None, 50), col(penalty))
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    # per-row settings: each row filtered as it would be alone
    ks = torch.tensor([0, 3, 7, 50])
    mixed = P.top_k_filter(scores, ks)
    for row, k in enumerate(ks.tolist()):
        alone = scores[row:row + 1] if k == 0 else hf.TopKLogitsWarper(k)(ids[row:row + 1], scores[row:row + 1])
        assert torch.equal(mixed[row:row + 1], alone)


def test_decode_state_rows_equal_solo_runs_as_rows_come_and_go(pair):
    _, ours = pair
    prompts = [[5, 9, 11, 40, 2 + 3], [17, 8], [60, 61, 62, 63, 64, 65, 66, 67, 68], [33]]
    configs = [GenerationConfig(max_new_tokens=12), GenerationConfig(max_new_tokens=20, do_sample=True, seed=3,
                                                                     top_k=10, repetition_penalty=1.2),
               GenerationConfig(max_new_tokens=9), GenerationConfig(max_new_tokens=15, do_sample=True, seed=5)]
    alone = []
    for prompt, config in zip(prompts, configs):
        out = generate(ours, torch.tensor([prompt]), config=config)
        alone.append(out[0, len(prompt):].tolist())
    state = DecodeState(ours, capacity=3, max_length=64)
    rows = state.add(prompts[:2], configs[:2])
    got: dict[int, list[int]] = {r: [] for r in rows}
    finished: dict[int, str] = {}
    for step in range(40):
        if step == 3:  # a longer prompt joins rows already decoding
            rows += state.add([prompts[2]], [configs[2]])
            got[rows[-1]] = []
        if step == 5:
            with pytest.raises(InputError, match="capacity"):
                state.add([prompts[3]], [configs[3]])
        if step == 14:  # a slot is free by now
            rows += state.add([prompts[3]], [configs[3]])
            got[rows[-1]] = []
        for event in state.step():
            got[event.row].append(event.token)
            if event.finished:
                finished[event.row] = event.finished
    assert len(state) == 0
    assert [got[r] for r in rows] == [a[:len(got[r])] for r, a in zip(rows, alone)]
    assert [len(got[r]) for r in rows] == [12, 20, 9, 15] and set(finished.values()) == {"length"}
    # remove() drops a row at once
    state = DecodeState(ours, capacity=2, max_length=64)
    a, b = state.add(prompts[:2], configs[:2])
    state.step()
    state.remove([a])
    assert state.rows == [b] and [e.row for e in state.step()] == [b]


def _tokenizer_and_model(tmp_path):
    import transformers

    from deltaformer.models import GPT2LMHeadModel
    from deltaformer.tokenizer import train_tokenizer

    text = ["the cat sat on the mat", "a dog ran to the park and back", "é à ü ö letters and words"] * 20
    tokenizer = train_tokenizer(text, kind="bpe", vocab_size=300, min_frequency=1)
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                     initializer_range=0.5, eos_token_id=tokenizer.eos_token_id,
                                     bos_token_id=tokenizer.bos_token_id)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    return tokenizer, GPT2LMHeadModel.from_pretrained(tmp_path).eval()


def test_streaming_and_stop_strings(tmp_path):
    tokenizer, model = _tokenizer_and_model(tmp_path)
    prompt = "the cat"
    ids = tokenizer.encode(prompt)
    full = generate(model, torch.tensor([ids]), max_new_tokens=30, eos_token_id=[])[0, len(ids):].tolist()
    text = tokenizer.decode(full, skip_special_tokens=True)
    pieces = list(stream_text(model, tokenizer, prompt, max_new_tokens=30, eos_token_id=[]))
    assert "".join(pieces) == text and len(pieces) > 1
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = text[:text.index(stop)]
    assert "".join(stream_text(model, tokenizer, prompt, max_new_tokens=30, eos_token_id=[],
                               stop_strings=[stop])) == cut
    stopped = generate(model, torch.tensor([ids]), max_new_tokens=30, eos_token_id=[], stop_strings=[stop],
                       tokenizer=tokenizer)[0, len(ids):].tolist()
    assert stopped == full[:len(stopped)] and stop in tokenizer.decode(stopped) and len(stopped) < len(full)
    # a multi-byte character split over tokens is never shown half-made
    stream = IncrementalText(tokenizer)
    pieces = [stream.push(t) for t in tokenizer.encode("é à ü")] + [stream.flush()]
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) == "é à ü"


def test_bad_input_is_a_clear_error(pair):
    _, ours = pair
    ids = torch.randint(3, 99, (1, 5))
    for bad, match in [(dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"),
                       (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
                       (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(tempreature=1.0), "tempreature"),
                       (dict(num_beams=2, do_sample=True), "beam sampling")]:
        with pytest.raises(ConfigError, match=match):
            generate(ours, ids, **bad)
    long = torch.randint(3, 99, (1, 120))
    with pytest.raises(InputError, match="context window is 128"):
        generate(ours, long, max_new_tokens=10)
    truncated = generate(ours, long, max_new_tokens=10, truncate_prompt=True)
    assert truncated.shape == (1, 128)
    assert truncated.tolist() == generate(ours, long[:, -118:], max_new_tokens=10).tolist()


def _with_deltas(model, extra: str | None = None):
    """``model`` with one delta of each kind a batch can mix (plus ``extra``), every parameter non-zero."""
    from deltaformer import delta

    configs = {"lora": delta.LoraConfig(r=4), "ia3": delta.IA3Config(), "adapter": delta.AdapterConfig(),
               "bitfit": delta.BitFitConfig()}
    more = {"prefix": delta.PrefixConfig(num_virtual_tokens=3), "prompt": delta.PromptConfig(num_virtual_tokens=2)}
    if extra is not None:
        configs[extra] = more[extra]
    for name, config in configs.items():
        delta.attach(model, config, name)
    torch.manual_seed(4)
    with torch.no_grad():
        for p in delta.delta_parameters(model):
            p.add_(torch.randn_like(p) * 0.3)
    return model, list(configs)


def _recomputed(model, prompt, name, new, seed=None, **settings):
    """The oracle: no cache, the whole sequence through the model with only delta ``name`` at every step."""
    from deltaformer import delta
    from deltaformer.generation.processors import RowSettings, choose, process, seen_tokens
    from deltaformer.generation.state import row_generator

    config = GenerationConfig(max_new_tokens=new, seed=seed, **settings)
    rows = RowSettings.of([config], torch.device("cpu"))
    generators = [row_generator(seed, torch.device("cpu")) if config.sampling else None]
    ids = list(prompt)
    with torch.no_grad(), delta.route(model, [name]):
        for _ in range(new):
            logits = model(torch.tensor([ids])).logits[:, -1].float()
            scores = process(logits, rows, seen_tokens(torch.tensor([ids]), None, logits.shape[-1]))
            ids.append(int(choose(scores, rows, generators)[0]))
    return ids[len(prompt):]


@pytest.mark.parametrize("family,extra", [("gpt2", None), ("llama", None),
                                          ("llama", "prefix"), ("gpt2", "prompt")])
def test_each_prompt_its_own_delta_in_one_batch(tmp_path, family, extra):
    _, path = make_hf(tmp_path, family, initializer_range=0.5)
    model, names = _with_deltas(ours_for(family).from_pretrained(path).eval(), extra)
    routes = [*names, None, "lora"]
    prompts = [[5, 9, 11, 40], [17, 8], [60, 61, 62, 63, 64, 65], [33, 34, 35], [70, 71, 72, 73, 74], [7, 6, 5],
               [9, 10]][:len(routes)]
    ids, mask = _left_padded_lists(prompts)
    greedy = []
    for settings in (dict(), dict(do_sample=True, seed=11, top_k=0)):
        batched = generate(model, ids, mask, max_new_tokens=10, eos_token_id=[], deltas=routes, **settings)
        for row, (prompt, name) in enumerate(zip(prompts, routes)):
            expected = _recomputed(model, prompt, name, 10, **settings)
            assert batched[row, ids.shape[1]:].tolist() == expected, (name, settings)
            if not settings:
                greedy.append(expected)
    # rows that join a running batch: prefilled apart (a cache sized for their own tokens), then merged
    from deltaformer import delta

    state = DecodeState(model, capacity=len(routes), max_length=32,
                        forward_context=lambda tags: delta.route(model, tags))
    half = len(routes) // 2
    config = GenerationConfig(max_new_tokens=10, eos_token_id=[])
    rows = state.add(prompts[:half], config, tags=routes[:half])
    got: dict[int, list[int]] = {}
    for step in range(40):
        if step == 2:
            rows += state.add(prompts[half:], config, tags=routes[half:])
        for event in state.step():
            got.setdefault(event.row, []).append(event.token)
    assert len(state) == 0 and [got[r] for r in rows] == greedy
    # beams reorder rows: routing follows them
    beams = generate(model, ids, mask, max_new_tokens=6, eos_token_id=[], num_beams=2, deltas=routes)
    for row, name in enumerate(routes):
        alone = generate(model, ids[row:row + 1, -len(prompts[row]):], max_new_tokens=6, eos_token_id=[],
                         num_beams=2, deltas=[name])
        assert beams[row, ids.shape[1]:].tolist() == alone[0, len(prompts[row]):].tolist(), name


def _left_padded_lists(prompts):
    from deltaformer.generation.sessions import left_pad

    return left_pad(prompts, 0)


def _cli(capsys, monkeypatch, *argv, stdin: str = ""):
    import io

    from deltaformer.cli.main import main

    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_and_chat_commands(tmp_path, capsys, monkeypatch):
    tokenizer, model = _tokenizer_and_model(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    where = str(tmp_path / "model")
    ids = tokenizer.encode("the cat")
    expected = tokenizer.decode(generate(model, torch.tensor([ids]), max_new_tokens=12)[0, len(ids):].tolist(),
                                skip_special_tokens=True)
    capsys.readouterr()
    assert _cli(capsys, monkeypatch, "generate", where, "the cat", "--max-new-tokens", "12")[:2] == (0, expected + "\n")
    sampled = [_cli(capsys, monkeypatch, "generate", where, "-", "--sample", "--seed", "3", "--top-p", "0.9",
                    "--max-new-tokens", "12", stdin="the dog")[1] for _ in range(2)]
    alone = "".join(stream_text(model, tokenizer, "the dog", max_new_tokens=12, do_sample=True, seed=3, top_p=0.9))
    assert sampled == [alone + "\n"] * 2
    code, _, err = _cli(capsys, monkeypatch, "generate", where, "the cat", "--top-p", "0")
    assert code == 2 and "top_p must be above 0" in err
    code, out, err = _cli(capsys, monkeypatch, "chat", where, "--max-new-tokens", "5",
                          stdin="hello\nagain\n/reset\nhello\n/exit\nnever\n")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 4 and lines[2] == "(history cleared)"
    assert lines[3] == lines[0]  # after /reset the same message meets the same (empty) history


@pytest.mark.slow
@pytest.mark.assets
def test_smollm2_greedy_and_beam_ids_equal_transformers(tmp_path):
    """The real model (the GGUF asset, loaded here), and the same weights in ``transformers`` through
    ``save_pretrained``: 64 new tokens, greedy and 4 beams, on a left-padded batch of two prompts."""
    import transformers

    from deltaformer.models import LlamaForCausalLM
    from deltaformer.tokenizer import AutoTokenizer

    ours = LlamaForCausalLM.from_pretrained("smollm2-135m").eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                           attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained("smollm2-135m")
    prompts = [tokenizer.encode("The history of the printing press begins"),
               tokenizer.encode("Here is a short poem about the sea:\n")]
    ids, mask = _left_padded_lists(prompts)
    eos = tokenizer.eos_token_id
    for beams in (1, 4):
        with torch.no_grad():
            expected = _hf_generate(hf, ids, mask, max_new_tokens=NEW, num_beams=beams, eos_token_id=eos,
                                    pad_token_id=0, length_penalty=1.0, early_stopping=False)
        got = generate(ours, ids, mask, max_new_tokens=NEW, num_beams=beams, eos_token_id=eos, pad_token_id=0,
                       length_penalty=1.0, early_stopping=False)
        assert got.tolist() == expected.tolist(), beams
        assert got.shape[1] > ids.shape[1] + NEW // 2  # the rows really decode, not stop at once
