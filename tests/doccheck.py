"""The documentation as a test: what every Markdown file (and every example's docstring) names must exist.

Sybil lexes the documents (fenced blocks with their language and line, HTML-comment directives), because
its lexers are pluggable: a shell block is not run as written (``mhabench conform`` is hours of work) but
checked command by command against the real parsers, and the few blocks marked ``run`` are executed.
pytest-codeblocks can only run a shell block as written or skip it.

A block may be preceded by one directive:

- ``<!-- docs-test: run -->``: every command in it runs (in a scratch directory) and must exit 0;
- ``<!-- docs-test: file examples/x.py -->``: the block is that file's code, character for character
  (the file itself is what a test runs);
- ``<!-- docs-test: skip REASON -->``: a command the test cannot check (another machine, a download):
  named, with a reason of a few words.

Everything else is checked statically: each ``mhabench`` command is parsed by the CLI's own argparse and
its adapters, areas, dtypes, row ids and benchmark patterns are looked up; ``python -m`` modules must
exist with the options given; ``asv`` commands go through asv's parser; ``pytest`` options through
pytest's; Python blocks run; TOML blocks are read and their keys looked up. In the prose, every
inline-code span that names a path, an option, a dotted name or an identifier must name something the
project has (read from its source without importing it).
"""
from __future__ import annotations

import ast
import fnmatch
import functools
import io
import os
import re
import shlex
import subprocess
import sys
import tokenize
from contextlib import redirect_stderr
from dataclasses import dataclass
from pathlib import Path

from sybil import Document, Region
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer, RawFencedCodeBlockLexer

ROOT = Path(__file__).resolve().parents[1]
# where the source lives, as folders of the repository (the package maps its subpackages onto them)
PACKAGES = {"mhabench": "mhabench", "impls": "mhabench.impls", "conformance": "mhabench.conformance",
            "benchmarks": "mhabench.benchmarks", "reports": "mhabench.reports"}
SOURCE_DIRS = (*PACKAGES, "examples", ".github", ".ci")  # not tests/: a name only a test uses is not documented
SKIP_DIRS = {".git", ".venv", "venv", "results", "build", "dist", "node_modules", "__pycache__", "out",
             ".pytest_cache", ".hypothesis"}
DIRECTIVE = "docs-test"
# third-party roots of dotted names: checked by their own projects, not resolved here (importing them costs
# seconds each)
FOREIGN_ROOTS = {"torch", "tf", "tensorflow", "jax", "jnp", "flax", "nnx", "keras", "tf_keras", "onnx",
                 "onnxruntime", "ort", "np", "numpy", "nn", "asv", "ml_dtypes", "pytest", "hypothesis",
                 "pandas", "matplotlib", "scipy", "F", "layers", "math", "time", "os", "sys", "psutil"}
# options of the tools the docs call besides mhabench (their own parsers are asked where that is cheap)
SHELL_SETUP = {"python3", "cd", "rm", "mkdir", "cp", "export"}


# ---- the documents ----------------------------------------------------------------------------------

def markdown_files() -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(".") or d == ".github")
        found += [Path(folder) / f for f in sorted(files) if f.endswith(".md")]
    return found


def example_modules() -> list[Path]:
    return sorted(p for p in (ROOT / "examples").rglob("*.py") if "__pycache__" not in p.parts)


@dataclass
class Block:
    path: Path
    line: int
    language: str
    source: str
    directive: str | None = None  # "run", "skip", "file"
    argument: str = ""

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _fences(document: Document):
    lexer = RawFencedCodeBlockLexer(info_pattern=re.compile(r"(?P<language>[^\n]*)$\n", re.MULTILINE))
    for region in lexer(document):
        yield region.start, region.end, region.lexemes["language"].strip(), str(region.lexemes["source"])


def _directives(document: Document):
    lexer = DirectiveInHTMLCommentLexer(directive=DIRECTIVE, arguments=".*?")
    for region in lexer(document):
        yield region.start, region.end, region.lexemes["arguments"].strip()


def _parse(path: Path) -> Document:
    def fences(document):
        for start, end, language, source in _fences(document):
            yield Region(start, end, ("fence", language, source), lambda example: None)

    def directives(document):
        for start, end, arguments in _directives(document):
            yield Region(start, end, ("directive", arguments), lambda example: None)
    return Document.parse(str(path), fences, directives)


@functools.lru_cache(maxsize=None)
def blocks(path: Path) -> tuple[Block, ...]:
    """The fenced blocks of a Markdown file, each with the directive right before it (if any)."""
    document = _parse(path)
    out, pending = [], None
    for example in document.examples():
        kind, *rest = example.parsed
        if kind == "directive":
            if pending is not None:
                raise AssertionError(f"{path.relative_to(ROOT)}:{example.line}: a {DIRECTIVE} directive "
                                     f"follows another without a block between them")
            pending = (example.end, rest[0])
            continue
        language, source = rest
        directive, argument = None, ""
        if pending is not None:
            between = document.text[pending[0]:example.start]
            if not re.fullmatch(r"\s*-*>?\s*", between):  # the comment's own "-->" ends the directive
                raise AssertionError(f"{path.relative_to(ROOT)}: a {DIRECTIVE} directive must come right "
                                     f"before its block (line {example.line})")
            directive, _, argument = pending[1].partition(" ")
            pending = None
        out.append(Block(path, example.line, language, source, directive, argument.strip()))
    if pending is not None:
        raise AssertionError(f"{path.relative_to(ROOT)}: a {DIRECTIVE} directive with no block after it")
    return tuple(out)


def prose(path: Path) -> list[tuple[int, str]]:
    """``(line, span)`` for every inline-code span outside the fenced blocks and HTML comments."""
    text = path.read_text()
    document = Document(text, str(path))
    for start, end, *_ in list(_fences(document)):
        text = text[:start] + re.sub(r"[^\n]", " ", text[start:end]) + text[end:]
    text = re.sub(r"<!--.*?-->", lambda m: re.sub(r"[^\n]", " ", m.group()), text, flags=re.S)
    spans = []
    for m in re.finditer(r"(`+)(.+?)\1", text, flags=re.S):
        spans.append((text.count("\n", 0, m.start()) + 1, " ".join(m.group(2).split())))
    return spans


def docstring_commands(path: Path) -> list[tuple[int, str]]:
    """The ``mhabench ...`` command lines of a module's docstring."""
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ""
    out = []
    for number, line in enumerate(doc.splitlines(), 2):
        for m in re.finditer(r"(?:^\s+|``)(mhabench [^`]+?)(?:``|$)", line):
            out.append((number, m.group(1).strip()))
    return out


# ---- what the project has, read from its source ------------------------------------------------------

@dataclass
class Module:
    name: str
    path: Path
    names: dict  # top-level name -> class members (a set) or None

    def resolve(self, parts: list[str], index: "Index") -> bool:
        if not parts:
            return True
        if parts[0] not in self.names:
            return False
        members = self.names[parts[0]]
        if len(parts) == 1:
            return True
        if members is None:
            # a submodule's package attribute, or an attribute of an instance: accept one level of a module
            return index.module(f"{self.name}.{parts[0]}") is not None and \
                index.module(f"{self.name}.{parts[0]}").resolve(parts[1:], index)
        return index.class_has(parts[0], parts[1], self) and len(parts) == 2


def _class_members(node: ast.ClassDef) -> tuple[set, list[str]]:
    members = set()
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            members.add(item.name)
            members.update(n.attr for n in ast.walk(item) if isinstance(n, ast.Attribute)
                           and isinstance(n.ctx, ast.Store) and getattr(n.value, "id", None) == "self")
        elif isinstance(item, ast.Assign):
            members.update(t.id for t in item.targets if isinstance(t, ast.Name))
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            members.add(item.target.id)
    bases = [b.id if isinstance(b, ast.Name) else b.attr for b in node.bases if isinstance(b, (ast.Name, ast.Attribute))]
    return members, bases


class Index:
    """Every module, class, member, identifier and string of the project, from its source files."""

    def __init__(self):
        self.modules: dict[str, Module] = {}
        self.classes: dict[str, list[tuple[set, list[str]]]] = {}
        self.tokens: set[str] = set()
        self.strings: set[str] = set()
        self.options: set[str] = set()
        for folder in SOURCE_DIRS:
            for path in sorted((ROOT / folder).rglob("*")):
                if any(p in SKIP_DIRS for p in path.relative_to(ROOT).parts):
                    continue
                if path.suffix == ".py":
                    self._python(path)
                elif path.suffix in (".toml", ".txt", ".yml", ".yaml", ".json") and path.stat().st_size < 2e6:
                    self._words(path.read_text(errors="replace"))
        for name in ("pyproject.toml", "asv.conf.json"):
            self._words((ROOT / name).read_text())

    def _words(self, text: str) -> None:
        self.tokens.update(re.findall(r"[A-Za-z_][\w]*", text))
        self.strings.update(re.findall(r"[\w.+@-]+", text))

    def _python(self, path: Path) -> None:
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        top = PACKAGES.get(parts[0]) if parts else None
        name = ".".join([top, *parts[1:]] if top else parts)
        tree = ast.parse(path.read_text())
        names = {}
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                members, bases = _class_members(node)
                names[node.name] = members
                self.classes.setdefault(node.name, []).append((members, bases))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names[node.name] = None
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name):
                            names[n.id] = None
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    names[(alias.asname or alias.name).split(".")[0]] = None
            elif isinstance(node, (ast.If, ast.Try)):
                for n in ast.walk(node):
                    if isinstance(n, (ast.FunctionDef, ast.ClassDef)):
                        names[n.name] = None
                    elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                        names[n.id] = None
        self.modules[name] = Module(name, path, names)
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                self.tokens.add(node.id)
            elif isinstance(node, ast.Attribute):
                self.tokens.add(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.tokens.add(node.name)
            elif isinstance(node, ast.arg):
                self.tokens.add(node.arg)
            elif isinstance(node, ast.keyword) and node.arg:
                self.tokens.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                self._words(node.value)
                if node.value.startswith("--"):
                    self.options.add(node.value.split("=")[0])

    def modules_paths(self) -> list[Path]:
        return [m.path for m in self.modules.values()]

    def module(self, dotted: str) -> Module | None:
        return self.modules.get(dotted)

    def modules_ending(self, parts: list[str]) -> list[Module]:
        tail = ".".join(parts)
        return [m for n, m in self.modules.items() if n == tail or n.endswith("." + tail)]

    def class_has(self, cls: str, member: str, seen=None) -> bool:
        for members, bases in self.classes.get(cls, ()):
            if member in members or any(self.class_has(b, member) for b in bases if b != cls):
                return True
        return False

    def dotted(self, name: str) -> bool | None:
        """Whether ``a.b.c`` names something of the project: True/False, None when it is not the project's."""
        parts = [p for p in name.split(".") if p]
        if parts and parts[0] == "mhabench" and len(parts) > 1:
            parts = parts[1:]
        ours = False
        for i in range(len(parts), 0, -1):
            candidates = self.modules_ending(parts[:i])
            ours = ours or bool(candidates)
            if any(m.resolve(parts[i:], self) for m in candidates):
                return True
        if parts[0] in self.classes:
            return len(parts) == 2 and self.class_has(parts[0], parts[1])
        if not ours and parts[0] not in FOREIGN_ROOTS and parts[0] in sys.stdlib_module_names:
            return None
        return False if ours else None

    def has_file_named(self, pattern: str) -> bool:
        return any(fnmatch.fnmatchcase(s, pattern) for s in self.strings)


@functools.lru_cache(maxsize=None)
def index() -> Index:
    return Index()


# ---- the CLI, the benchmarks, the adapters ---------------------------------------------------------

@functools.lru_cache(maxsize=None)
def cli_parser():
    from mhabench.cli import build_parser
    return build_parser()


def subparsers() -> dict:
    import argparse
    for action in cli_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("mhabench has no subcommands")


@functools.lru_cache(maxsize=None)
def cli_options() -> frozenset:
    return frozenset(o for p in subparsers().values() for a in p._actions for o in a.option_strings)


@functools.lru_cache(maxsize=None)
def builtin_adapter_names() -> frozenset:
    """The registry's adapters as a fresh process sees them, less the installed entry-point plugins (tests in
    this process may have registered adapters of their own)."""
    script = ("from importlib.metadata import entry_points; from mhabench.impls import registry; "
              "plugins = {e.name for e in entry_points(group=registry.ENTRY_POINT_GROUP)}; "
              "print('\\n'.join(n for n in registry.list_adapters() if n not in plugins))")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return frozenset(done.stdout.split())


def adapter_names() -> frozenset:
    return builtin_adapter_names() | frozenset(entry_point_names())


def entry_point_names() -> list[str]:
    """The adapters the example plugin package declares (a user installs it to get them)."""
    import tomllib
    names = []
    for pyproject in (ROOT / "examples").glob("*/pyproject.toml"):
        data = tomllib.loads(pyproject.read_text())
        names += list(data.get("project", {}).get("entry-points", {}).get("mhabench.adapters", {}))
    return names


@functools.lru_cache(maxsize=None)
def benchmark_names() -> tuple[str, ...]:
    """``module.Class.method`` of every asv benchmark, from the source (asv's naming)."""
    out = []
    for path in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        classes = {n.name: n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef)}

        def methods(node):
            own = [i.name for i in node.body if isinstance(i, ast.FunctionDef)]
            inherited = [m for b in node.bases if getattr(b, "id", None) in classes for m in methods(classes[b.id])]
            return own + inherited
        for name, node in classes.items():
            if not name.startswith("_"):
                out += [f"{path.stem}.{name}.{m}" for m in methods(node) if re.match(r"(track|time|peakmem|mem)_", m)]
    return tuple(out)


def plugin_name(target: str, base: Path) -> str:
    """The adapter name a ``module:Class`` or ``file.py:Class`` target registers, read from its source."""
    module, _, cls = target.rpartition(":")
    assert module and cls, f"--adapter {target}: expected MODULE:CLASS or FILE.py:CLASS"
    candidates = [base / module, ROOT / module, ROOT / "examples" / module] if module.endswith(".py") else \
        [d / (module.replace(".", "/") + ".py") for d in (base, ROOT, ROOT / "examples")]
    path = next((p for p in candidates if p.is_file()), None)
    assert path is not None, f"--adapter {target}: no such module or file ({module})"
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.Assign) and any(getattr(t, "id", None) == "name" for t in item.targets):
                    return ast.literal_eval(item.value)
            raise AssertionError(f"--adapter {target}: class {cls} has no name")
    raise AssertionError(f"--adapter {target}: {path.relative_to(ROOT)} has no class {cls}")


# ---- commands ----------------------------------------------------------------------------------------

PLACEHOLDER = "COMMIT"


def command_lines(source: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments and empty lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", source)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\$\([^)]*\)", PLACEHOLDER, line)  # $(git rev-parse HEAD): a value
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            raise AssertionError(f"{line.strip()}: {exc}") from None
        if words:
            out.append(line)
    return out


def simple_commands(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    out, current = [], []
    for word in lexer:
        if word in ("|", "&&", "||", ";", "&"):
            out.append(current)
            current = []
        else:
            current.append(word)
    out.append(current)
    return [c for c in out if c]


def check_command(words: list[str], base: Path) -> None:
    """Check one simple command against what it calls; AssertionError saying what is wrong."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        variable = words[0].split("=")[0]
        assert variable in index().tokens, f"{variable} is read nowhere in the project"
        words = words[1:]
    if not words:
        return
    program, args = words[0], words[1:]
    if program in (".", "source"):
        assert args and args[0].endswith("bin/activate"), f"{' '.join(words)}: only a venv's activate is sourced"
    elif program in ("python", "python3") and args[:2] == ["-m", "venv"]:
        pass
    elif program in ("python", "python3") and args[:2] == ["-m", "pip"] or program == "pip":
        check_pip(args[2:] if program != "pip" else args)
    elif program in ("python", "python3") and args[:2] == ["-m", "pytest"] or program == "pytest":
        check_pytest(args[2:] if program != "pytest" else args, base)
    elif program in ("python", "python3") and args[:2] == ["-m", "asv"]:
        check_asv(args[2:])
    elif program in ("python", "python3") and args[:1] == ["-m"]:
        check_module(args[1], args[2:])
    elif program == "mhabench":
        check_mhabench(args, base)
    elif program == "asv":
        check_asv(args)
    else:
        raise AssertionError(f"{program}: a command this test cannot check; precede its block with "
                             f"<!-- {DIRECTIVE}: skip REASON -->")


def check_pip(args: list[str]) -> None:
    import tomllib
    assert args and args[0] == "install", f"pip {' '.join(args)}: only pip install is documented"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for arg in args[1:]:
        m = re.fullmatch(r"(?:\.|\./)?\[([\w,-]+)\]", arg)
        if m:
            unknown = set(m.group(1).split(",")) - set(extras)
            assert not unknown, f"pip install {arg}: no extra {sorted(unknown)} in pyproject.toml"
        elif arg.startswith("./") or arg.startswith("examples/"):
            assert (ROOT / arg).exists(), f"pip install {arg}: no such path"


def _parse_args(parser, args: list[str], what: str):
    stderr = io.StringIO()
    try:
        with redirect_stderr(stderr):
            return parser.parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"{what} {' '.join(args)}: {stderr.getvalue().strip() or exc}") from None


def check_mhabench(args: list[str], base: Path) -> None:
    from mhabench.options import split_list
    what = "mhabench"
    parsed = _parse_args(cli_parser(), args, what)
    command = parsed.command
    assert command, f"mhabench {' '.join(args)}: no command"
    plugins = [plugin_name(t, base) for t in getattr(parsed, "adapter", None) or []]
    known = sorted(adapter_names() | set(plugins))
    try:
        split_list(getattr(parsed, "adapters", None), known, "adapters", "--adapters")
        if command == "conform":
            from mhabench.conformance.session import SELECTABLE_AREAS
            from mhabench.results import DTYPES
            split_list(parsed.areas, list(SELECTABLE_AREAS), "areas", "--areas")
            split_list(parsed.dtypes, list(DTYPES), "dtypes", "--dtypes")
            from mhabench.commands import conform
            conform.check_options(parsed)
            for switch in parsed.switch:
                name, _, setting = switch.partition("=")
                assert name in index().tokens and setting in index().strings, f"--switch {switch}: no such switch"
            if parsed.rerun:
                check_row_id(parsed.rerun, known)
        if command == "bench" and parsed.bench:
            pattern = re.compile(parsed.bench)
            assert any(pattern.search(n) for n in benchmark_names()), \
                f"--bench {parsed.bench!r} matches none of {', '.join(benchmark_names())}"
        if command == "bench" and parsed.profile:
            from mhabench.benchmarks.profiles import PROFILES
            assert parsed.profile in PROFILES, f"--profile {parsed.profile}: expected one of {list(PROFILES)}"
    except ValueError as exc:
        raise AssertionError(f"mhabench {' '.join(args)}: {exc}") from None


def check_row_id(text: str, adapters) -> None:
    from mhabench.conformance.cases import find_case
    from mhabench.schema import RowId
    row = RowId.parse(text, adapters)
    assert row is not None, f"{text}: not a row id (<adapter>-<case>-<dtype>-<quantity>)"
    assert find_case(row.case) is not None, f"{text}: no case {row.case} in the matrix"


@functools.lru_cache(maxsize=None)
def pytest_help() -> str:
    return subprocess.run([sys.executable, "-m", "pytest", "--help", "-p", "no:cacheprovider", "tests",
                           "conformance"], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout


def check_pytest(args: list[str], base: Path) -> None:
    takes_value = {"-k", "-m", "-n", "--dtypes", "--adapters", "--examples", "--dist", "-p"}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            option = arg.split("=")[0]
            assert re.search(rf"(^|[\s,]){re.escape(option)}([\s=,]|$)", pytest_help(), re.M), \
                f"pytest {option}: no such option"
            if option in takes_value and "=" not in arg:
                i += 1
        else:
            assert (ROOT / arg.split("::")[0]).exists(), f"pytest {arg}: no such path"
        i += 1


def check_module(module: str, args: list[str]) -> None:
    import importlib.util
    assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"
    source = index().modules.get(module)
    assert source is not None, f"python -m {module}: not a module of the project"
    text = source.path.read_text()
    for arg in args:
        if arg.startswith("--"):
            option = arg.split("=")[0]
            assert f'"{option}"' in text or f"'{option}'" in text, f"python -m {module} {option}: no such option"


def check_asv(args: list[str]) -> None:
    from asv.commands import make_argparser
    parser, _ = make_argparser()
    _parse_args(parser, args, "asv")


def check_block_commands(block: Block) -> None:
    for line in command_lines(block.source):
        for words in simple_commands(line):
            try:
                check_command(words, block.path.parent)
            except AssertionError as exc:
                raise AssertionError(f"{block.where}: {line.strip()}\n  {exc}") from None


# ---- inline names ------------------------------------------------------------------------------------

PATH_SUFFIXES = (".py", ".toml", ".json", ".jsonl", ".csv", ".md", ".txt", ".yml", ".html", ".cfg", ".conf")
IDENTIFIER = re.compile(r"[A-Za-z_][\w]*\*?(\(\))?")
DOTTED = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_*][\w*]*)+(\(\))?")
BENCHMARK_METHOD = re.compile(r"(track|time|peakmem|mem)_[\w*]+")
ADAPTER = re.compile(r"[a-z_]+(@[a-z]+)?(\+[a-z_]+)?")


def check_path(span: str, doc: Path) -> str | None:
    """Why a path-like span names nothing, or None."""
    path = span.split(":")[0] if re.search(r"\.py:\w+$", span) else span
    if path.startswith(("~", "/", "$", "http", ".venv")) or "://" in path:
        return None
    pattern = re.sub(r"<[^>]*>|\.\.\.", "*", path).rstrip("/")
    for base in (doc.parent, ROOT):
        target = (base / pattern)
        try:
            target.resolve().relative_to(ROOT)
        except ValueError:
            return f"{span}: outside the repository"
        if list(ROOT.glob(str(target.resolve().relative_to(ROOT)))) if "*" in pattern else target.exists():
            return None
    name = pattern.rsplit("/", 1)[-1]
    if "/" not in pattern and any(True for _ in doc.parent.rglob(pattern) if SKIP_DIRS.isdisjoint(_.parts)):
        return None  # a file named by itself, under the document's folder, in a sentence that says where
    if name.endswith(".py"):
        return f"{span}: no such module in the repository"
    if index().has_file_named(name) or index().has_file_named(name.rsplit(".", 1)[0]):
        return None  # a file the project writes (results, reports) or names
    return f"{span}: no such file in the repository, and nothing in the project writes one of that name"


def check_span(span: str, doc: Path) -> str | None:
    """Why an inline-code span names something that does not exist, or None."""
    span = span.strip()
    if not span or span.startswith("mhabench "):
        return check_inline_command(span, doc)
    if span.startswith("--"):
        option = re.split(r"[ =]", span)[0].rstrip(",.")
        if option in cli_options() | index().options or re.search(rf"(^|[\s,]){re.escape(option)}([\s=,]|$)",
                                                                   pytest_help(), re.M):
            return None
        return f"{option}: no such option of mhabench, its modules or pytest"
    if " " in span or span.startswith("-"):
        return None
    if re.search(r"\b[A-Z]{3,}\b", span) and (":" in span or not span.endswith(PATH_SUFFIXES)):
        return None  # a form with placeholders (FILE.py:CLASS), not a name
    if "/" in span or span.endswith(PATH_SUFFIXES):
        return check_path(span, doc)
    if ("+" in span or "@" in span) and ADAPTER.fullmatch(span):
        return None if span in adapter_names() else f"{span}: no such adapter"
    if DOTTED.fullmatch(span):
        name = span.removesuffix("()")
        found = index().dotted(name.replace("*", ""))
        if found is None or found:
            return None
        return f"{span}: the project has no such module, class, function or attribute"
    if BENCHMARK_METHOD.fullmatch(span):  # an asv benchmark method: one the benchmark classes have
        methods = {n.rsplit(".", 1)[1] for n in benchmark_names()}
        return None if any(fnmatch.fnmatchcase(m, span) or m.startswith(span) for m in methods) else \
            f"{span}: no benchmark method of that name ({', '.join(sorted(methods))})"
    if IDENTIFIER.fullmatch(span) and ("_" in span or span.endswith("()") or span.isupper()):
        word = span.removesuffix("()")
        if "*" in word:
            return None if any(fnmatch.fnmatchcase(t, word) for t in index().tokens) else f"{span}: matches nothing"
        return None if word in index().tokens else f"{span}: named nowhere in the project's source"
    return None


def check_inline_command(span: str, doc: Path) -> str | None:
    """A command named in a sentence (``mhabench conform --resume``, ``mhabench report --compare``): the
    command exists and has each option; values are what the blocks check."""
    words = span.split()
    if len(words) < 2:
        return None
    parsers = subparsers()
    if words[1] not in parsers:
        return f"{span}: mhabench has no command {words[1]}"
    options = {o for a in parsers[words[1]]._actions for o in a.option_strings}
    unknown = [w.split("=")[0] for w in words[2:] if w.startswith("-") and w.split("=")[0] not in options]
    return f"{span}: mhabench {words[1]} has no option {', '.join(unknown)}" if unknown else None
