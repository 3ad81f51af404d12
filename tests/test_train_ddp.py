"""torchrun data parallel: two CPU processes (gloo, loopback) reach the single-process result with the same
global batch, and shard evaluation without counting any example twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = textwrap.dedent(
    """
    import json
    import os
    import sys
    from pathlib import Path

    import torch

    from deltaformer.checkpoints.io import save_state_dict
    from deltaformer.config import BertConfig
    from deltaformer.data.collate import Encoded, PadCollator
    from deltaformer.models import BertForSequenceClassification
    from deltaformer.train import Trainer, TrainConfig

    run_dir, global_batch = Path(sys.argv[1]), int(sys.argv[2])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(45):
        n = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(8, 60, (n,), generator=g).tolist()
        data.append(Encoded(ids, [0] * n, int(ids[0] > 33)))
    config = TrainConfig(epochs=2, batch_size=global_batch // world, lr=3e-3, eval_every=2, log_every=1,
                         progress=False, load_best=False, device="cpu")
    trainer = Trainer(model, config, data[:32], PadCollator(), run_dir, eval_data=data[32:])
    results = trainer.train()
    if trainer.env.is_main:
        save_state_dict(model.state_dict(), run_dir / "final.safetensors")
    """
)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}


@pytest.mark.slow
def test_two_process_ddp_equals_single_process_with_same_global_batch(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single"), "8"],
                            capture_output=True, text=True, env=_env(), timeout=300)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
         str(script), str(tmp_path / "ddp"), "8"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    expected = load_file(tmp_path / "single" / "final.safetensors")
    got = load_file(tmp_path / "ddp" / "final.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)

    single_results = json.loads((tmp_path / "single" / "results.json").read_text())
    ddp_results = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert ddp_results["world_size"] == 2 and single_results["world_size"] == 1
    assert ddp_results["validation"]["examples"] == 13  # 13 held-out examples, split 7 + 6, none twice
    assert ddp_results["validation"]["accuracy"] == single_results["validation"]["accuracy"]
    assert abs(ddp_results["validation"]["loss"] - single_results["validation"]["loss"]) < 1e-5
    train_losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                     if json.loads(line)["split"] == "train"] for run in ("single", "ddp")]
    assert train_losses[0] == pytest.approx(train_losses[1], abs=1e-5)
