import os
import warnings

import torch

# CPU machines run the Triton kernels in the interpreter. Set it before anything imports triton:
# triton reads it when kernels are decorated, and re-importing triton later in the same process
# (to switch modes) aborts the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: torch's threads only contend on a 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
