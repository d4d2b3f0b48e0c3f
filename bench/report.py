"""Turn a pytest-benchmark JSON into a results file with side-by-side ratios.

Every benchmark sets `group` (the shape) and `extra_info["provider"]`; for each group this
reports each provider's median and its speedup against the baseline provider(s), plus the
machine and versions, and writes bench/results/<name>.json.

    python bench/report.py RAW.json --baseline reference torch --out bench/results/x.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from collections import defaultdict


def summarize(raw: dict, baselines: list[str], ours: str) -> dict:
    groups: dict[str, dict] = defaultdict(dict)
    info: dict[str, dict] = {}
    for bench in raw["benchmarks"]:
        provider = bench["extra_info"]["provider"]
        groups[bench["group"]][provider] = bench["stats"]["median"]
        info[bench["group"]] = {k: v for k, v in bench["extra_info"].items() if k != "provider"}
    rows = []
    for group, medians in sorted(groups.items()):
        row = {"shape": group, **info[group],
               "median_us": {p: round(m * 1e6, 3) for p, m in medians.items()}}
        for base in baselines:
            if base in medians and ours in medians:
                row[f"speedup_vs_{base}"] = round(medians[base] / medians[ours], 3)
        rows.append(row)
    machine = raw.get("machine_info", {})
    return {
        "date": datetime.date.today().isoformat(),
        "machine": {"node": machine.get("node"), "cpu": machine.get("cpu", {}).get("brand_raw"),
                    "cores": machine.get("cpu", {}).get("count"),
                    "python": platform.python_version()},
        "versions": raw.get("versions", {}),
        "ours": ours,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("raw", help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--baseline", nargs="+", default=["torch"], help="baseline providers")
    parser.add_argument("--ours", default="remoe", help="our provider (remoe)")
    parser.add_argument("--versions", default="{}", help="JSON of extra versions to record")
    parser.add_argument("--out", required=True, help="results file to write")
    args = parser.parse_args()
    with open(args.raw) as f:
        raw = json.load(f)
    raw["versions"] = json.loads(args.versions)
    result = summarize(raw, args.baseline, args.ours)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for row in result["rows"]:
        ratios = "  ".join(f"{k[len('speedup_vs_'):]}: {v:.2f}x" for k, v in row.items()
                           if k.startswith("speedup_vs_"))
        print(f"{row['shape']:<34} {ratios}")


if __name__ == "__main__":
    main()
