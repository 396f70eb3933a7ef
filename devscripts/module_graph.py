#!/usr/bin/env python3
"""Prints the library's module dependency graph (top-level modules of crates/gpupool/src,
from `use crate::...` and `crate::...` paths) and any import circle between them."""
import os, re, sys, itertools
root = os.path.join(os.path.dirname(__file__), '..', 'crates', 'gpupool', 'src')
edges = {}
def top(path):
    rel = os.path.relpath(path, root)
    parts = rel.split(os.sep)
    name = parts[0][:-3] if parts[0].endswith('.rs') else parts[0]
    return name
for dirpath, _, files in os.walk(root):
    for f in files:
        if not f.endswith('.rs'): continue
        p = os.path.join(dirpath, f)
        src = open(p).read()
        src = re.sub(r'//[^\n]*', '', src)
        m = top(p)
        for target in re.findall(r'crate::([a-z_]+)', src):
            if target != m:
                edges.setdefault(m, set()).add(target)
        # `use crate::{a, b::c}` groups
        for group in re.findall(r'crate::\{([^}]*)\}', src):
            for t in re.findall(r'(?:^|,)\s*([a-z_]+)', group):
                if t != m: edges.setdefault(m, set()).add(t)
for m in sorted(edges):
    print(f"{m:16} -> {', '.join(sorted(edges[m]))}")
# cycles via DFS
def cycles():
    found = set()
    def dfs(start, node, path):
        for n in edges.get(node, ()):
            if n == start:
                found.add(tuple(path))
            elif n not in path and n > start:
                dfs(start, n, path + [n])
    for s in sorted(edges):
        dfs(s, s, [s])
    return found
cs = cycles()
print("circles:", "none" if not cs else "")
for c in sorted(cs):
    print("  " + " -> ".join(c + (c[0],)))
sys.exit(1 if cs else 0)
