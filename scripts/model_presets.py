"""Writes the architecture lines of every model preset (``src/caitlab/conf/model/*.yaml``) from
its registered variant (``caitlab.models.variants``): after changing a variant, run

    .venv/bin/python scripts/model_presets.py

and commit the presets it rewrote (tests/test_models.py fails while one differs). The lines
between a preset's markers are the variant's; the rest of the preset is its own.
"""

from __future__ import annotations

import sys
from pathlib import Path

from caitlab.config import CONF_DIR
from caitlab.models.presets import preset_files, render


def main() -> int:
    changed = []
    for path in preset_files(Path(CONF_DIR) / "model"):
        text = path.read_text()
        written = render(path.stem, text)
        if written != text:
            path.write_text(written)
            changed.append(path)
    for path in changed:
        print(f"rewrote {path}")
    print(f"{len(changed)} preset(s) rewritten from their variants")
    return 0


if __name__ == "__main__":
    sys.exit(main())
