"""scripts/check_dry.py: the repo passes, each rule catches a planted violation, and the one
module allowed to do a job is not flagged for it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import run_python_script

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "check_dry.py"
U = "scripts/utils/"

# rule -> (planted source, line of the violation, the module allowed to contain that source)
PLANTS = {
    "model-loading": [
        ("import os\nfrom transformers import AutoModelForCausalLM\n", 2, U + "clean_model_loader.py"),
        ("x = 1\nmodel = AutoModelForCausalLM.from_pretrained('m')\n", 2, U + "gguf_conversion.py"),
        ("tok = GemmaTokenizer.from_pretrained(path)\n", 1, U + "clean_model_loader.py"),
        ("model = LlamaForCausalLM.from_pretrained(path)\n", 1, U + "clean_model_loader.py"),
        ("from transformers import AutoTokenizer\n", 1, U + "clean_model_loader.py"),
        ("reader = GGUFReader(str(path))\n", 1, U + "gguf_conversion.py"),
        ("m = load(folder, gguf_file='x.gguf')\n", 1, U + "gguf_conversion.py"),
    ],
    "adapter-loading": [
        ("model = PeftModel.from_pretrained(base, adapter_dir)\n", 1, U + "sft_training.py"),
        ("model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)\n", 1, U + "clean_model_loader.py"),
        ("model.load_adapter(adapter_dir)\n", 1, U + "sft_training.py"),
    ],
    "chat-template-apply": [
        ("ids = tokenizer.apply_chat_template(messages)\n", 1, None),
    ],
    "chat-template-assign": [
        ("tokenizer.chat_template = '{{ messages }}'\n", 1, U + "gguf_conversion.py"),
        ("tokenizer.chat_template = None\n", 1, U + "clean_model_loader.py"),
    ],
    "add-special-tokens": [
        ("ids = tokenizer.encode(text, add_special_tokens=True)\n", 1, None),
    ],
    "prompt-delimiter": [
        ("PROMPT = 'Instruction: say hi'\n", 1, U + "completion_prompts.py"),
        ("x = 1\nPROMPT = f'{a}\\nResponse:'\n", 2, U + "completion_prompts.py"),
        ('"""Module doc.\n\nUsage: encode("Instruction: ...")\n"""\n', 3, U + "completion_prompts.py"),
    ],
    "critic-logsoftmax": [
        ("lp = torch.log_softmax(logits, dim=-1)\n", 1, U + "instruction_critic.py"),
        ("lp = logits.log_softmax(-1)\n", 1, U + "generation.py"),
        ("lp = F.log_softmax(logits, -1)\n", 1, U + "sentinels.py"),
        ("lp = F.log_softmax(logits, -1)\n", 1, U + "sft_training.py"),
    ],
    "critic-label": [
        ("labels = (' A', \" B\")\n", 1, U + "instruction_critic.py"),
        ("label = ' A'\n", 1, U + "completion_prompts.py"),
    ],
    "env-capture": [
        ("import git\n", 1, U + "provenance_helper.py"),
        ("from git import Repo\n", 1, U + "provenance_helper.py"),
        ("import sys\nprint(platform.platform())\n", 2, U + "provenance_helper.py"),
        ("from platform import python_version\n", 1, U + "provenance_helper.py"),
        ("cuda = torch.version.cuda\n", 1, U + "provenance_helper.py"),
        ("name = torch.cuda.get_device_name(0)\n", 1, U + "provenance_helper.py"),
        ("from importlib import metadata\n", 1, U + "provenance_helper.py"),
        ("v = importlib.metadata.version('torch')\n", 1, U + "provenance_helper.py"),
        ("out = subprocess.check_output(['git', 'rev-parse', 'HEAD'])\n", 1, U + "provenance_helper.py"),
        ("out = subprocess.run('git status', shell=True)\n", 1, U + "provenance_helper.py"),
    ],
}
CASES = [(rule, *case) for rule, cases in PLANTS.items() for case in cases]
CASE_IDS = [f"{rule}-{i}" for rule, cases in PLANTS.items() for i in range(len(cases))]


def run_check(*args: str) -> subprocess.CompletedProcess:
    return run_python_script(CHECK, *args, timeout=120, cwd=None)


def plant(root: Path, rel: str, source: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    return path


def test_current_repo_passes():
    result = run_check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout and len(result.stdout.strip().splitlines()) == 1


def test_runs_from_another_directory(tmp_path):
    result = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_has_a_case():
    sys.path.insert(0, str(ROOT / "scripts"))
    import check_dry

    assert {rule.name for rule in check_dry.RULES} == set(PLANTS)


@pytest.mark.parametrize("rule,source,line,allowed_module", CASES, ids=CASE_IDS)
def test_planted_violation_is_caught(tmp_path, rule, source, line, allowed_module):
    plant(tmp_path, "scripts/planted.py", source)
    result = run_check("--root", str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"scripts/planted.py:{line}: {rule}: " in result.stdout, result.stdout


@pytest.mark.parametrize("rule,source,line,allowed_module", CASES, ids=CASE_IDS)
def test_allowed_module_is_not_flagged(tmp_path, rule, source, line, allowed_module):
    if allowed_module is None:
        pytest.skip(f"{rule} is allowed nowhere")
    plant(tmp_path, allowed_module, source)
    result = run_check("--root", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_loader_may_only_remove_the_template(tmp_path):
    plant(tmp_path, U + "clean_model_loader.py", "tokenizer.chat_template = None\ntokenizer.chat_template = t\n")
    result = run_check("--root", str(tmp_path))
    assert result.returncode == 1
    assert f"{U}clean_model_loader.py:2: chat-template-assign" in result.stdout
    assert f"{U}clean_model_loader.py:1:" not in result.stdout


def test_allowed_module_still_flagged_for_other_rules(tmp_path):
    plant(tmp_path, U + "provenance_helper.py", "import git\nlp = torch.log_softmax(x, -1)\n")
    result = run_check("--root", str(tmp_path))
    assert result.returncode == 1
    assert f"{U}provenance_helper.py:2: critic-logsoftmax" in result.stdout
    assert "env-capture" not in result.stdout


def test_extra_path_argument(tmp_path):
    planted = plant(tmp_path / "elsewhere", "planted.py", "x = 0\ny = tokenizer.apply_chat_template(m)\n")
    result = run_check("--root", str(tmp_path / "empty_root"), str(planted))
    assert result.returncode == 1
    assert f"{planted}:2: chat-template-apply: y = tokenizer.apply_chat_template(m)" in result.stdout


def test_missing_paths_are_bad_input(tmp_path):
    assert run_check("--root", str(tmp_path), str(tmp_path / "nope.py")).returncode == 2
    assert run_check("--root", str(tmp_path / "no_repo_here")).returncode == 2  # never a silent "OK, 0 files"


def test_shell_scripts_are_scanned(tmp_path):
    plant(tmp_path, "scripts/run_all.sh", "#!/bin/bash\n# git is not called here\nHASH=$(git rev-parse HEAD)\n"
                                           "echo 'Instruction: x'\n")
    result = run_check("--root", str(tmp_path))
    assert result.returncode == 1
    assert "scripts/run_all.sh:3: env-capture" in result.stdout
    assert "scripts/run_all.sh:4: prompt-delimiter" in result.stdout
    assert "run_all.sh:2:" not in result.stdout


def test_tests_skipped_unless_included(tmp_path):
    plant(tmp_path, "tests/test_x.py", "import git\n")
    plant(tmp_path, "scripts/tests/test_y.py", "import git\n")
    assert run_check("--root", str(tmp_path)).returncode == 0
    result = run_check("--root", str(tmp_path), "--include-tests")
    assert result.returncode == 1
    assert "tests/test_x.py:1: env-capture" in result.stdout
    assert "scripts/tests/test_y.py:1: env-capture" in result.stdout


def test_no_false_positives_on_prose_and_lookalikes(tmp_path):
    source = textwrap.dedent('''\
        """Never call apply_chat_template; the loader sets chat_template = None."""
        import sys
        # AutoModelForCausalLM, import git, torch.log_softmax(x), add_special_tokens=True
        meta = {"chat_template_removed": True, "gguf_chat_template": False}
        same = tokenizer.chat_template == other
        linux = sys.platform.startswith("linux")
        ids = tokenizer.encode(text, add_special_tokens=False)
        note = "The Instruction field" + "Response text" + " Apple" + "A" + "github"
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        ''')
    plant(tmp_path, "scripts/fine.py", source)
    result = run_check("--root", str(tmp_path))
    assert result.returncode == 0, result.stdout


def test_untokenizable_python_falls_back_to_lines(tmp_path):
    plant(tmp_path, "scripts/broken.py", "def f(:\n    import git\n")
    result = run_check("--root", str(tmp_path))
    assert result.returncode == 1
    assert "scripts/broken.py:2: env-capture" in result.stdout
