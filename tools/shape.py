"""Print the shape of the package: largest files and functions, private cross-module imports, local imports.

    python tools/shape.py [--top N]

Reads src/minillm with `ast` (nothing is imported or run). A private cross-module import is
`from X import _name` (or `import X._y`) where X is another module of the package; a function-local
import is an import statement inside a function body.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "minillm"


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def private_imports(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            internal = node.level > 0 or (node.module or "").startswith("minillm")
            for alias in node.names:
                if internal and alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"from {'.' * node.level}{node.module or ''} import {alias.name}")
    return found


def local_imports(tree: ast.AST) -> int:
    return sum(
        1 for fn in functions(tree) for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    files, funcs, private, local = [], [], [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT)
        text = path.read_text()
        tree = ast.parse(text)
        files.append((len(text.splitlines()), str(rel)))
        for fn in functions(tree):
            funcs.append((fn.end_lineno - fn.lineno + 1, f"{rel}:{fn.lineno} {fn.name}"))
        private += [f"{rel}: {p}" for p in private_imports(tree)]
        if n := local_imports(tree):
            local.append((n, str(rel)))
    readme = len((ROOT / "README.md").read_text().splitlines())
    print("| measure | value |\n|---|---|")
    print(f"| source files | {len(files)} |")
    print(f"| largest file | {max(files)[1]} ({max(files)[0]} lines) |")
    print(f"| largest function | {max(funcs)[1]} ({max(funcs)[0]} lines) |")
    print(f"| files over 400 lines | {sum(n > 400 for n, _ in files)} |")
    print(f"| functions over 80 lines | {sum(n > 80 for n, _ in funcs)} |")
    print(f"| private cross-module imports | {len(private)} |")
    print(f"| function-local imports | {sum(n for n, _ in local)} |")
    print(f"| README lines | {readme} |")
    print("\nlargest files: " + ", ".join(f"{p} ({n})" for n, p in sorted(files, reverse=True)[: args.top]))
    print("largest functions: " + ", ".join(f"{p} ({n})" for n, p in sorted(funcs, reverse=True)[: args.top]))
    for p in private:
        print(f"private import: {p}")
    for n, p in sorted(local, reverse=True):
        print(f"local imports: {p} ({n})")


if __name__ == "__main__":
    main()
