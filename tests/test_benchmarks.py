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
