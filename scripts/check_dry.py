#!/usr/bin/env python3
"""DRY/contamination check: each sensitive job is done by exactly one canonical module.

    python scripts/check_dry.py                    # scan scripts/**/*.py and *.sh (tests/ skipped)
    python scripts/check_dry.py --include-tests    # scan tests/ too
    python scripts/check_dry.py extra.py dir/      # also scan these files/folders

Exit 0 with a one-line summary when clean; exit 1 printing `file:line: rule: line` per violation.
Standard library only (a hook runs it with the system python); the repo root comes from this
file's own path (or --root), never from the working directory.

How a line is looked at (each rule names its scope):
  code    Python source with comments AND string literals (docstrings included) blanked out, so
          prose that mentions e.g. `apply_chat_template` is fine but code that calls it is not.
  shell   `.sh` lines only (minus `#` comments): for `git ...` commands in bash.
  string  the text of each string literal. Docstrings are strings too, so a docstring that writes
          a prompt delimiter is flagged like any other literal: only the prompts module may spell
          them (kept simple on purpose; describe the delimiter without its colon elsewhere). A
          pattern anchored with \\A is matched against the literal's whole value instead (the
          literal " A" is flagged, "A" or " Apple" is not).
`.sh` files (and Python that does not tokenize) are matched line by line, minus `#` comments.

The critic rules are a heuristic: A/B log-prob logic is recognised by any `log_softmax(` call
and by the label literals " A" / " B"; each is allowed only in the modules listed below.
"""

import argparse
import ast
import io
import re
import sys
import tokenize
from collections import namedtuple
from pathlib import Path

DEFAULT_ROOT = Path(__file__).resolve().parents[1]
U = "scripts/utils/"

# allowed: {module path relative to the repo root: None (any match allowed there) or a regex the
# offending line must match to be allowed there}. An empty dict means allowed nowhere.
Rule = namedtuple("Rule", "name scope patterns allowed")
RULES = [
    Rule("model-loading", "code",
         [r"\b(?!(?:Auto)?Peft)(?:AutoModel\w*|AutoTokenizer|\w+ForCausalLM|\w*Tokenizer\w*)\s*\.\s*from_pretrained\s*\(",
          r"\bAutoModel\w*", r"\bAutoTokenizer\b", r"\bGGUFReader\b", r"\bgguf_file\s*="],
         {U + "clean_model_loader.py": None, U + "gguf_conversion.py": None}),
    Rule("adapter-loading", "code",
         [r"\b(?:Auto)?Peft\w*\s*\.\s*from_pretrained\s*\(", r"\.load_adapter\s*\("],
         {U + "sft_training.py": None, U + "clean_model_loader.py": None}),
    Rule("chat-template-apply", "code", [r"\bapply_chat_template\b"], {}),
    Rule("chat-template-assign", "code", [r"\bchat_template\s*=(?!=)"],
         {U + "clean_model_loader.py": r"\bchat_template\s*=\s*None\b", U + "gguf_conversion.py": None}),
    Rule("add-special-tokens", "code", [r"\badd_special_tokens\s*=\s*True\b"], {}),
    Rule("prompt-delimiter", "string", [r"\b(?:Instruction|Response):"], {U + "completion_prompts.py": None}),
    Rule("critic-logsoftmax", "code", [r"\blog_softmax\s*\("],
         {U + "instruction_critic.py": None, U + "sentinels.py": None, U + "generation.py": None,
          U + "sft_training.py": None}),
    Rule("critic-label", "string", [r"\A [AB]\Z"], {U + "completion_prompts.py": None, U + "instruction_critic.py": None}),
    Rule("env-capture", "code",
         [r"^\s*import\s+git\b", r"^\s*from\s+git\b", r"^\s*(?:import|from)\s+platform\b", r"(?<![.\w])platform\s*\.",
          r"\btorch\s*\.\s*version\s*\.\s*cuda\b", r"\bget_device_name\b", r"\bimportlib\s*\.\s*metadata\b",
          r"^\s*from\s+importlib\s+import\s+metadata\b", r"\bimportlib_metadata\b", r"\bpkg_resources\b"],
         {U + "provenance_helper.py": None}),
    Rule("env-capture", "string", [r"\Agit(?:\s|\Z)"], {U + "provenance_helper.py": None}),  # "git" / "git rev-parse"
    Rule("env-capture", "shell", [r"(?:^|[;&|(`]|\$\()\s*git\s+[a-z]"], {U + "provenance_helper.py": None}),
]
_STRING_TYPES = {tokenize.STRING} | {getattr(tokenize, n) for n in ("FSTRING_MIDDLE",) if hasattr(tokenize, n)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="extra files or folders to scan")
    parser.add_argument("--include-tests", action="store_true", help="scan tests/ as well (off by default)")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="repo root (default: this file's repo)")
    return parser.parse_args(argv)


def _literal_value(text: str):
    """The value of a string literal; an f-string's braces are kept as text (None if unknown)."""
    prefix = re.match(r"[A-Za-z]*", text).group(0)
    try:
        value = ast.literal_eval(prefix.replace("f", "").replace("F", "") + text[len(prefix):])
    except (ValueError, SyntaxError):
        return None
    return value if isinstance(value, str) else None


def _views(source: str, is_python: bool):
    """(code lines, [(line_no, literal text, literal value or None)]) of one file."""
    lines = source.split("\n")
    if is_python:
        try:
            code, strings = [list(x) for x in lines], []
            for tok in tokenize.generate_tokens(io.StringIO(source).readline):
                if tok.type not in _STRING_TYPES and tok.type != tokenize.COMMENT:
                    continue
                (r0, c0), (r1, c1) = tok.start, tok.end
                for row in range(r0, r1 + 1):
                    start, end = (c0 if row == r0 else 0), (c1 if row == r1 else len(lines[row - 1]))
                    code[row - 1][start:end] = " " * (end - start)
                if tok.type != tokenize.COMMENT:
                    if tok.type == tokenize.STRING:
                        strings.append((r0, tok.string, _literal_value(tok.string)))
                    else:  # a piece of an f-string (Python 3.12+): escapes blanked, no whole value
                        strings.append((r0, re.sub(r"\\(N\{[^}]*\}|.)", " ", tok.string), None))
            return ["".join(x) for x in code], strings
        except (tokenize.TokenError, SyntaxError):
            pass  # not valid Python: fall back to the line-by-line view below
    plain = [re.sub(r"(^|\s)#.*$", "", line) for line in lines]
    strings = [(i, line, None) for i, line in enumerate(plain, start=1)]
    strings += [(i, m.group(0), m.group(0)[1:-1]) for i, line in enumerate(plain, start=1)
                for m in re.finditer(r"\"[^\"]*\"|'[^']*'", line)]
    return plain, strings


def check_file(path: Path, rel: str):
    source = path.read_text(encoding="utf-8", errors="replace")
    lines = source.split("\n")
    code, strings = _views(source, path.suffix == ".py")
    found = []
    for rule in RULES:
        allowed = rule.allowed.get(rel, False)
        if allowed is None or (rule.scope == "shell" and path.suffix != ".sh"):
            continue
        hits = []
        if rule.scope == "string":
            for row, text, value in strings:
                for pattern in rule.patterns:
                    raw_hits = [] if pattern.startswith(r"\A") else list(re.finditer(pattern, text))
                    if raw_hits:  # seen in the source text: report the exact line of a multi-line literal
                        hits += [row + text.count("\n", 0, m.start()) for m in raw_hits]
                    elif value is not None and re.search(pattern, value):  # e.g. after an escape
                        hits.append(row)
        else:
            hits = [i for i, line in enumerate(code, start=1) if any(re.search(p, line) for p in rule.patterns)]
        for row in sorted(set(hits)):
            if allowed and re.search(allowed, lines[row - 1]):
                continue
            found.append((rel, row, rule.name, lines[row - 1].strip()))
    return sorted(found, key=lambda v: v[1])


def _files_under(target: Path):
    return [target] if target.is_file() else [p for ext in ("*.py", "*.sh") for p in target.rglob(ext)]


def _collect(root: Path, args):
    """scripts/ (and tests/ with --include-tests), minus tests folders, plus the extra paths."""
    skip = {".venv", "venv", "__pycache__", ".git"} | (set() if args.include_tests else {"tests"})
    files = [p for folder in ["scripts"] + (["tests"] if args.include_tests else []) if (root / folder).is_dir()
             for p in _files_under(root / folder) if not skip & set(p.relative_to(root).parts)]
    for extra in args.paths:
        files += _files_under(extra.resolve())
    return sorted(dict.fromkeys(p.resolve() for p in files))


def main(args) -> int:
    root = args.root.resolve()
    missing = [str(p) for p in args.paths if not p.exists()] + ([] if (root / "scripts").is_dir() or args.paths
                                                                else [str(root / "scripts")])
    if missing:
        print(f"check_dry: no such path(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    violations = []
    files = _collect(root, args)
    for path in files:
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:
            rel = str(path)
        violations += check_file(path, rel)
    for rel, row, rule, line in violations:
        print(f"{rel}:{row}: {rule}: {line}")
    if violations:
        print(f"check_dry: FAILED, {len(violations)} violation(s) in {len({v[0] for v in violations})} file(s)", file=sys.stderr)
        return 1
    print(f"check_dry: OK, {len(files)} file(s) scanned, {len({r.name for r in RULES})} rules, no violations")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
