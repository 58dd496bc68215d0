"""The vision probe benchmark runs and reports every encoder (a smoke test: the numbers are in docs)."""

from pathlib import Path

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


def test_vqa_benchmark_runs_both_sides_at_tiny_size(capsys):
    from benchmarks import vqa

    report = vqa.main(["--size", "tiny", "--n", "3", "--repeats", "1", "--threads", "1"])
    assert report["identical"] is True and len(report["answers"]) == 3  # the benchmark's own equality check
    assert report["blip_answers_per_s"] > 0 and report["hf_answers_per_s"] > 0
    assert "answers/s" in capsys.readouterr().out
