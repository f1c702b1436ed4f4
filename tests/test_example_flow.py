"""examples/flow.py: the generated frames match their flow labels, and a tiny run trains, saves and reloads."""

import json

import pytest
import torch

from examples import common
from examples import flow as example

# Small displacements and a narrow model: the loss leaves its zero-flow plateau within ~100 steps
# (narrower features or larger displacements take several hundred), so 200 steps show a clear drop.
TINY = example.FlowConfig(steps=200, batch_size=16, image_size=12, max_translation=1.0, max_local=0.5,
                          feature_dim=32, num_bands=8, num_latents=16, latent_dim=64, num_layers=1, num_heads=4,
                          widening_factor=1, lr=3e-3, warmup_steps=10, test_pairs=16, eval_batch_size=8)


@pytest.mark.parametrize("dx, dy", [(2, 0), (0, -1), (-3, 2)])
def test_warp_by_integer_translation_moves_pixels(dx, dy):
    """warp(second, flow)[y, x] = second[y + dy, x + dx]: frame 1's pixel at p is found at p + flow in frame 2."""
    second = torch.randn(2, 3, 10, 11)
    flow = torch.empty(2, 2, 10, 11)
    flow[:, 0], flow[:, 1] = dx, dy
    first = example.warp(second, flow)
    ys = slice(max(0, -dy), 10 - max(0, dy))
    xs = slice(max(0, -dx), 11 - max(0, dx))
    shifted = second[:, :, max(0, dy):10 + min(0, dy), max(0, dx):11 + min(0, dx)]
    torch.testing.assert_close(first[:, :, ys, xs], shifted, rtol=0, atol=1e-5)


def test_make_pairs_labels_match_frames(monkeypatch):
    """Through the canvas, the crop and the frame order: with a constant integer flow (dx, dy),
    frames[:, 0] at (y, x) equals frames[:, 1] at (y + dy, x + dx), and the label is (dx, dy)."""
    dx, dy = 2, -1

    def constant_flows(n, size, max_translation, max_local, generator):
        flow = torch.empty(n, 2, size, size)
        flow[:, 0], flow[:, 1] = dx, dy
        return flow

    monkeypatch.setattr(example, "random_flows", constant_flows)
    config = example.FlowConfig(steps=1, batch_size=1, image_size=8, max_translation=2.0, max_local=0.0)
    frames, labels = example.make_pairs(3, config, torch.Generator().manual_seed(0))
    assert frames.shape == (3, 2, 3, 8, 8) and labels.shape == (3, 8, 8, 2)
    assert torch.equal(labels, torch.tensor([float(dx), float(dy)]).expand(3, 8, 8, 2))
    # With the margin, even border pixels of frame 1 come from the texture: compare where frame 2 has them.
    first, second = frames[:, 0], frames[:, 1]
    torch.testing.assert_close(first[..., 1:, :6], second[..., :7, 2:], rtol=0, atol=1e-5)
    assert first.std() > 0.5  # a real texture, not zeros from sampling off the canvas


@pytest.fixture
def one_thread():
    """The tiny run's ops are too small to split; on a busy 2-core machine a second
    intra-op thread makes every op wait for a free core (measured 6-12x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_run_trains_saves_and_reloads(tmp_path, monkeypatch, one_thread):
    built = []
    monkeypatch.setattr(example, "build_model", lambda c, real=example.build_model: built.append(real(c)) or built[-1])
    device = torch.device("cpu")
    metrics = example.train(TINY, tmp_path, device, seed=0, show_progress=False)
    monkeypatch.undo()
    model = built[0]
    line = common.finish(example.NAME, tmp_path, metrics, 1.0, device)

    history = metrics["loss_history"]
    assert len(history) == TINY.steps
    # Per-batch EPEs are noisy (each batch has its own translations): compare 20-step means.
    assert sum(history[-20:]) / 20 < 0.9 * sum(history[:20]) / 20
    assert line.startswith("RESULT flow:") and "loss_history" not in line
    for name in ("checkpoint.pt", "curve.png", "metrics.json"):
        assert (tmp_path / name).is_file()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["ratio"] == pytest.approx(saved["test_epe"] / saved["zero_flow_epe"])

    loaded, config = common.load_checkpoint(tmp_path / "checkpoint.pt", example.FlowConfig, example.build_model)
    assert config == TINY
    model.eval()
    loaded.eval()
    frames, _ = example.make_pairs(4, TINY, torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(frames)
        assert expected.shape == (4, TINY.image_size, TINY.image_size, 2)
        assert torch.equal(loaded(frames), expected)
