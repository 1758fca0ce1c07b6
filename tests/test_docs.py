"""The pages a reader follows: README.md and docs/*.md.

Every command they show (`python X.py ...` or `torchrun ... X.py ...`, in a shell block or inline) names a script
that exists, and each of its flags is one that the script's --help lists; a run folder they name
(runs/<data>/<method>) is one train.py writes. Every relative link points to a file that exists, and a link to
a heading to a heading that exists. Commands that need data or weights the tests cannot have are checked only
this way; the search page's Python example runs in test_search.py. Cheap: the --help texts come from one child
process, nothing trains.
"""
import json
import re
import shlex
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest

from formats.annotations import DATASET_NAMES
from machinery.runs import default_out_dir
from vop import TUNE_MODES, VIDEO_PROMPTS

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def page_name(page: Path) -> str:
    return str(page.relative_to(REPO))


def without_code(text: str) -> str:
    """The page's prose: code blocks and inline code blanked (lines kept, so line numbers hold)."""
    text = FENCE.sub(lambda block: "\n" * block.group(0).count("\n"), text)
    return re.sub(r"`[^`]*`", lambda span: "\n" * span.group(0).count("\n"), text)


def shown_commands(page: Path) -> list[tuple[int, list[str]]]:
    """(line, argv) of every python/torchrun command on the page: the lines of its shell blocks (with the
    block's own VAR=... settings expanded, backslash continuations joined) and its inline code spans."""
    text = page.read_text(encoding="utf-8")
    found = []
    for block in FENCE.finditer(text):
        if block.group(1) not in SHELL_BLOCKS:
            continue
        first_line = text.count("\n", 0, block.start(2)) + 1
        variables = {}
        for offset, line in enumerate(block.group(2).replace("\\\n", " ").splitlines()):
            setting = re.fullmatch(r"\s*([A-Za-z_]\w*)=(.*)", line)
            if setting:
                variables[setting.group(1)] = " ".join(shlex.split(setting.group(2), comments=True))
                continue
            line = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda name: variables.get(name.group(1), name.group(0)), line)
            argv = shlex.split(line, comments=True)
            if argv and argv[0] in ("python", "python3", "torchrun"):
                found.append((first_line + offset, argv))
    prose = FENCE.sub(lambda block: "\n" * block.group(0).count("\n"), text)
    for span in re.finditer(r"`([^`]+)`", prose):
        code = " ".join(span.group(1).split())
        if code.startswith(("python ", "torchrun ")):
            found.append((prose.count("\n", 0, span.start()) + 1, shlex.split(code)))
    return found


def script_and_arguments(argv: list[str]) -> tuple[str | None, list[str]]:
    """('train.py', [...]) from `python train.py ...` or `torchrun --nproc_per_node 4 train.py ...`;
    (None, []) for `python -m ...`."""
    if argv[0] != "torchrun" and argv[1] == "-m":
        return None, []
    at = next((i for i, word in enumerate(argv) if word.endswith(".py")), None)
    if at is None:  # `torchrun --nproc_per_node 1` named in prose, with no script
        return None, []
    return argv[at], argv[at + 1:]


def help_key(script: str, arguments: list[str]) -> str:
    """The --help to read: search.py's commands each have their own."""
    if Path(script).name == "search.py" and arguments and arguments[0] in ("index", "query"):
        return f"{script} {arguments[0]}"
    return script


def flags_of(arguments: list[str]) -> list[str]:
    """The flags among the arguments: `[--json]` (an optional one, as usage lines write it) counts, `-1` (a
    value) and `--x=1`'s value do not."""
    flags = []
    for word in arguments:
        word = word.strip("[]")
        if re.match(r"--?[A-Za-z]", word):
            flags.append(word.split("=", 1)[0])
    return flags


# One child process prints every script's --help (each run as `python SCRIPT ... --help` would run it), so
# torch is imported once and no script's settings (threads, signal handlers) reach this process.
HELP_RUNNER = r"""
import contextlib, io, json, os, runpy, sys
texts = {}
for key in json.loads(sys.argv[1]):
    script, *command = key.split(" ")
    out, path = io.StringIO(), list(sys.path)
    sys.argv = [script, *command, "--help"]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_path(script, run_name="__main__")
    except SystemExit:
        pass
    except Exception as error:
        out.write(f"\n{type(error).__name__}: {error}")
    sys.path[:] = path
    texts[key] = out.getvalue()
print(json.dumps(texts))
"""


@pytest.fixture(scope="module")
def commands():
    return [(page, line, argv) for page in PAGES for line, argv in shown_commands(page)]


@pytest.fixture(scope="module")
def help_texts(commands):
    keys = set()
    for _, _, argv in commands:
        script, arguments = script_and_arguments(argv)
        if script is not None and (REPO / script).is_file():
            keys.add(help_key(script, arguments))
    done = subprocess.run([sys.executable, "-c", HELP_RUNNER, json.dumps(sorted(keys))], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_the_pages_show_the_commands_a_reader_runs(commands):
    """The parser finds what the pages show (so the test below cannot pass by finding nothing)."""
    shown = {(page_name(page), " ".join(argv[:2])) for page, _, argv in commands}
    assert ("README.md", "python demo.py") in shown and ("README.md", "python train.py") in shown
    assert ("docs/search.md", "python search.py") in shown
    assert ("docs/speed.md", "python benchmarks/bench_vop.py") in shown
    assert any(argv[0] == "torchrun" for _, _, argv in commands)
    expanded = [argv for page, _, argv in commands if page.name == "training.md" and "--tune" in argv]
    assert expanded and all("--frame-store" in argv for argv in expanded)  # R="..." was expanded


def test_every_command_names_a_script_that_exists_and_flags_its_help_lists(commands, help_texts):
    problems = []
    for page, line, argv in commands:
        script, arguments = script_and_arguments(argv)
        if script is None:
            continue
        where = f"{page_name(page)}:{line}: {' '.join(argv)}\n    "
        if not (REPO / script).is_file():
            problems.append(f"{where}{script} does not exist")
            continue
        text = help_texts[help_key(script, arguments)]
        if "usage:" not in text:
            problems.append(f"{where}{script} --help printed no usage: {text[-300:]}")
            continue
        for flag in flags_of(arguments):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                problems.append(f"{where}{flag} is not among the flags of {help_key(script, arguments)} --help")
    assert not problems, "\n".join(problems)


def test_run_folders_named_in_the_pages_are_those_train_py_writes():
    written = {default_out_dir(data, tune, ()) for data in DATASET_NAMES for tune in TUNE_MODES}
    written |= {default_out_dir(data, "prompts", prompts) for data in DATASET_NAMES
                for count in range(1, len(VIDEO_PROMPTS) + 1) for prompts in combinations(VIDEO_PROMPTS, count)}
    problems = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for folder in re.finditer(r"runs/([\w.-]+)/([\w.-]+)(?=/)", text):
            if folder.group(1) in DATASET_NAMES and folder.group(0) not in written:
                problems.append(f"{page_name(page)}:{text.count(chr(10), 0, folder.start()) + 1}: "
                                f"{folder.group(0)} is not a folder train.py writes")
    assert not problems, "\n".join(problems)


def heading_anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the page's headings: lower case, punctuation dropped, spaces as hyphens, a
    repeated one numbered."""
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
        seen[anchor] = seen.get(anchor, 0) + 1
    return anchors


def test_every_relative_link_points_to_a_file_that_exists():
    problems, links = [], 0
    for page in PAGES:
        prose = without_code(page.read_text(encoding="utf-8"))
        for link in LINK.finditer(prose):
            target = link.group(1)
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            links += 1
            path, _, anchor = target.partition("#")
            where = f"{page_name(page)}:{prose.count(chr(10), 0, link.start()) + 1}: ({target})"
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                problems.append(f"{where} {path} does not exist")
            elif anchor and file.suffix == ".md" and anchor not in heading_anchors(file):
                problems.append(f"{where} {page_name(file)} has no heading #{anchor}")
    assert links > 20 and not problems, "\n".join(problems)


def test_the_readme_is_a_page_a_reader_reads():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    lines = readme.splitlines()
    assert len(lines) <= 220
    assert lines.index("## Read the code") < 100
    linked = {match for match in re.findall(r"\]\((docs/[\w-]+\.md)[)#]", readme)}
    assert len(linked) >= 4 and linked == {page_name(page) for page in PAGES[1:]}  # every page is reachable
    for name, counted in re.findall(r"`(\w+\.py)` \((\d+) lines\)", readme):  # the files' sizes, roughly
        actual = len((REPO / name).read_text(encoding="utf-8").splitlines())
        assert abs(actual - int(counted)) <= 0.25 * actual, f"{name} has {actual} lines, the README says {counted}"
