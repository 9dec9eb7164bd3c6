"""The run record (fastfair._env.environment / provenance) never fails a run: TF32 settings made with PyTorch's
newer fp32_precision API (reading the legacy flags then raises) and a FASTFAIR_BACKEND naming an unusable backend
are recorded, not raised. Each case in a fresh process: the TF32 API state is process-global."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

SETUP = {
    "legacy": "torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = False",
    "new": "torch.backends.cuda.matmul.fp32_precision = 'tf32'; torch.backends.cudnn.conv.fp32_precision = 'ieee'",
    "global": "torch.backends.fp32_precision = 'tf32'",
}
WANT = {"legacy": (True, False), "new": (True, False), "global": (True, True)}


@pytest.mark.parametrize("how", list(SETUP))
def test_tf32_settings_recorded_whichever_api_set_them(how):
    if how != "legacy" and not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    code = textwrap.dedent(f"""
        import torch
        from unittest import mock
        from fastfair import _env
        {SETUP[how]}
        props = mock.Mock(major=9, minor=0, multi_processor_count=132, total_memory=1, L2_cache_size=1,
                          shared_memory_per_block_optin=1)
        with mock.patch("torch.cuda.get_device_properties", return_value=props), \\
             mock.patch.object(_env, "device_name", return_value="GPU"), \\
             mock.patch("fastfair.ops.resolve_backend", return_value="triton"):
            env = _env.provenance(torch.device("cuda"))
        print(env["tf32_matmul"], env["tf32_cudnn"])
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split()[-2:] == [str(x) for x in WANT[how]]


def test_unusable_backend_override_is_recorded_not_raised(monkeypatch):
    from fastfair import _env, native

    monkeypatch.setattr(native, "_C", None)
    monkeypatch.setattr(native, "_C_ERR", ImportError("simulated"))
    monkeypatch.setenv("FASTFAIR_BACKEND", "native")
    env = _env.provenance("cpu")
    assert env["auto_backend"].startswith("error: backend 'native' (from the environment variable FASTFAIR_BACKEND=native"), env["auto_backend"]
    assert "FASTFAIR_BACKEND" in os.environ


def test_a_field_added_by_a_later_version_is_not_a_new_environment():
    """A run resumed after an upgrade that added fields to the record (e.g. tf32_*) keeps one environment; a real
    difference (another torch) still adds one; compare reports only fields both runs recorded."""
    from types import SimpleNamespace

    from fastfair._env import add_environment, same_environment
    from fastfair.audit.compare import _env_diff

    old = {"torch": "2.11", "device_name": "H200"}
    new = dict(old, tf32_matmul=False, tf32_cudnn=True)
    assert same_environment(old, new) and not same_environment(old, dict(new, torch="2.12"))
    envs = [old]
    add_environment(envs, new)
    assert envs == [old]
    add_environment(envs, dict(new, torch="2.12"))
    assert len(envs) == 2
    run = lambda es: SimpleNamespace(config={"environments": es})  # noqa: E731
    assert _env_diff(run([old]), run([new])) == {}
    assert _env_diff(run([old]), run([dict(new, torch="2.12")])) == {"torch": [["2.11"], ["2.12"]]}
