"""A training process killed with SIGKILL at a random step and resumed ends with bit-identical weights,
validation metrics and metrics log to an uninterrupted run (dropout on, gradient accumulation, mid-epoch)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent(
    """
    import sys
    import time
    from pathlib import Path

    import torch

    from deltaformer.checkpoints.io import save_state_dict
    from deltaformer.config import BertConfig
    from deltaformer.data.collate import Encoded, PadCollator
    from deltaformer.models import BertForSequenceClassification
    from deltaformer.train import Trainer, TrainConfig

    run_dir, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    torch.manual_seed(0 if mode != "resume" else 99)  # a resumed run must not depend on its fresh init
    model = BertForSequenceClassification(BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32))
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(52):
        n = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(8, 60, (n,), generator=g).tolist()
        data.append(Encoded(ids, [0] * n, int(7 in ids or ids[0] > 33)))
    config = TrainConfig(epochs=3, batch_size=4, grad_accum=2, lr=3e-3, eval_every=3, save_every=1, log_every=2,
                         progress=False, load_best=False, seed=5)
    trainer = Trainer(model, config, data[:40], PadCollator(), run_dir, eval_data=data[40:],
                      on_step=lambda step: (print(f"step {step}", flush=True), time.sleep(0.1)))
    results = trainer.train(resume=mode == "resume")
    save_state_dict(model.state_dict(), run_dir / "final.safetensors")
    print("done", flush=True)
    """
)


def _run(script, run_dir, mode):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(run_dir), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _metrics(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "examples_per_second"} for r in records]


def test_sigkill_at_a_random_step_then_resume_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "train_tiny.py"
    script.write_text(SCRIPT)
    total_steps = 15  # 40 examples / batch 4 / accumulation 2 = 5 steps per epoch, 3 epochs

    reference = _run(script, tmp_path / "reference", "fresh")
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err

    rng = random.Random(time.time_ns())
    kill_after = rng.randint(2, total_steps - 2)
    victim = _run(script, tmp_path / "run", "fresh")
    for line in victim.stdout:
        if line.strip() == f"step {kill_after}":
            time.sleep(rng.uniform(0.0, 0.05))  # land anywhere: mid-step, mid-evaluation or mid-checkpoint write
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, f"the run finished before it was killed (step {kill_after})"
    assert not (tmp_path / "run" / "final.safetensors").exists()

    resumed = _run(script, tmp_path / "run", "resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    # "step k" is printed after checkpoint k is on disk, and each step pauses 0.1 s, so the kill lands in step
    # k + 1 (training, evaluating or writing its checkpoint) or just after it: the run resumes from k or k + 1.
    first = int(out.split()[1])
    assert kill_after + 1 <= first <= kill_after + 2, (kill_after, out[:80])

    expected = load_file(tmp_path / "reference" / "final.safetensors")
    got = load_file(tmp_path / "run" / "final.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs after resume (killed after step {kill_after})"
    assert _metrics(tmp_path / "run") == _metrics(tmp_path / "reference")
    ref_results = json.loads((tmp_path / "reference" / "results.json").read_text())
    run_results = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in ("validation", "last_validation", "best_step", "steps"):
        assert run_results[key] == ref_results[key], key
