"""Integration tier: real MovieLens data from ../shared/data (or $MOLAR_SHARED_DATA), subprocesses,
torchrun, Dask and the real tritonserver."""
import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    path = Path(os.environ.get("MOLAR_SHARED_DATA", SHARED_DATA)) / name
    if not path.exists():
        pytest.fail(f"{path} is missing: the integration tests read the real MovieLens data from ../shared/data")
    return path


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    return shared_dataset("ml-100k")


@pytest.fixture(scope="session")
def ml1m_dir() -> Path:
    return shared_dataset("ml-1m")


@pytest.fixture(scope="session")
def ml100k_prepared(tmp_path_factory, ml100k_dir):
    """ml-100k through the real NVTabular workflow, max length 20 (shared by every test that trains)."""
    from merlin_molar.data import prepare, read_dataset

    return prepare(read_dataset(ml100k_dir), tmp_path_factory.mktemp("ml100k") / "prepared", max_length=20)
