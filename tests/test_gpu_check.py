"""benchmarks.gpu_check: the whole check on CPU at tiny sizes, and its table when rows fail."""

import re
import time

import pytest

from benchmarks import gpu_check

QUICK = ["--device", "cpu", "--quick"]


def _table(out: str) -> dict[str, tuple[str, str]]:
    """check -> (status, result) from the printed markdown table."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[1] in ("PASS", "FAIL"):
            rows[cells[0]] = (cells[1], cells[3])
    return rows


def _expected_checks(argv):
    args = gpu_check.parse_args(argv)
    gpu_check.choose_device(args)
    stages = [f"pipeline (cpu, tiny): {s}" for s in gpu_check.PIPELINE_STAGES]
    return [gpu_check.pretrain_name(args), *stages, *gpu_check.compare_names(args)]


def test_cpu_run_passes_every_row(capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_check.main(QUICK) == 0
    out = capsys.readouterr().out
    rows = _table(out)
    assert list(rows) == _expected_checks(QUICK)
    assert all(status == "PASS" for status, _ in rows.values()), rows
    pre = rows["pretrain step: tiny, 32 px, batch 4, fp32"][1]
    assert re.search(r"s/step over 2 steps, [\d.]+ images/s, peak RSS [\d.]+ GiB, [\d.,]+ GFLOP/step", pre)
    assert "MFU n/a" in pre
    flops = float(re.search(r"([\d.,]+) GFLOP/step", pre).group(1).replace(",", ""))
    assert flops > 0
    for task in ("greedy", "beam-3"):
        (result,) = [r for c, (_, r) in rows.items() if f"{task} captions" in c]
        assert "identical captions" in result
    assert "threshold" in rows["pipeline (cpu, tiny): capfilt"][1]
    assert "mean R@1" in rows["pipeline (cpu, tiny): evaluate"][1]


def test_peak_flops_given_gives_mfu(capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_check.main(QUICK + ["--skip", "pipeline", "compare", "--peak-tflops", "1"]) == 0
    (status, result), = _table(capsys.readouterr().out).values()
    assert status == "PASS" and re.search(r"MFU [\d.]+% of 1 TFLOP/s \(--peak-tflops\)", result)


def test_failing_rows_print_fail_and_exit_nonzero(capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    # a patch (8 px) larger than the image: the config is refused; the row says why, the run goes on
    assert gpu_check.main(QUICK + ["--skip", "pipeline", "compare", "--image-size", "4"]) == 1
    (status, result), = _table(capsys.readouterr().out).values()
    assert status == "FAIL" and result.startswith("ConfigError: ") and "patch_size" in result and "\n" not in result
    # no time left: every row is printed, as not run
    argv = QUICK + ["--budget-s", "0"]
    assert gpu_check.main(argv) == 1
    rows = _table(capsys.readouterr().out)
    assert list(rows) == _expected_checks(argv)
    assert all(r == ("FAIL", "not run: the time budget is spent") for r in rows.values())


def test_a_section_past_its_time_limit_fails_the_row_in_progress_and_the_rest():
    def rows_of(deadline):
        yield gpu_check.Row("a", gpu_check.PASS, 0.0, "done")
        time.sleep(30)
        yield gpu_check.Row("b", gpu_check.PASS, 0.0, "never")

    t = time.perf_counter()
    rows = gpu_check.run_section(["a", "b", "c"], rows_of, 5.0)
    assert time.perf_counter() - t < 10
    assert [(r.check, r.status) for r in rows] == [("a", "PASS"), ("b", "FAIL"), ("c", "FAIL")]
    assert "time limit" in rows[1].result and rows[2].result == "not run: b failed"


def test_bad_sizes_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(["--batch-size", "0"])
    assert e.value.code == 2 and "--batch-size must be at least 1" in capsys.readouterr().err
