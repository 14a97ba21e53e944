import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import pytest

sys.path.insert(0, str(ROOT / "tests"))


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
    """The tiny model trained on pipeline formats (shared: building it takes seconds to a minute)."""
    from tiny_models import build_trained_tiny_model

    return build_trained_tiny_model(tmp_path_factory.mktemp("trained") / "tiny-trained")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Conversions land in a per-test cache unless a test points at the shared one on purpose.
    monkeypatch.setenv("STAGE1_CACHE_DIR", str(tmp_path / "stage1_cache"))
