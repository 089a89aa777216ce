"""The benchmark runs and prints its table (a small part of it: one configuration, one script, both cache modes)."""
import re
import sys

from conftest import ROOT, run


def test_benchmark_prints_a_table(tmp_path):
    proc = run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--workdir", str(tmp_path), "--configs", "reference",
                "--scripts", "prior", "--prior_steps", "8"])
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| reference | prior")]
    assert len(rows) == 2, proc.stdout
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3]) > 0 and float(cells[4]) > 0 and int(cells[6]) > 0  # steps/s, samples/s, peak MB
    assert re.search(r"reference: prior [\d.]+ \(real 2\.1\)", proc.stdout)
    assert "PaddleMIX port" in proc.stdout
