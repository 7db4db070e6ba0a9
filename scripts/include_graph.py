"""Print each csrc/ file's line count and its #include "..." edges; exit 1 on a cycle.

    python scripts/include_graph.py [csrc_dir]

Only quoted includes count (our own headers); <...> system headers are not edges.  A cycle
among headers is what makes layers impossible to read in order, so it fails the script.
"""
from __future__ import annotations

import os
import re
import sys

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def graph(root: str) -> tuple[dict[str, int], dict[str, list[str]]]:
    lines: dict[str, int] = {}
    edges: dict[str, list[str]] = {}
    for name in sorted(os.listdir(root)):
        if not name.endswith((".c", ".h")):
            continue
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
            text = f.read()
        lines[name] = text.count("\n")
        edges[name] = INCLUDE.findall(text)
    return lines, edges


def find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {n: WHITE for n in edges}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        colour[n] = GREY
        stack.append(n)
        for m in edges.get(n, []):
            if m not in colour:
                continue  # an include of a file outside csrc/ (numpy, Python)
            if colour[m] == GREY:
                return stack[stack.index(m):] + [m]
            if colour[m] == WHITE:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        colour[n] = BLACK
        return None

    for n in edges:
        if colour[n] == WHITE:
            c = visit(n)
            if c:
                return c
    return None


def main(argv: list[str]) -> int:
    root = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "csrc")
    lines, edges = graph(root)
    width = max(map(len, lines), default=0)
    for name in lines:
        print(f"{name:{width}s} {lines[name]:5d}  -> {', '.join(edges[name]) or '-'}")
    print(f"{'total':{width}s} {sum(lines.values()):5d}")
    cycle = find_cycle(edges)
    if cycle:
        print("include cycle: " + " -> ".join(cycle))
        return 1
    print("no include cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
