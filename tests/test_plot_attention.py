"""``deltaformer plot-attention``: the pattern it draws is exactly what the kernel computes, PNGs are valid."""

from __future__ import annotations

import struct

import pytest
import torch

from deltaformer.cli.main import main
from deltaformer.cli.plot_attention import pattern_matrix
from deltaformer.nn.banded import window_to_dense
from deltaformer.nn.sliding import (
    GlobalTokens,
    LongformerMask,
    LongformerSelfAttention,
    SlidingWindow,
    dense_weights,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("length, window, dilation, causal",
                         [(1, 3, 1, False), (17, 2, 1, False), (40, 3, 2, False), (33, 4, 3, True), (9, 20, 1, False)])
def test_band_matches_the_dense_reference_mask(length, window, dilation, causal):
    width = window + 1 if causal else 2 * window + 1
    dense = window_to_dense(torch.ones(1, 1, length, width), window, dilation, causal)[0, 0] > 0
    assert torch.equal(pattern_matrix(length, window, dilation, causal=causal), dense)
    assert torch.equal(pattern_matrix(length, window, dilation, causal=causal),
                       SlidingWindow(window, dilation, causal).allowed(length, length, torch.device("cpu")))


@pytest.mark.parametrize("window, dilation, positions", [(3, 1, [0]), (2, 2, [0, 7, 20]), (5, 1, []), (4, 3, [11])])
def test_pattern_marks_exactly_the_cells_the_kernel_weighs(window, dilation, positions):
    """Every allowed cell gets a positive weight from LongformerSelfAttention, every other cell exactly 0."""
    seq = 23
    attn = LongformerSelfAttention(16, 2, window=window, dilation=dilation).eval()
    glob = torch.zeros(1, seq, dtype=torch.long)
    glob[0, positions] = 1
    mask = LongformerMask(torch.ones(1, seq, dtype=torch.bool), GlobalTokens.from_mask(glob))
    with torch.no_grad():
        _, (local, global_) = attn(torch.randn(1, seq, 16), mask, need_weights=True)
    dense = dense_weights(local[0], None if global_ is None else global_[0].transpose(1, 2), positions,
                             window, dilation)
    torch.testing.assert_close(dense.sum(-1), torch.ones(2, seq))
    expected = pattern_matrix(seq, window, dilation, positions)
    for head in range(2):
        assert torch.equal(dense[head] > 0, expected)


def test_pattern_png_is_written(tmp_path, capsys):
    out = tmp_path / "pattern.png"
    assert main(["plot-attention", "--length", "64", "--window", "4", "--dilation", "2", "--global", "0,17",
                 "-o", str(out)]) == 0
    assert png_size(out) == (770, 715)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pattern.png"]  # no temporary file left over
    assert "64 tokens" in capsys.readouterr().out


@pytest.mark.parametrize("convert", [True, False])
def test_model_heatmap(tmp_path, minilm_dir, convert):
    from deltaformer.convert import convert_bert_to_longformer

    model = convert_bert_to_longformer(minilm_dir, 128, 4, tmp_path / "long") if convert else minilm_dir
    out = tmp_path / "heat.png"
    assert main(["plot-attention", "--model", str(model), "--text", "A long story about a fox, a dog and a cat.",
                 "--layer", "-1", "--head", "1", "-o", str(out)]) == 0
    assert png_size(out) == ((1430, 660) if convert else (770, 715))


@pytest.mark.parametrize("args, message", [
    (["--window", "4"], "needs --length and --window"),
    (["--length", "0", "--window", "4"], "--length 0 is outside"),
    (["--length", "10", "--window", "2", "--global", "3,x"], "not a comma-separated list"),
    (["--length", "10", "--window", "2", "--global", "10"], "position 10 is outside 0..9"),
    (["--length", "10", "--window", "2", "--dilation", "0"], "--dilation (0) >= 1"),
    (["--model", "minilm"], "--model needs --text"),
])
def test_bad_arguments_give_one_line_errors(tmp_path, capsys, args, message):
    out = tmp_path / "x.png"
    assert main(["plot-attention", *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_bad_layer_and_suffix(tmp_path, minilm_dir, capsys):
    assert main(["plot-attention", "--model", str(minilm_dir), "--text", "hi", "--layer", "40",
                 "-o", str(tmp_path / "x.png")]) == 2
    assert "--layer 40 / --head 0 do not exist" in capsys.readouterr().err
    assert main(["plot-attention", "--length", "8", "--window", "1", "-o", str(tmp_path / "x.jpg")]) == 2
    assert "should end in .png" in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plot-attention", "--help"])
    assert exc.value.code == 0
    assert "--window" in capsys.readouterr().out
