"""``fluid checkpoints RUN``: a run's checkpoints, their size, and whether each verifies."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "checkpoints",
        help="list a run's checkpoints and verify them",
        description=(
            "List RUN/checkpoints/step_* newest first with the step, the size on disk and "
            "whether the checkpoint verifies against the sizes and SHA-256 checksums its "
            "meta.json records (and if not, why), marking the one `latest` names. "
            "`fluid train --resume` resumes from the newest one that verifies. Checkpoints "
            "written before checksums existed are reported as unverified-but-present. Exit "
            "status 0 when the newest checkpoint verifies, 1 when it does not (or there is none)."
        ),
    )
    parser.add_argument("run", metavar="RUN", help="run directory (or its checkpoints/ folder)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def inspect_run(run_dir: str | Path) -> dict[str, Any]:
    """``{"root", "latest", "checkpoints": [{name, step, bytes, verified, legacy, detail,
    latest}]}``, newest first."""
    from fluid_train.checkpoint import CheckpointManager, verify

    run_dir = Path(run_dir)
    root = (
        run_dir
        if (run_dir / "latest").is_file() or run_dir.name == "checkpoints"
        else run_dir / "checkpoints"
    )
    if not root.is_dir():
        raise FileNotFoundError(f"{run_dir} holds no checkpoints/ directory")
    manager = CheckpointManager(root)
    named = manager.latest()
    rows = []
    for path in manager.candidates():
        check = verify(path)
        rows.append(
            {
                "name": path.name,
                "step": check.step,
                "bytes": check.bytes,
                "verified": check.ok and not check.legacy,
                "loadable": check.ok,
                "legacy": check.legacy,
                "detail": check.describe(),
                "latest": named is not None and path == named,
            }
        )
    return {"root": str(root), "latest": named.name if named else None, "checkpoints": rows}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['root']}  (latest -> {report['latest'] or 'none'})"]
    if not report["checkpoints"]:
        lines.append("  no checkpoints")
    for row in report["checkpoints"]:
        state = "ok" if row["verified"] else ("unverified" if row["loadable"] else "BAD")
        mark = "  <- latest" if row["latest"] else ""
        step = "?" if row["step"] is None else row["step"]
        lines.append(
            f"  {row['name']}  step {step:>8}  {_format_bytes(row['bytes']):>10}  "
            f"{state:<10}  {row['detail']}{mark}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        report = inspect_run(args.run)
    except FileNotFoundError as error:
        print(f"fluid checkpoints: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    rows = report["checkpoints"]
    return 0 if rows and rows[0]["loadable"] else 1
