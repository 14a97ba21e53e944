"""docs/IMPLEMENTATION_REGISTRY.md cannot drift: scripts/check_registry.py on the real tree and on planted problems.

Each planted problem goes into a copy of the repo (scripts/, tests/, docs/) checked with --root, so the
real tree is never touched.
"""

import shutil
from pathlib import Path

import pytest

from conftest import ROOT, run_python_script

CHECK = "check_registry.py"
REGISTRY = Path("docs/IMPLEMENTATION_REGISTRY.md")


def check(root: Path | None = None):
    return run_python_script(CHECK, *(["--root", root] if root else []), timeout=300)


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    for folder in ("scripts", "tests", "docs"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) >= 1, f"{old!r} not in {path}: the test's anchor moved"
    path.write_text(text.replace(old, new))


def test_real_registry_is_clean():
    result = check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check_registry: OK" in result.stdout


def test_copy_is_clean_before_planting(repo_copy):
    result = check(repo_copy)
    assert result.returncode == 0, result.stdout + result.stderr


def test_unlisted_script_fails(repo_copy):
    (repo_copy / "scripts" / "new_tool.py").write_text('"""A new tool."""\n')
    result = check(repo_copy)
    assert result.returncode == 1
    assert "unlisted: scripts/new_tool.py exists but no registry entry names it" in result.stdout


@pytest.mark.parametrize("rel", ["scripts/utils/new_helper.py", "scripts/new_step.sh"])
def test_unlisted_utility_or_shell_script_fails(repo_copy, rel):
    (repo_copy / rel).write_text("# new\n")
    result = check(repo_copy)
    assert result.returncode == 1 and f"unlisted: {rel}" in result.stdout


def test_flag_removed_from_the_script_fails(repo_copy):
    # The registry's usage passes --seed 999; the script's parser no longer has it.
    edit(repo_copy / "scripts" / "generate_test_instructions.py", '"--seed"', '"--random-seed"')
    result = check(repo_copy)
    assert result.returncode == 1
    assert "flag: scripts/generate_test_instructions.py has no flag --seed" in result.stdout


def test_stale_flag_in_the_registry_fails(repo_copy):
    edit(repo_copy / REGISTRY, "  --num-shards 10 \\", "  --shards 10 \\")
    result = check(repo_copy)
    assert result.returncode == 1
    assert "scripts/generate_stage1_scale_data.py has no flag --shards" in result.stdout


def test_shell_script_flag_fails(repo_copy):
    edit(repo_copy / REGISTRY, "--profile gpu --model", "--profiles gpu --model")
    result = check(repo_copy)
    assert result.returncode == 1 and "scripts/run_stage1.sh has no flag --profiles" in result.stdout


def test_listed_file_that_does_not_exist_fails(repo_copy):
    (repo_copy / "scripts" / "utils" / "stats.py").unlink()
    result = check(repo_copy)
    assert result.returncode == 1
    assert "missing: scripts/utils/stats.py does not exist" in result.stdout


def test_usage_of_a_script_that_does_not_exist_fails(repo_copy):
    edit(repo_copy / REGISTRY, "python scripts/check_dry.py --include-tests", "python scripts/check_wet.py --include-tests")
    result = check(repo_copy)
    assert result.returncode == 1 and "usage runs scripts/check_wet.py, which does not exist" in result.stdout


@pytest.mark.parametrize("old,new,message", [
    ("from utils import InstructionCritic\n", "from utils import InstructionCritics\n",
     "`from utils import InstructionCritics`: not a package-level name"),
    ("from utils.jsonl_io import JsonlAppender,", "from utils.jsonl_io import JsonlAppenders,",
     "`JsonlAppenders` is no longer defined in scripts/utils/jsonl_io.py"),
    ("from utils.qc import", "from utils.quality import", "scripts/utils/quality.py does not exist"),
    ("CompletionStylePrompts.create_response_prompt(instruction)", "CompletionStylePrompts.make_response_prompt(instruction)",
     "CompletionStylePrompts has no attribute 'make_response_prompt'"),
    ("confidence_threshold=1.0)", "threshold=1.0)", "takes no keyword 'threshold'"),
    ("build_test_set(count=200, seed=999)", "build_test_set(size=200, seed=999)", "takes no keyword 'size'"),
], ids=["package-name", "module-name", "module", "class-attribute", "method-keyword", "function-keyword"])
def test_stale_python_usage_fails(repo_copy, old, new, message):
    edit(repo_copy / REGISTRY, old, new)
    result = check(repo_copy)
    assert result.returncode == 1 and "usage:" in result.stdout and message in result.stdout, result.stdout


def test_renamed_keyword_in_the_code_fails(repo_copy):
    # The code moves on (the critic's keyword is renamed) while the registry still shows the old call.
    edit(repo_copy / "scripts" / "utils" / "instruction_critic.py",
         "def critique_instruction(self, instruction: str, confidence_threshold",
         "def critique_instruction(self, instruction: str, margin_threshold")
    result = check(repo_copy)
    assert result.returncode == 1 and "takes no keyword 'confidence_threshold'" in result.stdout


def test_entry_without_a_field_fails(repo_copy):
    edit(repo_copy / REGISTRY, "**DRY Rule**: Used only by the generation engine\n", "")
    result = check(repo_copy)
    assert result.returncode == 1 and "entry 'Static decode loop' lacks DRY Rule" in result.stdout


def test_missing_test_reference_fails(repo_copy):
    (repo_copy / "tests" / "test_stats.py").unlink()
    result = check(repo_copy)
    assert result.returncode == 1 and "missing: tests/test_stats.py does not exist" in result.stdout


def test_known_bugs_test_names_are_checked(repo_copy):
    doc = repo_copy / "docs" / "KNOWN_BUGS_AND_FIXES.md"
    doc.write_text(doc.read_text() + "\nGuard: `tests/test_driver.py::test_that_was_renamed`\n")
    result = check(repo_copy)
    assert result.returncode == 1 and "tests/test_driver.py has no test test_that_was_renamed" in result.stdout


def test_root_without_scripts_is_bad_input(tmp_path):
    result = check(tmp_path)
    assert result.returncode == 2 and "has no scripts/ folder" in result.stderr
