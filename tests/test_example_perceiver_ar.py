"""examples/perceiver_ar.py: a tiny run trains, scores held-out bytes against the baselines, saves, reloads and generates."""

import dataclasses
import json
import math

import pytest
import torch

from examples import common
from examples import perceiver_ar as example
from examples.text_mlm import load_corpus

TINY = dataclasses.replace(example.DEFAULT, steps=60, batch_size=8, seq_len=32, num_latents=8, dim=32, num_heads=2,
                           num_layers=1, lr=3e-3, eval_batch_size=256, prompt_bytes=8, context_dropout=0.25)


@pytest.fixture
def one_thread():
    """The tiny run's ops are too small to split; on a busy 2-core machine a second
    intra-op thread makes every op wait for a free core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_run_trains_scores_held_out_text_saves_reloads_and_generates(tmp_path, monkeypatch, capsys, one_thread):
    built = []
    monkeypatch.setattr(example, "build_model", lambda c, real=example.build_model: built.append(real(c)) or built[-1])
    device = torch.device("cpu")
    metrics = example.train(TINY, tmp_path, device, seed=0, show_progress=False)
    monkeypatch.undo()
    line = common.finish(example.NAME, tmp_path, metrics, 1.0, device)

    history = metrics["loss_history"]
    assert len(history) == TINY.steps and sum(history[-10:]) < sum(history[:10])
    assert line.startswith("RESULT perceiver_ar: bits_per_byte=") and "loss_history" not in line
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["vs_bigram"] == pytest.approx(saved["bits_per_byte"] / saved["bigram_bits_per_byte"])
    assert 0 < metrics["bits_per_byte"] < 8

    # The scores are those of the held-out split: every byte after the first window's
    # prefix, once, and the baselines count the training text but score these bytes.
    train_corpus, test_corpus = load_corpus(TINY.test_fraction)
    assert metrics["test_bytes"] == len(test_corpus) and metrics["train_bytes"] == len(train_corpus)
    windows = example.eval_windows(test_corpus, TINY)
    _, targets = example.split(windows, TINY)
    start = TINY.seq_len - TINY.num_latents + 1
    assert torch.equal(targets.flatten(), test_corpus[start:start + targets.numel()].long())
    assert metrics["test_bytes_scored"] == targets.numel() > 0.9 * len(test_corpus)
    counts = torch.bincount(train_corpus.long(), minlength=256).double()
    unigram_bits = -((counts + 1) / (counts.sum() + 256)).log2()[targets].mean().item()
    assert metrics["unigram_bits_per_byte"] == pytest.approx(unigram_bits)
    assert metrics["unigram_bits_per_byte"] > metrics["bigram_bits_per_byte"] > 2.5

    for name in ("checkpoint.pt", "curve.png", "metrics.json", "sample.txt"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    sample = (tmp_path / "sample.txt").read_bytes()
    assert sample.startswith(bytes(test_corpus[:TINY.prompt_bytes].tolist())) and "generated after" in capsys.readouterr().out
    assert metrics["generate_ms_per_byte_cached"] > 0 and metrics["generate_ms_per_byte_recomputed"] > 0

    reloaded, config = common.load_checkpoint(tmp_path / "checkpoint.pt", example.ARConfig, example.build_model)
    assert config == TINY
    trained = built[0].eval()
    reloaded.eval()
    inputs, _ = example.split(windows[:4], TINY)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs), trained(inputs), rtol=0, atol=0)


def test_baselines_are_normalised_and_the_bigram_backs_off_to_the_unigram():
    corpus = torch.tensor(list(b"abracadabra abracadabra"), dtype=torch.uint8)
    unigram, bigram = example.byte_baselines(corpus)
    torch.testing.assert_close(unigram.exp2().sum(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(bigram.exp2().sum(dim=1), torch.ones(256, dtype=torch.float64))
    assert torch.equal(bigram[ord("z")], unigram)  # never seen as a previous byte
    assert bigram[ord("a"), ord("b")] > unigram[ord("b")]  # "ab" is frequent
    assert math.isclose(unigram[ord("a")].exp2().item(), (10 + 1) / (23 + 256))
