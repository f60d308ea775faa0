"""The OpenMP waits the Hugging Face backend sets for encoders before torch loads libgomp."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, sys
from lmserve_backend_hf import set_encoder_openmp_waits
in_effect = set_encoder_openmp_waits()
print(json.dumps({"returned": in_effect, "torch_loaded": "torch" in sys.modules}))
"""


def probe(env_extra: dict[str, str], *, import_torch_first: bool = False) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import torch\n" if import_torch_first else "") + PROBE
    out = subprocess.run([sys.executable, "-c", code], env={**env, **env_extra},
                         capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sets_a_short_spin_then_sleep_when_the_environment_says_nothing() -> None:
    result = probe({})
    assert result == {"returned": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"},
                      "torch_loaded": False}  # fmt: skip


USERS = [
    {"OMP_WAIT_POLICY": "ACTIVE"},
    {"GOMP_SPINCOUNT": "300000"},
    {"OMP_WAIT_POLICY": "PASSIVE"},
]


@pytest.mark.parametrize("user", USERS)
def test_keeps_the_users_settings(user: dict[str, str]) -> None:
    assert probe(user)["returned"] == user


def test_sets_nothing_once_torch_has_loaded_libgomp() -> None:
    # libgomp read its environment at torch's import: setting it now would claim a change
    # that never happened.
    assert probe({}, import_torch_first=True)["returned"] == {}
