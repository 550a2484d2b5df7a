"""Counts the imports inside functions of a source tree, as the layering rule reads them: an
import there must keep a heavy library off a quick path (or break a real cycle) and say so in a
comment on its line. Imports under ``if TYPE_CHECKING:`` are left out (they never run).

    python3 scripts/count_local_imports.py src
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def count(root: Path) -> tuple[int, int, int]:
    """(imports inside functions, of them caitlab's own, of them without a comment)."""
    total = own = bare = 0
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        lines, tree = source.splitlines(), ast.parse(source)
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        seen: set[int] = set()  # an import in a nested function is under two functions
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for n in ast.walk(node):
                if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in typing_only \
                        and id(n) not in seen:
                    seen.add(id(n))
                    total += 1
                    name = n.module if isinstance(n, ast.ImportFrom) else n.names[0].name
                    own += bool(name and name.startswith(("caitlab", "hydra_plugins")))
                    bare += "#" not in lines[n.lineno - 1]
    return total, own, bare


if __name__ == "__main__":
    total, own, bare = count(Path(sys.argv[1] if len(sys.argv) > 1 else "src"))
    print(f"imports inside functions: {total}, caitlab's own: {own}, without a reason: {bare}")
