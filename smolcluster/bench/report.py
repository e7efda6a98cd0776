"""One way every benchmark reports: a Markdown table on stdout and ``bench-NAME.json``."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)"
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_report(
    name: str,
    rows: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
    out_dir: str | Path = ".",
) -> Path:
    """Print ``rows`` as a Markdown table and write them (plus ``extra``) to bench-NAME.json."""
    print(f"\n## bench {name}\n")
    print(markdown_table(rows))
    if extra:
        for k, v in extra.items():  # (a long value, such as a run's curves, only in the JSON)
            print(f"\n- {k}: {v if len(str(v)) < 400 else '(in the JSON)'}")
    path = Path(out_dir) / f"bench-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)  # (a long run must not end on a missing --out folder)
    payload = {
        "bench": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": platform.node(),
        "python": platform.python_version(),
        "rows": rows,
        **(extra or {}),
    }
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"\nraw figures: {path}")
    return path
