"""The manual says what is so: its runnable blocks run and print what it shows, the `amp`
commands and options it names exist, the repository paths it names exist, and nothing in the
repository points at files outside it.

A block is runnable when an HTML comment `<!-- run -->` (options: `exit=N`, `timeout=S`)
stands right before its fence. Shell blocks run in bash, Python blocks in this interpreter,
each in a fresh folder holding links to `recipes/` and `examples/`, with this environment's
`amp` first on PATH and `COLUMNS=100` (Python blocks in children forked from one process that
imported amp_plugin once). When `<!-- output -->` stands before the next fence,
that fence holds (part of) what the block prints: each of its lines must appear in the
output, in order; `...` matches anything (timings, paths). `mkdocs build --strict` (run by
`make docs` and `make test`) checks the links and anchors."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]

RUN = re.compile(r"^\s*<!--\s*run\b(?P<opts>[^>]*?)-->\s*$")
OUTPUT = re.compile(r"^\s*<!--\s*output\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[\w+-]*)")
SHELLS = {"bash", "sh", "shell", "console"}
BOX = str.maketrans("", "", "│┃┏┓┗┛━┳┻╋┡┩╇─┌┐└┘├┤┬┴┼╭╮╰╯═║")


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    opts: dict[str, str] = field(default_factory=dict)
    expected: str | None = None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _fence(lines: list[str], start: int) -> tuple[str, str, int]:
    """(info, body, index after the closing fence) of the fence opening at `start`."""
    m = FENCE.match(lines[start])
    if m is None:
        raise ValueError(f"line {start + 1}: a marker must stand right before a fenced block")
    indent, fence = len(m["indent"]), m["fence"]
    body = []
    for i in range(start + 1, len(lines)):
        if lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == "":
            return m["info"], "\n".join(ln[indent:] for ln in body) + "\n", i + 1
        body.append(lines[i])
    raise ValueError(f"line {start + 1}: fence never closed")


def _next_content(lines: list[str], i: int) -> int:
    while i < len(lines) and not lines[i].strip():
        i += 1
    return i


def fenced_blocks(page: Path) -> list[tuple[int, str, str]]:
    """Every fenced block of a page: (line, info, body)."""
    lines, out, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            info, body, end = _fence(lines, i)
            out.append((i + 1, info, body))
            i = end
        else:
            i += 1
    return out


def runnable_blocks(page: Path) -> list[Block]:
    lines, blocks, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        m = RUN.match(lines[i])
        if m is None:
            i += 1
            continue
        start = _next_content(lines, i + 1)
        info, code, end = _fence(lines, start)
        opts = dict(kv.split("=", 1) for kv in m["opts"].split())
        block = Block(page, start + 1, info, code, opts)
        j = _next_content(lines, end)
        if j < len(lines) and OUTPUT.match(lines[j]):
            _, block.expected, end = _fence(lines, _next_content(lines, j + 1))
        blocks.append(block)
        i = end
    return blocks


BLOCKS = [b for page in PAGES for b in runnable_blocks(page)]


def _norm(line: str) -> str:
    return " ".join(line.translate(BOX).split())


def _pattern(expected: str) -> re.Pattern:
    return re.compile(".*".join(re.escape(part) for part in _norm(expected).split("...")))


def assert_shows(expected: str, output: str) -> None:
    """Each line of `expected` matches a line of `output`, in order (`...`: anything)."""
    actual = [_norm(line) for line in output.splitlines()]
    j = 0
    for line in expected.splitlines():
        if _norm(line) in ("", "..."):
            continue
        pattern = _pattern(line)
        while j < len(actual) and not pattern.search(actual[j]):
            j += 1
        assert j < len(actual), f"the page shows {line.strip()!r}; the command printed:\n{output}"
        j += 1


# Python blocks run in children forked from one process that has imported amp_plugin (and so
# torch, timm, open_clip and NNI) once: each block still gets a fresh interpreter state, and
# the suite does not pay the imports a dozen times.
REPLY = "@@docs-block "
FORK_SERVER = f"REPLY = {REPLY!r}\n" + """
import json, os, runpy, signal, sys, traceback
import amp_plugin, nni.compression.pruning, timm, torch  # noqa: F401  (imported once, forked)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.chdir(job["cwd"])
            out = os.open(job["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(out, 2)
            signal.alarm(job["timeout"])
            sys.argv = [job["script"], *job["args"]]
            runpy.run_path(job["script"], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(REPLY + json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(ROOT),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.fixture(scope="module")
def python_server():
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    yield server
    server.stdin.close()
    server.wait(timeout=60)


def run_block(block: Block, tmp_path: Path, server) -> tuple[int, str]:
    """(exit status, stdout and stderr) of a block run in a fresh folder."""
    for name in ("recipes", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    timeout = int(block.opts.get("timeout", 300))
    lines = [ln for ln in block.code.splitlines() if ln.strip()]
    if block.lang in SHELLS and all(ln.startswith("python ") for ln in lines):
        # `python SCRIPT ARGS` lines run like Python blocks, one after the other
        printed = ""
        for ln in lines:
            script, *args = shlex.split(ln)[1:]
            rc, out = _serve(server, tmp_path, ROOT / script, args, timeout)
            printed += out
            if rc:
                break
        return rc, printed
    if block.lang in SHELLS:
        out = subprocess.run(["bash", "-eo", "pipefail", "-c", block.code], cwd=tmp_path,
                             env=_env(), capture_output=True, text=True, timeout=timeout)
        return out.returncode, out.stdout + out.stderr
    assert block.lang == "python", f"{block.id}: cannot run a {block.lang!r} block"
    script = tmp_path / "block.py"
    script.write_text(block.code)
    return _serve(server, tmp_path, script, [], timeout)


def _serve(server, cwd: Path, script: Path, args: list[str], timeout: int) -> tuple[int, str]:
    log = cwd / "block.log"
    job = {"script": str(script), "args": args, "cwd": str(cwd), "out": str(log),
           "timeout": timeout}
    server.stdin.write(json.dumps(job) + "\n")
    server.stdin.flush()
    reply = ""
    while not reply.startswith(REPLY):  # the imports may print warnings first
        reply = server.stdout.readline()
        assert reply, "the process running the Python blocks died"
    return json.loads(reply.removeprefix(REPLY))["rc"], log.read_text()


def test_runnable_blocks_found():
    assert len(BLOCKS) >= 6, [b.id for b in BLOCKS]
    assert {b.lang for b in BLOCKS} >= {"bash", "python"}


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_runnable_block(block: Block, tmp_path, python_server):
    rc, printed = run_block(block, tmp_path, python_server)
    want = int(block.opts.get("exit", 0))
    assert rc == want, f"{block.id}: exit {rc}, not {want}\n{printed}"
    if block.expected is not None:
        assert_shows(block.expected, printed)


def test_output_matching_is_strict():
    shown = "MLP params: 1,024\n...\nFLOPs: ... M\n"
    assert_shows(shown, "header\nMLP params: 1,024\nx\nFLOPs: 3.2 M\n")
    with pytest.raises(AssertionError):
        assert_shows(shown, "MLP params: 1,025\nFLOPs: 3.2 M\n")
    with pytest.raises(AssertionError):  # order matters
        assert_shows(shown, "FLOPs: 3.2 M\nMLP params: 1,024\n")
    assert_shows("│ parameters │ 1.01B │", "┃ parameters   ┃   1.01B ┃")


# ---- references that can go stale ------------------------------------------------------------
def _amp_commands(page: Path):
    """(line, argv) of every `amp ...` invocation in the shell blocks of a page."""
    for line, info, body in fenced_blocks(page):
        if info not in SHELLS:
            continue
        for text in body.replace("\\\n", " ").splitlines():
            text = text.split(" #", 1)[0].replace("$(which amp)", "amp")
            for part in re.split(r"\s(?:\||&&|;)\s", text):
                words = shlex.split(part.strip().removeprefix("$ "))
                if "amp" in words and not words[0].startswith("-"):
                    yield line, words[words.index("amp") + 1:]


def _options(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


def test_amp_commands_and_options_in_docs_exist():
    import typer
    from amp_cli.app import app

    root = typer.main.get_command(app)
    seen = 0
    for page in PAGES:
        for line, argv in _amp_commands(page):
            where = f"{page.relative_to(ROOT)}:{line}: amp {' '.join(argv)}"
            command, args = root, list(argv)
            while args and hasattr(command, "commands") and not args[0].startswith("-"):
                name = args.pop(0)
                assert name in command.commands, f"{where}: no command {name!r}"
                command = command.commands[name]
            options = _options(command) | {"--help"}
            for arg in args:
                if arg.startswith("--"):
                    assert arg.split("=", 1)[0] in options, f"{where}: no option {arg!r}"
            seen += 1
    assert seen >= 20


REPO_PATH = re.compile(r"`((?:amp_plugin|cli|integration_tests|examples|recipes|docs)/[^`\s]*)`")


def test_repository_paths_in_docs_exist():
    missing = [f"{page.relative_to(ROOT)}: {p}" for page in PAGES
               for p in REPO_PATH.findall(page.read_text())
               if not any(c in p for c in "*<{") and not (ROOT / p).exists()]
    assert not missing, missing


def test_nothing_points_outside_the_repository():
    names = ("ALGORITHM" + ".md", "AUTHORS" + "-SETTINGS", "shared" + "/amp")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    hits = [f"{path}:{n}: {line.strip()}" for path in tracked
            if (ROOT / path).suffix in {".py", ".md", ".yaml", ".toml", ".txt", ".cfg"}
            for n, line in enumerate((ROOT / path).read_text().splitlines(), 1)
            if any(name in line for name in names)]
    assert not hits, hits


def test_readme_example_is_run_in_the_docs():
    """The README's Python example is the start of the one docs/python.md runs, and prints
    what that run is checked to print."""
    (_, _, code), (_, _, shown) = [b for b in fenced_blocks(ROOT / "README.md")
                                   if b[1] in ("python", "text")][:2]
    (run,) = [b for b in runnable_blocks(DOCS / "python.md") if b.lang == "python"]
    assert run.code.startswith(code), "README.md's example differs from docs/python.md's"
    assert shown in run.expected


def test_readme_is_one_screen_and_links_into_the_docs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 120
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    assert not [link for link in local if not (ROOT / link).exists()], local
