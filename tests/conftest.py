import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*torchvision.*")


@pytest.fixture(scope="session", autouse=True)
def _fastfair_cache(tmp_path_factory):
    """Tiny pipelines are built once per test session into a private cache (no network, no home dir)."""
    if "FASTFAIR_TEST_CACHE" in os.environ:  # reuse between local runs
        os.environ["FASTFAIR_CACHE"] = os.environ["FASTFAIR_TEST_CACHE"]
    else:
        os.environ["FASTFAIR_CACHE"] = str(tmp_path_factory.mktemp("fastfair-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fastfair import pipelines

    pipelines.tokenizer_files.cache_clear()
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_sd(_fastfair_cache):
    from fastfair import load_pipeline

    return load_pipeline("tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl(_fastfair_cache):
    from fastfair import load_pipeline

    return load_pipeline("tiny-sdxl")
