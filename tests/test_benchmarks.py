"""The vision probe benchmark runs and reports every encoder (a smoke test: the numbers are in docs)."""

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


def test_retrieval_benchmark_reports_time_and_memory(capsys, tmp_path):
    from benchmarks import retrieval

    report = retrieval.main(["--preset", "tiny", "--images", "20", "--texts", "60", "--k", "8", "--batch", "16",
                             "--block-rows", "16", "--unblocked", "--partial-dir", str(tmp_path)])
    assert report["itm_pairs"] == 20 * 8 + 60 * 8
    assert report["scores"]["seconds"] > 0 and report["scores"]["peak_rss_mib"] > 0
    assert report["unblocked"]["same_metrics"] is True  # the blocked path gives the unblocked metrics
    assert list(tmp_path.glob("*/i2t_*.pt")) and '"metrics"' in capsys.readouterr().out


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
