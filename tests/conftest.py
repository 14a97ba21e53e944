"""Fixtures and helpers shared by the test files.

Tests import the utilities and the scripts the way the scripts do (`from utils.x import ...`), so
`scripts/` goes on the path here, and `tests/` for `tiny_models`. Helpers that more than one test
file needs live here and are imported by name (`from conftest import run_python_script`).

Markers (registered in pytest.ini): `slow` marks the real bundled-model tests and tests that take
more than about 20 s on a 2-core CPU; `bash scripts/run_tests.sh -m "not slow"` skips them, CI runs all.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
for _folder in (ROOT / "tests", SCRIPTS):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

# The user's shared conversion cache: tests of the real bundled model point at it on purpose, so the
# 50 s GGUF conversion happens once per machine rather than once per test.
BUNDLED_CACHE_DIR = Path.home() / ".cache" / "stage1_bootstrap"


# A test that needs one of these fixtures is slow: in a run without the other users of the fixture it
# pays the whole cost itself. Marked here, so new tests that use them are marked too.
SLOW_FIXTURES = {
    "pilot_manifest": "test_scale.py: runs the pilot script on the trained tiny model (2-4.5 min measured on 2 shared cores)",
    "pilot_folder": "test_pilot_records.py: runs the pilot script on the trained tiny model (2.4 min measured)",
}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES.keys() & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def script_env(**extra: str) -> dict:
    """This process's environment plus `extra` (e.g. OMP_NUM_THREADS="1"), for a script run as a command."""
    return {**os.environ, **extra}


def run_python_script(script, *args, env: dict | None = None, timeout: float | None = None,
                      cwd: Path | None = ROOT) -> subprocess.CompletedProcess:
    """Run a script as a user would (`python scripts/x.py ...`) with this test run's interpreter.

    `script` is a path or a file name under scripts/; arguments are passed through str(). Output is
    captured as text; the exit code is the caller's to check.
    """
    path = Path(script)
    if not path.is_absolute():
        path = SCRIPTS / path
    return subprocess.run([sys.executable, str(path), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def run_main_in_process(main, parse_args, argv) -> tuple[int, str]:
    """A script's main run in this process (saves a torch import per run): (exit code, stdout),
    with an expected refusal turned into its exit code and printed as run_cli would."""
    import contextlib
    import io

    from utils.exit_codes import Stage1Error

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(parse_args([str(arg) for arg in argv]))
        except Stage1Error as err:
            print(f"error: {err}")
            code = err.exit_code
    return code, out.getvalue()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: training steps on a tiny model are faster without threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_jsonl_lines(path) -> list[dict]:
    """Records of a JSONL file, split on b"\\n" only (as utils.jsonl_io does: model text may hold U+2028)."""
    return [json.loads(line) for line in Path(path).read_bytes().split(b"\n") if line.strip()]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-base")


@pytest.fixture(scope="session")
def tiny_nobos_model_dir(tmp_path_factory):
    from tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_nobos") / "tiny-nobos", bos=False)


@pytest.fixture(scope="session")
def trained_model_dir(tmp_path_factory):
    """The tiny model trained on pipeline formats, as stored in tests/fixtures (see tiny_models.TRAINED_FIXTURE),
    copied so that no test can change the stored one."""
    from tiny_models import TRAINED_FIXTURE

    return Path(shutil.copytree(TRAINED_FIXTURE, tmp_path_factory.mktemp("trained") / "tiny-trained"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Conversions land in a per-test cache unless a test points at the shared one on purpose.
    monkeypatch.setenv("STAGE1_CACHE_DIR", str(tmp_path / "stage1_cache"))
