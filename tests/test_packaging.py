"""Packaging: the CMake options' environment variables, the license files, the CLI on partial installs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# CMake configure (no build): FASTFAIR_* environment variables count on a first configure
# ------------------------------------------------------------------------------------------------

def _pybind11_dir():
    try:
        import pybind11
    except ImportError:
        return None
    return pybind11.get_cmake_dir()


needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None or _pybind11_dir() is None
                                 or not (ROOT / "CMakeLists.txt").exists(),
                                 reason="needs cmake, pybind11 and the source tree")


def _configure(build: Path, env_vars: dict, path: str | None = None, *extra: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTFAIR_")}
    env.update({k: v for k, v in env_vars.items() if v is not None})
    for k in [k for k, v in env_vars.items() if v is None]:
        env.pop(k, None)
    if path is not None:
        env["PATH"] = path
    cmd = ["cmake", "-S", str(ROOT), "-B", str(build), f"-Dpybind11_DIR={_pybind11_dir()}",
           f"-DPython_EXECUTABLE={sys.executable}", *extra]
    if shutil.which("ninja", path=env.get("PATH")):
        cmd += ["-G", "Ninja"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    cache = (build / "CMakeCache.txt").read_text() if (build / "CMakeCache.txt").exists() else ""
    return r.returncode, r.stdout + r.stderr, cache


@needs_cmake
def test_cmake_options_from_the_environment_on_a_first_configure(tmp_path):
    """Under CMP0126 OLD, creating the cache entry dropped the normal variable set from $ENV: FASTFAIR_CUDA=OFF
    still built the CUDA module, FASTFAIR_CUDA_ARCHS was ignored. A changed variable counts on a reconfigure."""
    rc, out, cache = _configure(tmp_path / "b", {"FASTFAIR_CUDA": "OFF", "FASTFAIR_CUDA_ARCHS": "86",
                                                 "FASTFAIR_NATIVE_ARCH": "ON"})
    assert rc == 0, out
    assert "FASTFAIR_CUDA:STRING=OFF" in cache and "FASTFAIR_CUDA_ARCHS:STRING=86" in cache, out
    assert "FASTFAIR_NATIVE_ARCH:BOOL=ON" in cache
    assert "building the CUDA module" not in out and "Looking for a CUDA compiler" not in out
    # reconfigure the same folder with a changed variable: it replaces the cached value
    rc, out, cache = _configure(tmp_path / "b", {"FASTFAIR_CUDA": "OFF", "FASTFAIR_CUDA_ARCHS": "86",
                                                 "FASTFAIR_NATIVE_ARCH": "OFF"})
    assert rc == 0, out
    assert "FASTFAIR_NATIVE_ARCH:BOOL=OFF" in cache and "FASTFAIR_CUDA:STRING=OFF" in cache
    # -D on a first configure beats the environment
    rc, out, cache = _configure(tmp_path / "c", {"FASTFAIR_CUDA": "ON"}, None, "-DFASTFAIR_CUDA=OFF")
    assert rc == 0 and "FASTFAIR_CUDA:STRING=OFF" in cache, out


@needs_cmake
def test_cmake_cuda_on_without_nvcc_is_an_error(tmp_path):
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and not os.path.exists(os.path.join(d, "nvcc")))
    if shutil.which("cmake", path=path) is None or shutil.which("c++", path=path) is None:
        pytest.skip("cmake or the C++ compiler lives beside nvcc")
    env = {"FASTFAIR_CUDA": "ON", "CUDACXX": None, "CUDA_PATH": None, "CUDA_HOME": None, "CUDAToolkit_ROOT": None}
    rc, out, _ = _configure(tmp_path / "b", env, path)
    if "building the CUDA module" in out:
        pytest.skip("CMake found a CUDA compiler outside PATH")
    assert rc != 0 and "FASTFAIR_CUDA=ON but no CUDA compiler was found" in out, out


# ------------------------------------------------------------------------------------------------
# license
# ------------------------------------------------------------------------------------------------

def test_license_file_is_declared():
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not in the source tree")
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    for pattern in project["license-files"]:
        assert list(ROOT.glob(pattern)), pattern
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


# ------------------------------------------------------------------------------------------------
# the CLI on partial installs
# ------------------------------------------------------------------------------------------------

def test_generate_without_diffusers_is_one_line(tmp_path, monkeypatch, capsys):
    """pip install --no-deps: a raw ModuleNotFoundError traceback before."""
    from fastfair.cli import main

    monkeypatch.setitem(sys.modules, "diffusers", None)  # importing it (or a submodule) fails
    rc = main(["generate", "--model", "tiny-sd", "--prompt", "a photo of a doctor", "--out", str(tmp_path / "g")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err == ("fastfair generate: error: needs the Python package diffusers, which is not "
                               "installed: pip install diffusers"), err


def test_version_needs_no_torch():
    code = ("import sys; sys.modules['torch'] = None; from fastfair.cli import main; sys.exit(main(['--version']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    import fastfair

    assert r.returncode == 0 and r.stdout.strip() == fastfair.__version__, r.stderr


def test_a_missing_submodule_or_unknown_module_keeps_its_traceback(tmp_path, monkeypatch):
    """Only a known dependency absent as a whole gets the one-line message: an installed package missing a submodule
    (a version mismatch) said 'transformers is not installed', and a typo'd import said 'pip install numpyy'."""
    from fastfair import cli

    for exc in (ModuleNotFoundError("No module named 'transformers.foo'", name="transformers.foo"),
                ModuleNotFoundError("No module named 'numpyy'", name="numpyy")):
        def boom(args, exc=exc):
            raise exc

        monkeypatch.setattr(cli, "_generate", boom)
        with pytest.raises(ModuleNotFoundError):
            cli.main(["generate", "--model", "tiny-sd", "--prompt", "a doctor", "--out", str(tmp_path / "g")])


def test_subpackages_reachable_from_a_plain_import():
    """fastfair.audit.compare failed on first access (fastfair.audit was the function until the package was imported);
    fastfair.native / bench / features / faces were unreachable after `import fastfair` (a README walk-through)."""
    code = ("import fastfair; assert callable(fastfair.audit); fastfair.audit.compare; fastfair.audit.ATTRIBUTE_SETS; "
            "fastfair.native.cpu_variant; fastfair.bench.run; fastfair.features; fastfair.faces")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
