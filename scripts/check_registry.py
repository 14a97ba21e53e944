#!/usr/bin/env python3
"""Registry check: docs/IMPLEMENTATION_REGISTRY.md lists every script and utility, and its usage still works.

    python scripts/check_registry.py               # check this checkout
    python scripts/check_registry.py --root DIR    # check another checkout (the tests plant problems in a copy)

Exit 0 with a one-line summary when clean; exit 1 printing `file:line: kind: problem` per problem;
exit 2 when --root holds no scripts/ folder.

The registry is a list of `### Name` entries; an entry is a heading whose block has a **File** line,
and it must also have **Status**, **Purpose**, **Key Features** (bullets), **Usage** (fenced blocks)
and **DRY Rule**. Problems, by kind:
  unlisted  scripts/*.py, scripts/*.sh or scripts/utils/*.py that no entry's **File** names
  missing   an entry's **File**, or a backticked repo path in the prose (`tests/x.py`, also
            `tests/x.py::test_name`), that does not exist; docs/KNOWN_BUGS_AND_FIXES.md's paths too
  field     an entry without one of its fields, a **File** named by two entries
  flag      a `--flag` that a bash usage line passes to a script whose parser does not define it
  usage     a python usage line whose import no longer resolves, an attribute of an imported class
            or a keyword argument of a call that no longer exists, or a block that does not parse

Standard library only, and nothing of the project is imported into this process. Python usage is
checked statically (ast) against the source of scripts/utils. A script's flags come from its own
parser: a child process (this interpreter, so run it with the project's python, as run_tests.sh
does) imports each script and stops its `parse_args([])` at the parser, before anything runs; so
flags made in loops or by shared helpers (`add_generation_arguments`) count like the rest. A shell
script's flags are its `case` arms (`--profile)`); one without such arms (run_tests.sh hands its
arguments to pytest) is not checked.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_ROOT = Path(__file__).resolve().parents[1]
REGISTRY = "docs/IMPLEMENTATION_REGISTRY.md"
REFERENCE_DOCS = (REGISTRY, "docs/KNOWN_BUGS_AND_FIXES.md")
REQUIRED_FIELDS = ("File", "Status", "Purpose", "Key Features", "Usage", "DRY Rule")
LISTED_GLOBS = ("scripts/*.py", "scripts/*.sh", "scripts/utils/*.py")

_FIELD = re.compile(r"^\*\*(?P<name>[A-Za-z ]+)\*\*:\s*(?P<value>.*)$")
_FENCE = re.compile(r"^```(?P<lang>\w*)\s*$")
_BACKTICKED_PATH = re.compile(r"`((?:scripts|tests|docs)/[^`\s]+?)`")
_SCRIPT_TOKEN = re.compile(r"(?:^|/)(scripts/[\w.-]+\.(?:py|sh))$")
_SHELL_SEPARATORS = {";", "&&", "||", "|", "&"}
_CASE_ARM = re.compile(r"^\s*((?:-[-\w]+\|?)+)\)", re.MULTILINE)

# Runs in a child process: import each script, stop its parse_args at the parser, print its --flags.
_PARSER_PROBE = r"""
import argparse, importlib.util, json, sys
from pathlib import Path

class _Stop(Exception):
    pass

def _stop(self, *args, **kwargs):
    raise _Stop(self)

argparse.ArgumentParser.parse_args = _stop
argparse.ArgumentParser.parse_known_args = _stop
found = {}
for path in sys.argv[1:]:
    sys.path.insert(0, str(Path(path).parent))
    try:
        spec = importlib.util.spec_from_file_location("_registry_probe_" + Path(path).stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        build = getattr(module, "parse_args", None)
        if build is None:
            found[path] = {"error": "has no parse_args() to read its flags from"}
            continue
        try:
            build([])
        except TypeError:
            build()
        found[path] = {"error": "parse_args() returned without parsing through argparse"}
    except _Stop as stop:
        found[path] = {"flags": sorted(o for o in stop.args[0]._option_string_actions if o.startswith("--"))}
    except BaseException as err:
        found[path] = {"error": f"its parser could not be built: {type(err).__name__}: {err}"}
print("\n@@registry-probe@@" + json.dumps(found))
"""


@dataclass
class Problem:
    where: str
    line: int
    kind: str
    text: str

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: {self.kind}: {self.text}"


@dataclass
class Block:
    lang: str
    line: int  # line number of the block's first content line
    text: str


@dataclass
class Entry:
    name: str
    line: int
    fields: dict[str, tuple[int, str]] = field(default_factory=dict)
    bullets: int = 0
    blocks: list[Block] = field(default_factory=list)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="repo root to check (default: this file's repo)")
    return parser.parse_args(argv)


# -- reading the markdown ---------------------------------------------------------------------------
def read_markdown(text: str) -> tuple[list[Entry], list[Block], list[tuple[int, str]]]:
    """(entries, every fenced block, prose lines outside blocks with their numbers)."""
    entries, blocks, prose = [], [], []
    current, fence, in_usage = None, None, False
    for number, line in enumerate(text.split("\n"), start=1):
        if fence is not None:
            if line.strip() == "```":
                blocks.append(fence)
                if current is not None and in_usage:
                    current.blocks.append(fence)
                fence = None
            else:
                fence.text += line + "\n"
            continue
        opening = _FENCE.match(line)
        if opening:
            fence = Block(opening.group("lang"), number + 1, "")
            continue
        prose.append((number, line))
        if line.startswith("#"):
            current = Entry(line.lstrip("#").strip(), number) if line.startswith("### ") else None
            if current is not None:
                entries.append(current)
            in_usage = False
            continue
        if current is None:
            continue
        found = _FIELD.match(line.strip())
        if found:
            current.fields[found.group("name")] = (number, found.group("value").strip())
            in_usage = found.group("name") == "Usage"
        elif line.startswith("- ") and list(current.fields)[-1:] == ["Key Features"]:
            current.bullets += 1
    return [e for e in entries if "File" in e.fields], blocks, prose


def _path_of(value: str) -> str:
    found = re.search(r"`([^`]+)`", value)
    return (found.group(1) if found else value.split()[0] if value else "").strip()


# -- static view of scripts/utils -------------------------------------------------------------------
class UtilsSource:
    """What scripts/utils defines, read with ast (a name, a class's attributes, a function's keywords)."""

    def __init__(self, root: Path):
        self.folder = root / "scripts" / "utils"
        self._trees: dict[str, ast.Module | None] = {}

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            path = self.folder / f"{module}.py"
            try:
                self._trees[module] = ast.parse(path.read_text(encoding="utf-8")) if path.is_file() else None
            except SyntaxError:
                self._trees[module] = None
        return self._trees[module]

    def package_exports(self) -> dict[str, str]:
        """The lazy name -> module table of utils/__init__.py (`_EXPORTS`)."""
        tree = self.tree("__init__")
        for node in (tree.body if tree else []):
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets):
                    return {k.value: v.value for k, v in zip(node.value.keys, node.value.values, strict=True)
                            if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}
        return {}

    def definition(self, module: str, name: str):
        """The ast node defining `name` at module level (following `from .other import name`), True for a
        plain assignment, None when undefined."""
        tree = self.tree(module)
        for node in (tree.body if tree else []):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return node
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                return True
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
                return True
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        return self.definition(node.module, alias.name) or True
        return None


def class_attributes(node: ast.ClassDef) -> set[str] | None:
    """Methods, class-level names and `self.x =` assignments; None when a base class may add more."""
    if any(not (isinstance(b, ast.Name) and b.id == "object") for b in node.bases):
        return None
    names = set()
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(item.name)
            for sub in ast.walk(item):
                if (isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store) and isinstance(sub.value, ast.Name)
                        and sub.value.id == "self"):
                    names.add(sub.attr)
        elif isinstance(item, ast.Assign):
            names.update(t.id for t in item.targets if isinstance(t, ast.Name))
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            names.add(item.target.id)
    return names


def keyword_names(node) -> set[str] | None:
    """Keywords a function (or a class through __init__) accepts; None when any keyword goes (**kwargs)."""
    if isinstance(node, ast.ClassDef):
        init = next((i for i in node.body if isinstance(i, ast.FunctionDef) and i.name == "__init__"), None)
        if init is None:
            is_dataclass = any("dataclass" in ast.unparse(d) for d in node.decorator_list)
            if is_dataclass and not node.bases:  # its fields are its keywords
                return {i.target.id for i in node.body if isinstance(i, ast.AnnAssign) and isinstance(i.target, ast.Name)}
            return None
        node = init
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.args.kwarg is not None:
        return None
    return {a.arg for a in node.args.args + node.args.kwonlyargs}  # positional-only ones take no keyword


def check_python_block(block: Block, utils: UtilsSource, where: str) -> list[Problem]:
    problems = []

    def report(node, text):
        problems.append(Problem(where, block.line + getattr(node, "lineno", 1) - 1, "usage", text))

    try:
        tree = ast.parse(block.text)
    except SyntaxError as err:
        return [Problem(where, block.line + (err.lineno or 1) - 1, "usage", f"python block does not parse: {err.msg}")]
    exports = utils.package_exports()
    imported: dict[str, object] = {}  # local name -> its defining node (ClassDef / FunctionDef / True)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "utils"):
            continue
        parts = node.module.split(".")
        for alias in node.names:
            if len(parts) == 1:
                module = exports.get(alias.name)
                if module is None and utils.tree(alias.name) is not None:
                    continue  # `from utils import jsonl_io`: a submodule
                if module is None:
                    report(node, f"`from utils import {alias.name}`: not a package-level name (scripts/utils/__init__.py _EXPORTS)")
                    continue
            else:
                module = parts[1]
            if utils.tree(module) is None:
                report(node, f"`{node.module}`: scripts/utils/{module}.py does not exist or does not parse")
                continue
            definition = utils.definition(module, alias.name)
            if definition is None:
                report(node, f"`{alias.name}` is no longer defined in scripts/utils/{module}.py")
            else:
                imported[alias.asname or alias.name] = definition
    instances = {}  # variable -> ClassDef it was built from (`critic = InstructionCritic(...)`)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name):
            made = imported.get(node.value.func.id)
            if isinstance(made, ast.ClassDef):
                instances.update({t.id: made for t in node.targets if isinstance(t, ast.Name)})

    def owner_of(expr):
        if isinstance(expr, ast.Name):
            found = imported.get(expr.id) or instances.get(expr.id)
            return found if isinstance(found, ast.ClassDef) else None
        return None

    def member(cls: ast.ClassDef, attr: str):
        return next((i for i in cls.body if isinstance(i, (ast.FunctionDef, ast.AsyncFunctionDef)) and i.name == attr), None)

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            cls = owner_of(node.value)
            attributes = class_attributes(cls) if cls is not None else None
            if attributes is not None and node.attr not in attributes:
                report(node, f"`{node.value.id}.{node.attr}`: {cls.name} has no attribute {node.attr!r}")
        if isinstance(node, ast.Call):
            target = None
            if isinstance(node.func, ast.Name):
                target = imported.get(node.func.id)
            elif isinstance(node.func, ast.Attribute) and owner_of(node.func.value) is not None:
                target = member(owner_of(node.func.value), node.func.attr)
            accepted = keyword_names(target) if target is not None and target is not True else None
            for keyword in node.keywords:
                if accepted is not None and keyword.arg is not None and keyword.arg not in accepted:
                    name = ast.unparse(node.func)
                    report(node, f"`{name}(..., {keyword.arg}=...)`: {name} takes no keyword {keyword.arg!r}")
    return problems


# -- shell usage -------------------------------------------------------------------------------------
def shell_commands(block: Block) -> list[tuple[int, str, list[str]]]:
    """(line, script path, flags passed to it) for each script a bash block runs."""
    found, logical, start = [], "", None
    for offset, raw in enumerate(block.text.split("\n")):
        start = block.line + offset if start is None else start
        if raw.rstrip().endswith("\\"):
            logical += raw.rstrip()[:-1] + " "
            continue
        logical += raw
        try:
            tokens = shlex.split(logical, comments=True)
        except ValueError:
            tokens = logical.split("#")[0].split()
        script, flags = None, []
        for token in tokens + [";"]:
            if token in _SHELL_SEPARATORS or token.endswith((";", "&")):
                if script:
                    found.append((start, script, flags))
                script, flags = None, []
                continue
            match = _SCRIPT_TOKEN.search(token)
            if script is None and match:
                script = match.group(1)
            elif script is not None and token.startswith("--") and len(token) > 2:
                flags.append(token.split("=", 1)[0])
        logical, start = "", None
    return found


def shell_script_flags(path: Path) -> set[str] | None:
    flags = {flag for arm in _CASE_ARM.findall(path.read_text(encoding="utf-8")) for flag in arm.split("|") if flag.startswith("--")}
    return flags or None


def python_script_flags(root: Path, scripts: list[Path]) -> dict[str, dict]:
    if not scripts:
        return {}
    result = subprocess.run([sys.executable, "-c", _PARSER_PROBE, *map(str, scripts)], capture_output=True, text=True,
                            cwd=root, timeout=600)
    marker = "@@registry-probe@@"
    line = next((x for x in reversed(result.stdout.split("\n")) if x.startswith(marker)), None)
    if line is None:
        error = (result.stderr.strip().split("\n") or ["no output"])[-1]
        return {str(p): {"error": f"the parser probe failed: {error}"} for p in scripts}
    return json.loads(line[len(marker):])


# -- the checks -------------------------------------------------------------------------------------
def check_references(root: Path, rel: str, prose: list[tuple[int, str]]) -> list[Problem]:
    problems = []
    for number, line in prose:
        for ref in _BACKTICKED_PATH.findall(line):
            path_text, _, test_name = ref.partition("::")
            matches = list(root.glob(path_text)) if "*" in path_text else [root / path_text]
            if not any(p.exists() for p in matches):
                problems.append(Problem(rel, number, "missing", f"{path_text} does not exist"))
            elif test_name:
                name = test_name.split("[")[0]
                if not re.search(rf"^\s*(?:async\s+)?def {re.escape(name)}\(", matches[0].read_text(encoding="utf-8"), re.MULTILINE):
                    problems.append(Problem(rel, number, "missing", f"{path_text} has no test {name}"))
    return problems


def check_registry(root: Path) -> tuple[list[Problem], dict]:
    path = root / REGISTRY
    if not path.is_file():
        return [Problem(REGISTRY, 1, "missing", "the registry does not exist")], {}
    entries, blocks, prose = read_markdown(path.read_text(encoding="utf-8"))
    problems = []
    listed: dict[str, int] = {}
    for entry in entries:
        lacking = [name for name in REQUIRED_FIELDS if name not in entry.fields]
        if entry.bullets == 0 and "Key Features" in entry.fields:
            lacking.append("Key Features bullets")
        if not entry.blocks and "Usage" in entry.fields:
            lacking.append("a Usage block")
        if lacking:
            problems.append(Problem(REGISTRY, entry.line, "field", f"entry '{entry.name}' lacks {', '.join(lacking)}"))
        line, value = entry.fields["File"]
        rel = _path_of(value)
        if rel in listed:
            problems.append(Problem(REGISTRY, line, "field", f"{rel} is listed twice (also line {listed[rel]})"))
        listed.setdefault(rel, line)
        if not (root / rel).is_file():
            problems.append(Problem(REGISTRY, line, "missing", f"{rel} does not exist"))
    for pattern in LISTED_GLOBS:
        for file in sorted(root.glob(pattern)):
            rel = file.relative_to(root).as_posix()
            if rel not in listed:
                problems.append(Problem(REGISTRY, 1, "unlisted", f"{rel} exists but no registry entry names it as its **File**"))
    for doc in REFERENCE_DOCS:
        if doc == REGISTRY:
            problems += check_references(root, doc, prose)
        elif (root / doc).is_file():
            problems += check_references(root, doc, read_markdown((root / doc).read_text(encoding="utf-8"))[2])
    utils = UtilsSource(root)
    commands = []
    for block in blocks:
        if block.lang == "python":
            problems += check_python_block(block, utils, REGISTRY)
        elif block.lang in ("bash", "sh", "shell"):
            commands += shell_commands(block)
    python_scripts = sorted({root / s for _, s, _ in commands if s.endswith(".py") and (root / s).is_file()})
    probed = python_script_flags(root, python_scripts)
    for line, script, flags in commands:
        target = root / script
        if not target.is_file():
            problems.append(Problem(REGISTRY, line, "missing", f"usage runs {script}, which does not exist"))
            continue
        if script.endswith(".sh"):
            known = shell_script_flags(target)
        else:
            info = probed.get(str(target), {})
            if "error" in info:
                problems.append(Problem(REGISTRY, line, "flag", f"{script}: {info['error']}"))
                continue
            known = set(info.get("flags", []))
        for flag in flags:
            if known is not None and flag not in known:
                problems.append(Problem(REGISTRY, line, "flag", f"{script} has no flag {flag}"))
    summary = {"entries": len(entries), "blocks": len(blocks), "commands": len(commands), "scripts_probed": len(python_scripts)}
    return problems, summary


def main(args) -> int:
    root = args.root.resolve()
    if not (root / "scripts").is_dir():
        print(f"check_registry: {root} has no scripts/ folder", file=sys.stderr)
        return 2
    problems, summary = check_registry(root)
    unique = list(dict.fromkeys(str(p) for p in problems))
    for text in unique:
        print(text)
    if unique:
        print(f"check_registry: FAILED, {len(unique)} problem(s)", file=sys.stderr)
        return 1
    print(f"check_registry: OK, {summary['entries']} entries cover scripts/ and scripts/utils/; "
          f"{summary['blocks']} usage blocks, {summary['commands']} commands checked against {summary['scripts_probed']} parsers")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
