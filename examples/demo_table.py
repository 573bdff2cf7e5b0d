"""Print the before/after table of examples/demo.sh from the results JSON files it wrote."""

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def metric(out: Path, name: str, key: str) -> float:
    return json.loads((out / f"{name}.json").read_text())["metrics"][key]


def main(out: Path, seconds: int) -> None:
    table = Table(title=f"lorasb demo ({seconds // 60} min {seconds % 60} s)", title_justify="left")
    for column in ("model", "data (held-out)", "metric", "before", "after (LoRA-SB)"):
        table.add_column(column)
    rows = [
        ("SmolLM2-135M", "arithmetic test, 100", "exact match, strict", "smollm2-{}-accuracy", "strict_accuracy"),
        ("SmolLM2-135M", "arithmetic test, 100", "exact match, flexible", "smollm2-{}-accuracy", "flexible_accuracy"),
        ("SmolLM2-135M", "arithmetic test, 100", "response loss", "smollm2-{}-loss", "loss"),
        ("MiniLM-L6", "reuters-r8 test, 500", "accuracy", "minilm-{}-accuracy", "accuracy"),
        ("MiniLM-L6", "reuters-r8 test, 500", "macro-F1", "minilm-{}-accuracy", "f1_macro"),
    ]
    for model, data, label, file, key in rows:
        before, after = (metric(out, file.format(stage), key) for stage in ("base", "lorasb"))
        table.add_row(model, data, label, f"{before:.3f}", f"{after:.3f}")
    templates = {
        json.loads((out / f"smollm2-{stage}-accuracy.json").read_text())["template"] for stage in ("base", "lorasb")
    }
    table.caption = f"SmolLM2 before and after: one template, {', '.join(sorted(templates))} (evaluate --template-of)"
    Console().print(table)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
