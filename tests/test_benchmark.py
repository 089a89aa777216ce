"""The benchmark runs and prints its tables (a small part of them: one configuration, one script): both cache modes,
and a before/after comparison with a git revision, run in turn."""
import math
import re
import sys

import pytest

from conftest import ROOT, run


def test_benchmark_prints_a_table(tmp_path):
    proc = run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--workdir", str(tmp_path), "--configs", "reference",
                "--scripts", "prior", "--prior_steps", "8"])
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| reference | prior")]
    assert len(rows) == 2, proc.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        # steps/s, samples/s, peak MB; cores busy (CPU time / wall time while training) depends on what else runs,
        # and a run too short for two samples of the cores has none (nan)
        assert float(cells[3]) > 0 and float(cells[4]) > 0 and int(cells[7]) > 0
        busy = float(cells[6])
        assert math.isnan(busy) or busy >= 0
    assert re.search(r"reference: prior [\d.]+ \(real 2\.1\)", proc.stdout)


def test_benchmark_compares_with_a_git_revision_in_one_run(tmp_path):
    proc = run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--workdir", str(tmp_path), "--configs", "reference",
                "--scripts", "prior", "--prior_steps", "8", "--cache", "no", "--against", "HEAD", "--repeats", "1"])
    commit = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| config"))
    assert [c.strip() for c in header.strip("|").split("|")][3:5] == [f"steps/s {commit}", "steps/s this tree"]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| reference | prior")]
    assert len(rows) == 1, proc.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    before, after, speedup = float(cells[3]), float(cells[4]), float(cells[5].rstrip("x"))
    assert before > 0 and after > 0 and speedup == pytest.approx(after / before, abs=0.01)
    assert [len(runs.split()) for runs in cells[8].split(";")] == [1, 1]  # each run of each tree shown


def test_cores_busy_is_cpu_seconds_per_wall_second_while_training():
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_run", ROOT / "benchmarks" / "run.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    cores_busy = benchmark.cores_busy

    samples = [(0.0, 5.0), (1.0, 5.5), (2.0, 7.0), (3.0, 8.5), (4.0, 8.6)]  # (time, CPU seconds so far)
    assert cores_busy(samples, 1.0, 3.0) == pytest.approx(1.5)  # only the samples inside the training phase
    assert math.isnan(cores_busy(samples, 1.5, 2.5))  # fewer than two samples: unknown, not 0


def test_bare_step_prints_the_bare_step_beside_the_script(tmp_path):
    proc = run([sys.executable, str(ROOT / "benchmarks" / "bare_step.py"), "--workdir", str(tmp_path), "--steps", "6",
                "--repeats", "1"])
    bare = re.search(r"^bare step: ([\d.]+) steps/s$", proc.stdout, re.M)
    script = re.search(r"^cached prior script: ([\d.]+) steps/s$", proc.stdout, re.M)
    ratio = re.search(r"^script / bare step: ([\d.]+) \(median of the repeats' ratios: ([\d.]+); ratio of the medians "
                      r"([\d.]+)\)$", proc.stdout, re.M)
    assert bare and script and ratio, proc.stdout
    assert float(bare[1]) > 0 and float(script[1]) > 0
    # one repeat: its ratio is the ratio of the medians
    assert float(ratio[1]) == float(ratio[2]) == pytest.approx(float(script[1]) / float(bare[1]), abs=0.01)


def test_bare_step_adds_the_loops_pieces_one_at_a_time(tmp_path):
    proc = run([sys.executable, str(ROOT / "benchmarks" / "bare_step.py"), "--workdir", str(tmp_path), "--pieces",
                "--block", "2", "--blocks", "2"])
    rows = re.findall(r"^(bare step|\+ [\w ,]+): ([\d.]+) steps/s, ([\d.]+) of the bare step "
                      r"\(quartiles ([\d.]+)-([\d.]+)\)$", proc.stdout, re.M)
    assert [name for name, *_ in rows] == ["bare step", "+ clipping", "+ loss read, schedule", "+ cached batches",
                                           "+ tracker"], proc.stdout
    assert all(float(rate) > 0 and float(low) <= float(speed) <= float(high) for _, rate, speed, low, high in rows)
    assert float(rows[0][2]) == 1.0  # the bare step against itself
    # the other mode's flags would be ignored: refused instead
    refused = run([sys.executable, str(ROOT / "benchmarks" / "bare_step.py"), "--pieces", "--steps", "5"], check=False)
    assert refused.returncode == 2 and refused.stderr.strip().endswith("--steps is not used with --pieces")


def test_activation_benchmark_measures_and_plans_each_configuration(tmp_path):
    """benchmarks/activations.py's code path on the tiny models: each configuration measured in its own process and
    printed beside the plan's estimate."""
    proc = run([sys.executable, str(ROOT / "benchmarks" / "activations.py"), "--size", "tiny",
                "--configs", "prior-b4", "unet-b1-256-ckpt"])
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| prior-b4 ", "| unet-b1-256-ckpt "))]
    assert len(rows) == 2, proc.stdout
    for row in rows:
        measured, plan, ratio = [c.strip() for c in row.strip("|").split("|")][1:]
        assert float(measured.split()[0]) > 0 and float(plan.split()[0]) > 0 and float(ratio) > 0
