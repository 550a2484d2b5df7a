"""The papers' recipes as a markdown table, from tests/fixtures/paper_recipes.yaml (the values
tests/test_recipes.py checks every paper experiment against), for the docs' experiments page
(scripts/docs_reference.py fills it in when the site is built).

Run from the checkout: ``.venv/bin/python scripts/recipe_table.py`` prints it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "paper_recipes.yaml"
SECTIONS = (("deit", "DeiT (recipe=deit, every paper run)"),
            ("cait", "CaiT (recipe=cait, CaiT rows)"),
            ("cait_finetune_384.finetune", "cait_finetune_384, fine-tune stage"),
            ("deit_distilled", "deit_distilled"))


def table() -> str:
    ref = yaml.safe_load(FIXTURE.read_text())
    lines = ["| recipe | key | value | source |", "|---|---|---|---|"]
    for path, title in SECTIONS:
        section = ref
        for part in path.split("."):
            section = section[part]
        for key, (value, source) in section.items():
            lines.append(f"| {title} | `{key}` | `{value}` | {source} |")
    batch = ref["differs"]["global_batch"]
    lines.append(f"| differs on purpose | global batch | `{batch['caitlab']}` (papers: "
                 f"`{batch['paper'][0]}`) | {' '.join(batch['why'].split())} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
