"""The digits and byte-level MLM examples: a few steps at a tiny size learn, save and reload."""

import dataclasses
import json

import pytest
import torch

from examples import common, digits, text_mlm


def _loss_went_down(history, window=8):
    return sum(history[-window:]) / window < sum(history[:window]) / window


def _check_outputs_and_reload(out_dir, config_class, build, trained, inputs, **call):
    assert (out_dir / "curve.png").read_bytes()[:4] == b"\x89PNG"
    reloaded, config = common.load_checkpoint(out_dir / "checkpoint.pt", config_class, build)
    trained.eval().cpu()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs, **call), trained(inputs, **call), rtol=0, atol=0)
    return config


def test_digits_learns_and_reloads(tmp_path, monkeypatch):
    config = dataclasses.replace(digits.DEFAULT, steps=60, batch_size=32, num_latents=8, latent_dim=32,
                                 num_layers=1, lr=3e-3)
    built = []
    monkeypatch.setattr(digits, "build_model", lambda c, real=digits.build_model: built.append(real(c)) or built[-1])
    metrics = digits.train(config, tmp_path, "cpu", show_progress=False)
    assert _loss_went_down(metrics["loss_history"])
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["test_images"] == 359
    images, _, _, _ = digits.load_digits(config.test_fraction)
    monkeypatch.undo()
    saved = _check_outputs_and_reload(tmp_path, digits.DigitsConfig, digits.build_model, built[0], images[:5])
    assert saved == config


def test_text_mlm_learns_and_reloads(tmp_path, monkeypatch):
    config = dataclasses.replace(text_mlm.DEFAULT, steps=60, batch_size=16, seq_len=32, channels=32,
                                 num_latents=8, latent_dim=32, num_layers=1, num_heads=2, lr=3e-3)
    built = []
    monkeypatch.setattr(text_mlm, "build_model",
                        lambda c, real=text_mlm.build_model: built.append(real(c)) or built[-1])
    metrics = text_mlm.train(config, tmp_path, "cpu", show_progress=False)
    assert _loss_went_down(metrics["loss_history"])
    assert 0.1 < metrics["unigram_baseline"] < 0.3  # spaces are about a fifth of English bytes
    monkeypatch.undo()
    masked, positions, _ = text_mlm.sample_batch(text_mlm.load_corpus(0.1)[1], config, torch.Generator().manual_seed(0))
    _check_outputs_and_reload(tmp_path, text_mlm.TextConfig, text_mlm.build_model, built[0], masked, index=positions)


def test_mlm_batches_mask_the_positions_they_score():
    config = dataclasses.replace(text_mlm.DEFAULT, batch_size=4, seq_len=40)
    corpus = torch.arange(200, dtype=torch.uint8)
    masked, positions, targets = text_mlm.sample_batch(corpus, config, torch.Generator().manual_seed(0))
    assert positions.numel() == int(40 * config.mask_fraction)
    assert (masked[:, positions] == text_mlm.MASK_TOKEN).all()
    unmasked = torch.ones(40, dtype=torch.bool)
    unmasked[positions] = False
    assert (masked[:, unmasked] != text_mlm.MASK_TOKEN).all()
    # The corpus counts up, so a target is its neighbour's value plus one.
    left = masked[:, positions - 1] if positions.min() > 0 else None
    assert left is None or ((left == text_mlm.MASK_TOKEN) | (targets == left + 1)).all()


def test_finish_writes_the_metrics_line(tmp_path):
    line = common.finish("demo", tmp_path, {"accuracy": 0.91234, "items": 3}, 12.34, torch.device("cpu"))
    assert line.startswith("RESULT demo: accuracy=0.9123 items=3 seconds=12.3 device=cpu")
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy"] == pytest.approx(0.91234)


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--steps", "-5"], ["--batch-size", "0"], ["--batch-size", "-1"],
                                 ["--steps", "ten"], ["--device", "nonsense"], ["--device", "cuda:7"]])
def test_bad_arguments_are_argparse_errors_that_name_the_option(bad, tmp_path, capsys):
    if bad[0] == "--device" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(SystemExit) as exit_info:
        common.parse_args("digits", "", digits.DEFAULT, digits.FULL, bad + ["--out", str(tmp_path)])
    assert exit_info.value.code == 2 and bad[0] in capsys.readouterr().err


def test_an_unwritable_out_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit):  # a file where a folder should be: refused even for root
        common.parse_args("digits", "", digits.DEFAULT, digits.FULL, ["--out", str(blocker / "out")])
    error = capsys.readouterr().err
    assert "--out" in error and "not a writable folder" in error


def test_good_arguments_override_the_config(tmp_path):
    args, config, device = common.parse_args("digits", "", digits.DEFAULT, digits.FULL,
                                             ["--steps", "3", "--batch-size", "2", "--device", "cpu",
                                              "--out", str(tmp_path / "new")])
    assert (config.steps, config.batch_size, device.type) == (3, 2, "cpu") and (tmp_path / "new").is_dir()
