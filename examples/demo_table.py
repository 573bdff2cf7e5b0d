"""Print the before/after table of examples/demo.sh and demo_classify.sh from the results JSON files they wrote."""

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

# (model, held-out data, metric label, results file stem, metric key); a row shows when its files exist.
ROWS = [
    ("SmolLM2-135M", "arithmetic test, 50", "exact match, strict", "smollm2-{}-accuracy", "strict_accuracy"),
    ("SmolLM2-135M", "arithmetic test, 50", "exact match, flexible", "smollm2-{}-accuracy", "flexible_accuracy"),
    ("MiniLM-L6", "reuters-r8 test, 500", "accuracy", "minilm-{}-accuracy", "accuracy"),
    ("MiniLM-L6", "reuters-r8 test, 500", "macro-F1", "minilm-{}-accuracy", "f1_macro"),
]


def results(out: Path, stem: str, stage: str) -> dict | None:
    path = out / f"{stem.format(stage)}.json"
    return json.loads(path.read_text()) if path.exists() else None


def main(out: Path, seconds: int) -> None:
    table = Table(title=f"lorasb demo ({seconds // 60} min {seconds % 60} s)", title_justify="left")
    for column in ("model", "data (held-out)", "metric", "before", "after (LoRA-SB)"):
        table.add_column(column)
    templates = set()
    for model, data, label, stem, key in ROWS:
        before, after = results(out, stem, "base"), results(out, stem, "lorasb")
        if before and after:
            table.add_row(model, data, label, f"{before['metrics'][key]:.3f}", f"{after['metrics'][key]:.3f}")
            if stem.startswith("smollm2"):
                templates |= {before["template"], after["template"]}
    if templates:
        table.caption = f"SmolLM2 before and after: one template, {', '.join(sorted(templates))} (--template-of)"
    Console().print(table)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
