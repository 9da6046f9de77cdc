import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def svhn_root() -> Path:
    """Folder of the real SVHN subset (train_32x32.mat, test_32x32.mat)."""
    root = Path(os.environ.get("AUGSVHN_TEST_SVHN_ROOT", REPO.parent / "shared" / "data" / "svhn"))
    if not (root / "train_32x32.mat").is_file():
        pytest.fail(f"real SVHN subset not found in {root}; set AUGSVHN_TEST_SVHN_ROOT to its folder")
    return root
