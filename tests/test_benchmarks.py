"""Smoke tests of the benchmarks (the numbers are in docs/benchmarks.md)."""

import os
from pathlib import Path

import pytest

from benchmarks import vision_probe

PARAMS = str(Path(__file__).resolve().parents[1] / "params.yaml")


def test_vision_probe_reports_every_encoder(capsys):
    final = vision_probe.main(["--config", PARAMS, "--steps", "4", "--eval-every", "2",
                               "--train-images", "48", "--test-images", "8", "--threads", "1"])
    assert set(final) == set(vision_probe.ENCODERS)
    for row in final.values():
        assert row["step"] == 4 and 0.0 <= row["shape_set_acc"] <= 1.0 and 0.0 <= row["colour_set_acc"] <= 1.0
    out = capsys.readouterr().out
    assert out.count("step     2") == 3 and '"final"' in out


def test_vision_probe_sets_the_batch_and_the_stem_channels(capsys):
    final = vision_probe.main(["--config", PARAMS, "--encoders", "vit", "--steps", "2", "--eval-every", "2",
                               "--batch-size", "4", "--stem-channels", "8,8,16", "--train-images", "16",
                               "--test-images", "4", "--threads", "1"])
    assert final["vit"]["step"] == 2
    assert '"batch_size": 4' in capsys.readouterr().out
    for bad in (["--stem-channels", "8,x,16"], ["--stem-channels", "8,16"], ["--batch-size", "0"],
                ["--stem", "patch", "--stem-channels", "8,8,16"]):
        with pytest.raises(SystemExit) as err:
            vision_probe.main(["--config", PARAMS, "--encoders", "vit", "--steps", "2", "--train-images", "16",
                               "--test-images", "4", "--threads", "1", *bad])
        assert err.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_retrieval_benchmark_reports_time_and_memory(capsys, tmp_path):
    from benchmarks import retrieval

    report = retrieval.main(["--preset", "tiny", "--images", "20", "--texts", "60", "--k", "8", "--batch", "16",
                             "--block-rows", "16", "--unblocked", "--partial-dir", str(tmp_path)])
    assert report["itm_pairs"] == 20 * 8 + 60 * 8
    assert report["scores"]["seconds"] > 0 and report["scores"]["peak_rss_mib"] > 0
    assert report["unblocked"]["same_metrics"] is True  # the blocked path gives the unblocked metrics
    assert list(tmp_path.glob("*/i2t_*.pt")) and '"metrics"' in capsys.readouterr().out


def test_vqa_benchmark_runs_both_sides_at_tiny_size(capsys):
    from benchmarks import vqa

    report = vqa.main(["--size", "tiny", "--n", "3", "--repeats", "1", "--threads", "1"])
    assert report["identical"] is True and len(report["answers"]) == 3  # the benchmark's own equality check
    assert report["blip_answers_per_s"] > 0 and report["hf_answers_per_s"] > 0
    assert "answers/s" in capsys.readouterr().out


def test_train_benchmark_prints_absolute_numbers_and_no_ratio_without_the_official_run(capsys):
    """A ratio against the official step is printed only when both ran in the same invocation."""
    from benchmarks import train

    assert train.main(["--presets", "tiny", "--steps", "1", "--threads", "1", "--profile"]) == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("tiny")]
    batch, size, s_per_step, pairs_per_s = row.split()[1:5]
    assert (batch, size) == ("4", "32") and float(s_per_step) > 0 and float(pairs_per_s) > 0
    table = "\n".join(line for line in out.splitlines() if not line.endswith("calls/step"))
    assert "official" not in table and "x " not in table
    # --profile: the operators of two more steps by CPU time, the matrix products among them
    ops = [line.split() for line in out.splitlines() if line.endswith("calls/step")]
    assert 5 <= len(ops) <= train.PROFILE_ROWS
    shares = [float(op[1].rstrip("%")) for op in ops]
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 100.5
    assert any(op[0] in ("aten::mm", "aten::addmm") for op in ops)


def test_profile_operator_names_are_one_word():
    """The profile table is split on whitespace by its readers: an autograd node's event name has a space."""
    from benchmarks.train import op_name

    assert op_name("autograd::engine::evaluate_function: ViewBackward0") == "autograd::ViewBackward0"
    assert op_name("aten::mm") == "aten::mm"
    assert op_name("Optimizer.step#AdamW.step") == "Optimizer.step#AdamW.step"
    assert op_name("some profiler  range") == "some_profiler_range"


def test_train_benchmark_refuses_an_official_dir_that_is_not_blip(tmp_path, capsys):
    from benchmarks import train

    assert train.main(["--presets", "base", "--official-dir", str(tmp_path), "--threads", "1"]) == 1
    captured = capsys.readouterr()
    assert "not a salesforce/BLIP checkout" in captured.err and "official" not in captured.out


@pytest.mark.slow  # builds the official and the blip_core base models (BERT-base text) at 32 px
def test_train_benchmark_compares_side_by_side_with_an_official_checkout(capsys):
    directory = os.environ.get("BLIP_OFFICIAL_DIR")
    if not directory:
        pytest.skip("no salesforce/BLIP checkout: set BLIP_OFFICIAL_DIR to one (its models/ and configs/)")
    from benchmarks import train

    assert train.main(["--presets", "base", "--official-dir", directory, "--image-size", "32", "--batch", "2",
                       "--queue-size", "64", "--steps", "1", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["official", "2", "32"] and lines[2].split()[:3] == ["base", "2", "32"]
    assert "measured side by side in this run" in lines[3]

def test_capfilt_benchmark_filters_agree_and_prints_the_ratio(capsys, tmp_path):
    from benchmarks import capfilt

    report = capfilt.main(["--size", "tiny", "--n", "3", "--batch", "2", "--repeats", "1", "--threads", "1",
                           "--workdir", str(tmp_path)])
    # Both filters scored blip_core's captions: the web caption + 3 synthetic ones for each of the 3 images.
    assert report["itm_pairs_compared"] == 3 * 4
    assert report["itm_equal"] and report["itm_max_abs_diff"] <= 1e-4
    assert len(report["example_synthetic"]) == 3
    assert report["ratio"] == pytest.approx(report["images_per_s"]["blip_core"] / report["images_per_s"]["transformers"])
    out = capsys.readouterr().out
    assert f"ratio {report['ratio']:.2f}x; ITM equal on 12 shared pairs" in out
    assert "| hours for 14M images, one process on this device |" in out
