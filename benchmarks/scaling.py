"""Strong scaling from throughput.py reports at several GPU counts (issue 20): tokens/s/GPU, efficiency, plot.

    for n in 1 2 4 8; do torchrun --nproc-per-node $n benchmarks/throughput.py --shapes 0.5b,1.5b --batches 64x8 \
        --out runs/$n; done
    python benchmarks/scaling.py runs/*/throughput.json --out $OUT

Runs are grouped by configuration (shape, prompts x n, KL, tp x pp, compile): the same global batch at every GPU count
(throughput.py splits the prompts over dp). Within a group the baseline is the run with the fewest GPUs, and the
strong-scaling efficiency at N GPUs = (tokens/s/GPU at N) / (tokens/s/GPU at the baseline) = (T_base x N_base) /
(T_N x N) for step times T. Reports of different devices are refused (a scaling table compares one machine kind).
Writes OUT/scaling.json, OUT/scaling.md and OUT/scaling.png.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict


def load(paths: list[str]) -> tuple[str, list[dict]]:
    """(device, every result row of the reports, each with its report's command and date)."""
    devices, rows = set(), []
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        devices.add(report["device"])
        rows += [{**r, "command": report["command"], "date": report["date"]} for r in report["results"]]
    if len(devices) != 1:
        raise ValueError(f"reports from {len(devices)} devices ({sorted(devices)}): scale one machine kind at a time")
    return devices.pop(), rows


def scaling(rows: list[dict]) -> list[dict]:
    """Per configuration, its runs by GPU count with tokens/s/GPU and the efficiency against the fewest-GPU run."""
    groups = defaultdict(dict)
    for r in rows:
        c = r["config"]
        key = (c["shape"], c["prompts"], c["n"], c["kl"], c["tp"], c["pp"], c.get("compile", False))
        if r["gpus"] in groups[key]:
            raise ValueError(f"two runs of {r['name']} on {r['gpus']} GPUs: pass one report per GPU count")
        groups[key][r["gpus"]] = r
    table = []
    for key, by_gpus in groups.items():
        base_n = min(by_gpus)
        base = by_gpus[base_n]["tokens_per_s_per_gpu"]
        for n in sorted(by_gpus):
            r = by_gpus[n]
            table.append({"name": r["name"], "gpus": n, "dp": r["dp"], "baseline_gpus": base_n,
                          "step_s": r["step_s"], "tokens_per_s_per_gpu": r["tokens_per_s_per_gpu"],
                          "efficiency": r["tokens_per_s_per_gpu"] / base, "mfu": r["mfu"], "command": r["command"],
                          "date": r["date"]})
    return table


def markdown(device: str, table: list[dict]) -> str:
    lines = [f"# Strong scaling on {device}", "",
             "Same global batch at every GPU count; efficiency = tokens/s/GPU / tokens/s/GPU of the fewest-GPU run.",
             "", "| configuration | GPUs | dp | step s | tokens/s/GPU | efficiency (vs GPUs) | MFU |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        lines.append(f"| {r['name']} | {r['gpus']} | {r['dp']} | {r['step_s']:.3f} | {r['tokens_per_s_per_gpu']:.0f} "
                     f"| {100 * r['efficiency']:.1f}% (vs {r['baseline_gpus']}) | {mfu} |")
    lines += ["", "Commands:"] + sorted({f"- `{r['command']}` ({r['date']})" for r in table})
    return "\n".join(lines) + "\n"


def plot(device: str, table: list[dict], path: str) -> None:
    """PNG: tokens/s/GPU (left) and efficiency (right) against GPU count, one line per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    names = sorted({r["name"] for r in table})
    for name in names:
        rs = [r for r in table if r["name"] == name]
        left.plot([r["gpus"] for r in rs], [r["tokens_per_s_per_gpu"] for r in rs], marker="o", label=name)
        right.plot([r["gpus"] for r in rs], [100 * r["efficiency"] for r in rs], marker="o", label=name)
    for ax, label in ((left, "tokens / s / GPU"), (right, "strong-scaling efficiency %")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    right.axhline(92, color="gray", linestyle="--", linewidth=1)  # issue 20's goal at the 1.5B shape
    left.legend(fontsize="small")
    fig.suptitle(f"GRPO strong scaling, {device}")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", help="throughput.json files, one per GPU count")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    device, rows = load(args.reports)
    table = scaling(rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scaling.json"), "w") as f:
        json.dump({"device": device, "rows": table}, f, indent=1)
    with open(os.path.join(args.out, "scaling.md"), "w") as f:
        f.write(markdown(device, table))
    plot(device, table, os.path.join(args.out, "scaling.png"))
    print(markdown(device, table))


if __name__ == "__main__":
    main()
