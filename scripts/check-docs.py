#!/usr/bin/env python3
"""Runs the shell blocks of README.md and docs/*.md as a reader pastes them.

Every fenced block must name its language. Blocks in `sh` or `bash` are
run; one that is not meant to be run here says why in its info string,
as in ```sh norun=needs a Kubernetes cluster. Blocks in other languages
(`text` for output, `yaml`, ...) are never run.

The blocks of one file run in order in one bash session, as a reader's
shell would run them (variables carry from block to block), with
`set -euo pipefail`: a failing command, a command grpcurl refuses (flags
after the address, a renamed method or field) or an unset variable fails
the check, which names the block and shows its output.

A file whose first line is `<!-- docs-check: standalone -->` starts what it
needs itself (the by-hand walkthrough) and runs first, before anything else
is up. Then `scripts/up.sh` brings the local system up, the other files run
against it, and the system is stopped. Each file's output is left in
.run/docs-check-<file>.log. Every process a file starts is
killed when it ends. `target/release` in a block means the binaries of
the profile the test command built (`--profile`, default debug).

--self-test runs blocks that must fail (grpcurl's flags after the address,
an unset variable, a method that does not exist) and one that must pass,
against the live system, to show that the check can fail.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(\s*)```(.*)$")
RUN = ("sh", "bash")
STANDALONE = "<!-- docs-check: standalone -->"
FILE_TIMEOUT = 600
MARK = "@@docs-check block "


class Block:
    def __init__(self, path, line, lang, info, text):
        self.path, self.line, self.lang, self.info, self.text = path, line, lang, info, text

    def where(self):
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path):
    """Every fenced block of `path`; a fence without a language is an error."""
    found, errors = [], []
    lines = path.read_text().split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, info = m.group(1), m.group(2).strip()
        start = i + 1
        j = start
        while j < len(lines) and not lines[j].strip().startswith("```"):
            j += 1
        if j == len(lines):
            errors.append(f"{path.relative_to(ROOT)}:{i + 1}: fence never closed")
            break
        lang = info.split()[0] if info else ""
        if not lang:
            errors.append(
                f"{path.relative_to(ROOT)}:{i + 1}: a block without a language: "
                "write ```text for output, or ```sh for commands"
            )
        body = [l[len(indent):] if l.startswith(indent) else l for l in lines[start:j]]
        found.append(Block(path, i + 1, lang, info[len(lang):].strip(), "\n".join(body)))
        i = j + 1
    return found, errors


def runnable(block, errors):
    if block.lang not in RUN:
        return False
    if block.info.startswith("norun"):
        reason = block.info[len("norun"):].lstrip("=").strip()
        if not reason:
            errors.append(f"{block.where()}: norun without a reason (norun=why)")
        return False
    if block.info:
        errors.append(f"{block.where()}: unknown block option {block.info!r} (only norun=why)")
        return False
    return True


def script(file_blocks, profile):
    """One bash script running `file_blocks` in order, marking each on stderr."""
    parts = ["set -euo pipefail", f"cd {ROOT}"]
    for b in file_blocks:
        text = re.sub(r"\btarget/release\b", f"target/{profile}", b.text)
        parts.append(f"printf '%s\\n' '{MARK}{b.where()}' >&2")
        parts.append(text)
    return "\n".join(parts) + "\n"


def run_file(name, file_blocks, profile, env=None):
    """Runs the blocks in a new session; (ok, failing block, output)."""
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write(script(file_blocks, profile))
        path = f.name
    out = tempfile.TemporaryFile()
    process = subprocess.Popen(
        ["bash", path], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True, env=env,
    )
    try:
        code = process.wait(timeout=FILE_TIMEOUT)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        # Whatever the blocks started in the background goes with them.
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        os.unlink(path)
    out.seek(0)
    output = out.read().decode(errors="replace")
    last = None
    for line in output.split("\n"):
        if line.startswith(MARK):
            last = line[len(MARK):]
    ok = code == 0
    if code is None:
        output += f"\n(timed out after {FILE_TIMEOUT} s)"
    return ok, last, output


def report(name, ok, last, output, blocks_by_place):
    (ROOT / ".run" / f"docs-check-{name}.log").write_text(output)
    if ok:
        print(f"docs-check: {name}: ok", flush=True)
        return True
    print(f"docs-check: {name}: FAILED in block {last}", file=sys.stderr)
    block = blocks_by_place.get(last)
    if block is not None:
        print("---- block ----", file=sys.stderr)
        print(block.text, file=sys.stderr)
    tail = output[output.rfind(MARK + last):] if last else output
    print("---- its output ----", file=sys.stderr)
    print(tail[-4000:], file=sys.stderr)
    return False


SELF_TEST = [
    ("grpcurl's flags after the address",
     'G=".tools/bin/grpcurl -cacert .run/pki/ca.pem -cert .run/pki/admin.pem -key .run/pki/admin-key.pem"\n'
     "CP=127.0.0.1:7070\n"
     "$G $CP -d '{\"name\":\"meta-llama/Llama-3.1-8B-Instruct\"}' infermesh.v1.AdminService/GetModel",
     False),
    ("a method that does not exist",
     '.tools/bin/grpcurl -cacert .run/pki/ca.pem -cert .run/pki/admin.pem -key .run/pki/admin-key.pem \\\n'
     "   127.0.0.1:7070 infermesh.v1.AdminService/ListModelz",
     False),
    ("a field that does not exist",
     '.tools/bin/grpcurl -cacert .run/pki/ca.pem -cert .run/pki/admin.pem -key .run/pki/admin-key.pem \\\n'
     "   -d '{\"nmae\":\"x\"}' 127.0.0.1:7070 infermesh.v1.AdminService/GetModel",
     False),
    ("a variable the reader never set",
     'curl -s --cacert .run/pki/ca.pem https://127.0.0.1:8080/v1/models -H "authorization: Bearer $NEVER_SET"',
     False),
    ("the same call written right",
     'G=".tools/bin/grpcurl -cacert .run/pki/ca.pem -cert .run/pki/admin.pem -key .run/pki/admin-key.pem"\n'
     "CP=127.0.0.1:7070\n"
     "$G -d '{\"name\":\"meta-llama/Llama-3.1-8B-Instruct\"}' $CP infermesh.v1.AdminService/GetModel",
     True),
]


def self_test(profile):
    """Shows the check failing on broken blocks and passing a good one."""
    good = True
    for what, text, should_pass in SELF_TEST:
        md = ROOT / ".run" / "docs-check-self-test.md"
        md.write_text(f"# {what}\n\n```sh\n{text}\n```\n")
        found, errors = blocks(md)
        assert not errors, errors
        ok, last, output = run_file(what, found, profile)
        md.unlink()
        if ok != should_pass:
            good = False
            print(f"docs-check self-test: {what}: expected the check to "
                  f"{'pass' if should_pass else 'fail'}; it did not\n{output[-2000:]}",
                  file=sys.stderr)
        else:
            verdict = "passes" if ok else f"fails in {last}"
            print(f"docs-check self-test: {what}: {verdict}, as it must", flush=True)
    return good


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default=os.environ.get("DOCS_PROFILE", "debug"))
    parser.add_argument("--list", action="store_true", help="list the blocks and what is done with each")
    args = parser.parse_args()

    files = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    errors, plan = [], []
    for path in files:
        found, errs = blocks(path)
        errors += errs
        to_run = [b for b in found if runnable(b, errors)]
        standalone = path.read_text().startswith(STANDALONE)
        plan.append((path, standalone, to_run, found))
    if args.list:
        for path, standalone, to_run, found in plan:
            for b in found:
                action = "run" if b in to_run else ("norun: " + b.info if b.lang in RUN else b.lang)
                print(f"{b.where()}: {action}")
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    if args.list:
        return 0
    by_place = {b.where(): b for _, _, to_run, _ in plan for b in to_run}
    good = True
    for path, standalone, to_run, _ in plan:
        if standalone and to_run:
            good &= report(path.name, *run_file(path.name, to_run, args.profile), by_place)
    (ROOT / ".run").mkdir(exist_ok=True)
    up_log = ROOT / ".run" / "docs-check-up.log"
    env = dict(os.environ, PROFILE=args.profile)
    try:
        with open(up_log, "w") as log:
            up = subprocess.run(["scripts/up.sh"], cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if up.returncode != 0:
            print(f"docs-check: scripts/up.sh failed:\n{up_log.read_text()[-4000:]}", file=sys.stderr)
            return 1
        print("docs-check: scripts/up.sh brought the system up", flush=True)
        good &= self_test(args.profile)
        for path, standalone, to_run, _ in plan:
            if not standalone and to_run:
                good &= report(path.name, *run_file(path.name, to_run, args.profile), by_place)
    finally:
        subprocess.run(["scripts/up.sh", "down"], cwd=ROOT, stdout=subprocess.DEVNULL)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
