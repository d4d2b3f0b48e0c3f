"""Collect the GPU check's test and benchmark outputs into one results file and print a table.

    python bench/gpu_report.py --tests tests.xml --bench bench.json --out bench/results/gpu-D.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import summarize  # noqa: E402


def _tests(path: str) -> dict:
    if not os.path.exists(path):
        return {"error": "no junit file: the test run did not finish"}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    failed = [case.get("classname", "") + "::" + case.get("name", "")
              for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {
        "failed": failed}


def _sanitizer(folder: str | None) -> dict:
    """Per compute-sanitizer tool: its exit status and its ERROR SUMMARY line, from the
    sanitizer-<tool>.rc / .log files gpu_check.sh writes."""
    out = {}
    for tool in ("memcheck", "racecheck", "synccheck"):
        rc_path = os.path.join(folder or "", f"sanitizer-{tool}.rc")
        if folder is None or not os.path.exists(rc_path):
            continue
        with open(rc_path) as f:
            rc = int(f.read().strip() or -1)
        summary = ""
        log = os.path.join(folder, f"sanitizer-{tool}.log")
        if os.path.exists(log):
            with open(log, errors="replace") as f:
                lines = [line.strip() for line in f if "ERROR SUMMARY" in line]
            summary = lines[-1] if lines else ""
        out[tool] = {"rc": rc, "passed": rc == 0, "summary": summary}
    return out or {"skipped": "compute-sanitizer did not run (not installed, or not reached)"}


def _gpu() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                               "--format=csv,noheader"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", required=True)
    parser.add_argument("--bench", required=True)
    parser.add_argument("--build-log", default=None)
    parser.add_argument("--sanitizer", default=None,
                        help="folder of gpu_check.sh's sanitizer-<tool>.rc/.log files")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    result = {"date": datetime.date.today().isoformat(), "gpu": _gpu(),
              "torch": torch.__version__, "cuda": torch.version.cuda,
              "tests": _tests(args.tests), "sanitizer": _sanitizer(args.sanitizer),
              "benchmarks": {}}
    if os.path.exists(args.bench):
        with open(args.bench) as f:
            raw = json.load(f)
        routing = {"benchmarks": [b for b in raw["benchmarks"]
                                  if b["extra_info"].get("provider") is not None]}
        result["benchmarks"]["by_provider"] = summarize(routing, ["torch", "reference"], "remoe")
        result["benchmarks"]["all"] = [
            {"name": b["name"], "group": b["group"], "median_us": b["stats"]["median"] * 1e6,
             "extra_info": b["extra_info"]} for b in raw["benchmarks"]]
    else:
        result["benchmarks"]["error"] = "no benchmark json: the benchmark run did not finish"
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)

    t = result["tests"]
    print(f"GPU: {result['gpu']}  torch {result['torch']} (CUDA {result['cuda']})")
    print(f"CUDA tests: {t.get('tests', 0)} run, {t.get('failures', 0)} failed, "
          f"{t.get('errors', 0)} errors, {t.get('skipped', 0)} skipped")
    for name in t.get("failed", []):
        print(f"  FAILED {name}")
    for tool, r in result["sanitizer"].items():
        print(f"compute-sanitizer {tool}: {r}" if tool == "skipped" else
              f"compute-sanitizer {tool}: {'ok' if r['passed'] else 'FAILED'} {r['summary']}")
    for row in result["benchmarks"].get("by_provider", {}).get("rows", []):
        medians = "  ".join(f"{p} {us:.1f}us" for p, us in row["median_us"].items())
        print(f"{row['shape']:<36} {medians}  x{row.get('speedup_vs_torch', float('nan')):.2f}")


if __name__ == "__main__":
    main()
