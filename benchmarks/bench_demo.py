"""Demo benchmark: the full ``fluid demo`` at a budget, against its quality and time targets.

    python benchmarks/bench_demo.py                    # the default budget (~15 min, 2 CPU cores)
    python benchmarks/bench_demo.py --budget small --out /tmp/demo-small

Runs ``fluid_train.experiments.run_demo`` (cache included: pass a fresh --out to time everything) and
checks the targets of the default budget: GenEval overall >= 0.5 on the held-out prompts, every
task family above its chance level (the score of scenes drawn without reading the prompt), and
the run inside the budget's minutes. Prints the report's table and one JSON line; exits 1 when a
target is missed (with --check).
"""

from __future__ import annotations

import argparse
import json
import sys

from fluid_train.cli.demo import quiet_libraries
from fluid_train.experiments import BUDGETS, configure_cpu, run_demo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="default")
    parser.add_argument("--out", default="bench-demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-geneval", type=float, default=0.5)
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    quiet_libraries()
    configure_cpu()
    report = run_demo(args.out, budget=args.budget, seed=args.seed, progress=False)
    minutes = BUDGETS[args.budget].minutes if args.budget in BUDGETS else float(args.budget)
    below_chance = [f for f, s in report.geneval.items() if not s > report.chance[f]]
    targets = {
        "geneval_overall": report.geneval_overall >= args.min_geneval,
        "every_family_above_chance": not below_chance,
        "within_budget": report.elapsed_s <= minutes * 60,
    }
    print(json.dumps({"budget": args.budget, "minutes": minutes, **targets,
                      "geneval_overall": report.geneval_overall, "fid": report.fid,
                      "elapsed_s": report.elapsed_s, "below_chance": below_chance}))  # fmt: skip
    return 1 if args.check and not all(targets.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
