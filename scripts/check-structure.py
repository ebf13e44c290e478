#!/usr/bin/env python3
"""Checks the shape of the Rust sources: file length, function length in the
edge and import cycles between modules of one crate.

    scripts/check-structure.py

Fails (exit 1, listing each offender) when:
  * a non-test source file under a crate's src/ (integration-tests/ aside) is
    over MAX_FILE_LINES lines, not counting a trailing
    `#[cfg(test)] mod tests { ... }` block;
  * a function in edge/src outside test code is over MAX_FN_LINES lines, from
    its `fn` line to its closing brace;
  * two modules of one crate import each other, directly or round a loop.
    A module is a file (src/a/b.rs or src/a/b/mod.rs); `crate::a::b::Item`
    and `super::b::Item` are edges to the deepest module that exists as a
    file. A module reaching into its own submodules or its parents is not an
    edge: only modules neither of which contains the other count.

Test code is left out of every check: files named tests.rs, tests/
folders, files declared `#[cfg(test)] mod x;` and items under `#[cfg(test)]`.
The scanner is a tokenizer that knows Rust's comments, strings, raw strings
and char literals, and matches braces; it does not parse Rust. It checks
itself on small samples before each run. Stdlib only, so it runs before
anything is installed.
"""

import os
import re
import sys

MAX_FILE_LINES = 600
MAX_FN_LINES = 80

# Folders (relative to the workspace root) never scanned.
SKIPPED_DIRS = ("target", "edge/fuzz")
# Where the file-length check does not apply: the whole-system test harness.
FILE_LENGTH_EXEMPT = ("integration-tests",)
# Where functions are measured.
FN_LENGTH_ROOTS = ("edge/src",)


# ---------------------------------------------------------------- scanning


def blank_non_code(text):
    """Returns `text` with comments, string and char literals replaced by
    spaces, newlines kept, so that offsets and line numbers still match and
    braces inside literals are not seen."""
    out = list(text)
    n = len(text)
    i = 0

    def blank(start, end):
        for k in range(start, min(end, n)):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = text[i]
        nxt = text[i + 1] if i + 1 < n else ""
        if c == "/" and nxt == "/":
            end = text.find("\n", i)
            end = n if end < 0 else end
            blank(i, end)
            i = end
        elif c == "/" and nxt == "*":
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j)
            i = j
        elif c in "rb" and not _ident_char_before(text, i):
            m = re.compile(r'(?:br|r|b)(#*)"').match(text, i)
            if m and ("r" in m.group(0)):
                close = '"' + m.group(1)
                end = text.find(close, m.end())
                end = n if end < 0 else end + len(close)
                blank(i, end)
                i = end
            elif text.startswith('b"', i):
                end = _string_end(text, i + 2)
                blank(i, end)
                i = end
            elif text.startswith("b'", i):
                end = _char_end(text, i + 1)
                blank(i, end)
                i = end
            else:
                i += 1
        elif c == '"':
            end = _string_end(text, i + 1)
            blank(i, end)
            i = end
        elif c == "'":
            end = _char_end(text, i)
            if end > i:
                blank(i, end)
                i = end
            else:
                i += 1  # a lifetime or a label
        else:
            i += 1
    return "".join(out)


def _ident_char_before(text, i):
    return i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_")


def _string_end(text, j):
    """Offset just past the closing quote of a string whose body starts at j."""
    n = len(text)
    while j < n:
        if text[j] == "\\":
            j += 2
        elif text[j] == '"':
            return j + 1
        else:
            j += 1
    return n


def _char_end(text, i):
    """Offset past a char literal opening at i, or i when `'` opens a
    lifetime or a label instead."""
    n = len(text)
    if i + 1 < n and text[i + 1] == "\\":
        end = text.find("'", i + 2)
        return n if end < 0 else end + 1
    if i + 2 < n and text[i + 2] == "'":
        return i + 3
    return i


TOKEN = re.compile(r"r#[A-Za-z_]\w*|[A-Za-z_]\w*|::|\d\w*|\S")


def tokens(code):
    """(text, offset) of each token of blanked code."""
    return [(m.group(0), m.start()) for m in TOKEN.finditer(code)]


def match_brace(code, open_at):
    """Offset of the `}` closing the `{` at open_at (len(code) if none)."""
    depth = 0
    for k in range(open_at, len(code)):
        ch = code[k]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return k
    return len(code)


def item_end(code, start):
    """Offset where the item starting at `start` ends: its `;` or the `}`
    closing its first block."""
    depth = 0
    for k in range(start, len(code)):
        ch = code[k]
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif depth == 0 and ch == ";":
            return k
        elif depth == 0 and ch == "{":
            return match_brace(code, k)
    return len(code)


CFG_TEST = re.compile(r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]")


def test_ranges(code):
    """(start, end) offsets of the items marked `#[cfg(test)]`."""
    ranges = []
    for m in CFG_TEST.finditer(code):
        ranges.append((m.start(), item_end(code, _skip_attributes(code, m.end()))))
    return ranges


def _skip_attributes(code, k):
    """Offset of the item after any further attributes from k on."""
    n = len(code)
    while True:
        while k < n and code[k].isspace():
            k += 1
        if code.startswith("#", k):
            b = code.find("[", k)
            depth = 0
            for j in range(b, n):
                if code[j] == "[":
                    depth += 1
                elif code[j] == "]":
                    depth -= 1
                    if depth == 0:
                        k = j + 1
                        break
            else:
                return n
        else:
            return k


def inside(offset, ranges):
    return any(start <= offset <= end for start, end in ranges)


def line_of(text, offset):
    return text.count("\n", 0, offset) + 1


# --------------------------------------------------------- the file walk


def rust_sources(root):
    """Workspace-relative paths of every .rs file under a crate's src/."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        rel = "" if rel == "." else rel.replace(os.sep, "/")
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".")
            and d != "tests"
            and not _skipped(f"{rel}/{d}" if rel else d)
        )
        if "/src" not in f"/{rel}":
            continue
        for name in sorted(filenames):
            if name.endswith(".rs"):
                found.append(f"{rel}/{name}" if rel else name)
    return found


def _skipped(rel):
    return any(rel == s or rel.startswith(s + "/") for s in SKIPPED_DIRS) or (
        os.path.basename(rel) == "target"
    )


def read(root, rel):
    with open(os.path.join(root, rel), encoding="utf-8") as f:
        return f.read()


TEST_MOD_DECL = re.compile(
    r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]\s*(?:#\s*\[[^\]]*\]\s*)*"
    r"(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;"
)


def test_only_files(root, files):
    """Files compiled only under `cfg(test)`: those a parent declares with
    `#[cfg(test)] mod name;`, and everything below them."""
    present = set(files)
    test_dirs = []
    found = set()
    for rel in files:
        folder, name = os.path.split(rel)
        own = folder if name in ("mod.rs", "lib.rs", "main.rs") else rel[: -len(".rs")]
        for m in TEST_MOD_DECL.finditer(blank_non_code(read(root, rel))):
            child = f"{own}/{m.group(1)}"
            for candidate in (f"{child}.rs", f"{child}/mod.rs"):
                if candidate in present:
                    found.add(candidate)
            test_dirs.append(child + "/")
    for rel in files:
        if any(rel.startswith(d) for d in test_dirs):
            found.add(rel)
    return found


# ------------------------------------------------------- (a) file length


TRAILING_TESTS = re.compile(
    r"#\s*\[\s*cfg\s*\(\s*test\s*\)\s*\]\s*(?:#\s*\[[^\]]*\]\s*)*mod\s+tests\s*\{"
)


def counted_lines(text):
    """Lines of `text`, less a trailing `#[cfg(test)] mod tests { ... }`
    block and the blank lines before it."""
    code = blank_non_code(text)
    cut = len(text)
    for m in TRAILING_TESTS.finditer(code):
        close = match_brace(code, m.end() - 1)
        if code[close + 1 :].strip() == "":
            cut = m.start()
            break
    kept = text[:cut].rstrip()
    return kept.count("\n") + 1 if kept else 0


def check_file_lengths(root, files):
    offenders = []
    for rel in files:
        if any(rel.startswith(p + "/") for p in FILE_LENGTH_EXEMPT):
            continue
        n = counted_lines(read(root, rel))
        if n > MAX_FILE_LINES:
            offenders.append(f"{rel}: {n} lines (limit {MAX_FILE_LINES})")
    return offenders


# --------------------------------------------------- (b) function length


def long_functions(text, limit=MAX_FN_LINES):
    """(name, first line, lines) of each function outside test code whose
    body runs over `limit` lines."""
    code = blank_non_code(text)
    skip = test_ranges(code)
    toks = tokens(code)
    found = []
    for idx, (tok, off) in enumerate(toks):
        if tok != "fn" or idx + 1 >= len(toks) or inside(off, skip):
            continue
        name, _ = toks[idx + 1]
        if not re.match(r"(r#)?[A-Za-z_]", name):
            continue  # an `fn(..)` pointer type
        end = item_end(code, off)
        if end >= len(code) or code[end] != "}":
            continue  # a declaration without a body
        first, last = line_of(code, off), line_of(code, end)
        if last - first + 1 > limit:
            found.append((name, first, last - first + 1))
    return found


def check_function_lengths(root, files):
    offenders = []
    for rel in files:
        if not any(rel.startswith(p + "/") for p in FN_LENGTH_ROOTS):
            continue
        for name, first, n in long_functions(read(root, rel)):
            offenders.append(
                f"{rel}:{first}: fn {name} is {n} lines (limit {MAX_FN_LINES})"
            )
    return offenders


# ------------------------------------------------------ (c) import cycles


def crates(files):
    """{crate dir: [files under its src/]} (a crate dir holds src/)."""
    by_crate = {}
    for rel in files:
        crate = "" if rel.startswith("src/") else rel.partition("/src/")[0]
        by_crate.setdefault(crate, []).append(rel)
    return by_crate


def module_of(crate, rel):
    """The module path (tuple) of a file of the library crate rooted at
    crate/src/lib.rs, or None for files of binary targets."""
    inner = rel[len(crate) + 1 :] if crate else rel
    inner = inner[len("src/") :]
    parts = inner[: -len(".rs")].split("/")
    if parts[0] == "bin" or parts == ["main"]:
        return None
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return tuple(parts)


def use_paths(toks, start):
    """Expands the use tree whose first token is toks[start]: returns
    ([(path tuple, token index)], index of the closing `;`)."""
    paths = []

    def tree(i, prefix):
        path = list(prefix)
        while i < len(toks):
            t = toks[i][0]
            if t == "{":
                i += 1
                while toks[i][0] != "}":
                    i = tree(i, path)
                    if toks[i][0] == ",":
                        i += 1
                return i + 1
            if t == "::":
                i += 1
                continue
            if t == "*":
                paths.append((tuple(path), start))
                return i + 1
            if t in (",", "}", ";"):
                paths.append((tuple(path), start))
                return i
            if t == "as":
                i += 2
                continue
            if t == "self" and path:
                i += 1
                continue
            path.append(t)
            i += 1
        return i

    i = tree(start, [])
    while i < len(toks) and toks[i][0] != ";":
        i += 1
    return paths, i


def imports(text, module):
    """(target path tuple, line) for each `crate::` or `super::` path of a
    file at `module`, outside test code."""
    code = blank_non_code(text)
    skip = test_ranges(code)
    toks = tokens(code)
    found = []
    i = 0
    while i < len(toks):
        tok, off = toks[i]
        if inside(off, skip):
            i += 1
            continue
        if tok == "use":
            paths, i = use_paths(toks, i + 1)
            for path, _ in paths:
                resolved = resolve(path, module)
                if resolved is not None:
                    found.append((resolved, line_of(code, off)))
            continue
        if tok in ("crate", "super") and i + 1 < len(toks) and toks[i + 1][0] == "::":
            prev = toks[i - 1][0] if i else ""
            if prev != "::":
                path = [tok]
                j = i + 1
                while j + 1 < len(toks) and toks[j][0] == "::" and re.match(
                    r"[A-Za-z_]", toks[j + 1][0]
                ):
                    path.append(toks[j + 1][0])
                    j += 2
                resolved = resolve(tuple(path), module)
                if resolved is not None:
                    found.append((resolved, line_of(code, off)))
                i = j
                continue
        i += 1
    return found


def resolve(path, module):
    """The absolute path of a `crate::`/`super::` path seen in `module`."""
    if not path:
        return None
    if path[0] == "crate":
        return tuple(path[1:])
    if path[0] == "super":
        base = list(module)
        rest = list(path)
        while rest and rest[0] == "super":
            if not base:
                return None
            base.pop()
            rest.pop(0)
        return tuple(base + rest)
    return None


def deepest_module(path, modules):
    for k in range(len(path), -1, -1):
        if path[:k] in modules:
            return path[:k]
    return ()


def contains(a, b):
    return b[: len(a)] == a


def import_graph(root, crate_files, crate):
    """{module: {module: [lines where it is imported]}} of one crate, and
    {module: file}."""
    files_of = {}
    for rel in crate_files:
        module = module_of(crate, rel)
        if module is not None:
            files_of[module] = rel
    graph = {m: {} for m in files_of}
    for module, rel in files_of.items():
        for path, line in imports(read(root, rel), module):
            target = deepest_module(path, files_of)
            if contains(module, target) or contains(target, module):
                continue
            graph[module].setdefault(target, []).append(line)
    return graph, files_of


def strongly_connected(graph):
    """Tarjan's algorithm, iterative: the components of more than one node."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []
    counter = [0]
    for root_node in sorted(graph):
        if root_node in index:
            continue
        work = [(root_node, iter(sorted(graph[root_node])))]
        index[root_node] = low[root_node] = counter[0]
        counter[0] += 1
        stack.append(root_node)
        on_stack.add(root_node)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    return comps


def check_import_cycles(root, files):
    offenders = []
    for crate, crate_files in sorted(crates(files).items()):
        graph, files_of = import_graph(root, crate_files, crate)
        for comp in strongly_connected(graph):
            names = ", ".join("crate::" + "::".join(m) for m in comp)
            lines = [f"{crate or '.'}: import cycle between {names}:"]
            for a in comp:
                for b in comp:
                    if b in graph[a]:
                        where = ",".join(str(n) for n in sorted(set(graph[a][b])))
                        lines.append(
                            f"    {files_of[a]}:{where} imports crate::{'::'.join(b)}"
                        )
            offenders.append("\n".join(lines))
    return offenders


# ------------------------------------------------------------ self test


def self_test():
    src = (
        'fn a() {\n    let s = "}";\n    let c = \'}\';\n    let r = r#"{"#;\n'
        "    // }\n    /* { /* } */ */\n    let _l: &'static str = s;\n}\n"
    )
    code = blank_non_code(src)
    assert match_brace(code, code.index("{")) == len(src) - 2, code
    body = "\n".join(["    x();"] * 85)
    text = f"fn long() {{\n{body}\n}}\n#[cfg(test)]\nmod tests {{\n    fn t() {{\n{body}\n    }}\n}}\n"
    assert long_functions(text) == [("long", 1, 87)], long_functions(text)
    assert counted_lines(text) == 87, counted_lines(text)
    uses = "use crate::{a::B, b::{c::D, self}};\nuse super::e::F;\nfn f() { crate::g::h(); }\n"
    got = sorted(p for p, _ in imports(uses, ("x", "y")))
    assert got == [("a", "B"), ("b",), ("b", "c", "D"), ("g", "h"), ("x", "e", "F")], got
    assert contains(("a",), ("a", "b")) and not contains(("a", "b"), ("a", "c"))
    graph = {("a",): {("b",): [1]}, ("b",): {("c",): [1]}, ("c",): {("a",): [1]}, ("d",): {}}
    assert strongly_connected(graph) == [[("a",), ("b",), ("c",)]]


def main():
    self_test()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = rust_sources(root)
    test_only = test_only_files(root, files)
    files = [f for f in files if f not in test_only and os.path.basename(f) != "tests.rs"]
    sections = [
        (f"files over {MAX_FILE_LINES} lines", check_file_lengths(root, files)),
        (f"edge functions over {MAX_FN_LINES} lines", check_function_lengths(root, files)),
        ("import cycles between modules", check_import_cycles(root, files)),
    ]
    failed = False
    for title, offenders in sections:
        if offenders:
            failed = True
            print(f"{title}:", file=sys.stderr)
            for o in offenders:
                print(f"  {o}", file=sys.stderr)
    if failed:
        return 1
    print(f"structure ok: {len(files)} source files checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
