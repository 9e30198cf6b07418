"""qwen2_dist/uv_install.py, launch/install.sh's helper: uv installs from where pip would (pip's configuration
carried over), or leaves the install to pip (exit 3) when it cannot say so to uv."""

import json
import os
import subprocess
import sys

import pytest

from qwen2_dist import uv_install
from tests.helpers import REPO

SCRIPT = os.path.join(REPO, "qwen2_dist", "uv_install.py")

# A uv that records what it was asked (its arguments, and the environment uv_install.py sets) and exits $FAKE_UV_EXIT.
FAKE_UV = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["FAKE_UV_RECORD"], "w") as f:
    json.dump({"args": sys.argv[1:], "SSL_CERT_FILE": os.environ.get("SSL_CERT_FILE"),
               "UV_HTTP_TIMEOUT": os.environ.get("UV_HTTP_TIMEOUT"),
               "UV": sorted(k for k in os.environ if k.startswith("UV_"))}, f)
sys.exit(int(os.environ.get("FAKE_UV_EXIT", "0")))
"""


def without_pip_settings(**env: str) -> dict[str, str]:
    """This environment without its PIP_* variables, and with env."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")}, **env}


def pip_settings(**env: str) -> dict:
    """uv_install.pip_settings() in a fresh interpreter with env and no PIP_* variables of this one (pip's internals,
    once imported, would leave distutils imported in this one, which setuptools then refuses)."""
    code = "import json; from qwen2_dist import uv_install; print(json.dumps(uv_install.pip_settings()))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                            env=without_pip_settings(**env))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_pips_settings_are_taken_as_pip_install_takes_them(tmp_path):
    """The install section over the global one (whatever their order in the file), a PIP_* variable over both."""
    config = tmp_path / "pip.conf"
    config.write_text("[install]\nindex-url = https://install.invalid/simple\n"
                      "[global]\nindex-url = https://global.invalid/simple\n"
                      "extra-index-url = https://a.invalid/simple https://b.invalid/simple\n"
                      "find-links = /wheels\nconstraint = /pins.txt\ntimeout = 7\n")
    settings = pip_settings(PIP_CONFIG_FILE=str(config))  # loaded after the machine's own files, so over them
    assert settings["index-url"] == "https://install.invalid/simple"
    assert settings["extra-index-url"] == ["https://a.invalid/simple", "https://b.invalid/simple"]
    assert (settings["find-links"], settings["constraint"], settings["timeout"]) == (["/wheels"], ["/pins.txt"], 7)
    env = {"PIP_CONFIG_FILE": str(config), "PIP_INDEX_URL": "https://env.invalid/simple"}
    assert pip_settings(**env)["index-url"] == "https://env.invalid/simple"
    # No files at all: pip's defaults differ in nothing else.
    assert pip_settings(**{**env, "PIP_CONFIG_FILE": os.devnull}) == {"index-url": "https://env.invalid/simple"}


def test_each_setting_becomes_uvs_and_one_without_a_counterpart_is_refused():
    args, env = uv_install.uv_options({
        "index-url": "https://mirror.invalid/simple", "extra-index-url": ["https://a.invalid", "https://b.invalid"],
        "no-index": True, "find-links": ["/w1", "/w2"], "constraint": ["/c.txt"], "cert": "/ca.pem", "timeout": 180.0,
        "disable-pip-version-check": True, "retries": 2,
    })
    assert args == ["--index-url", "https://mirror.invalid/simple", "--extra-index-url", "https://a.invalid",
                    "--extra-index-url", "https://b.invalid", "--index-strategy", "unsafe-best-match", "--no-index",
                    "--find-links", "/w1", "--find-links", "/w2", "--constraint", "/c.txt"]
    assert env == {"SSL_CERT_FILE": "/ca.pem", "UV_HTTP_TIMEOUT": "180"}
    # uv's timeout is whole seconds: pip's 0.5 was 0 (every request timed out), now 1.
    assert uv_install.uv_options({"timeout": 0.5})[1] == {"UV_HTTP_TIMEOUT": "1"}
    assert uv_install.uv_options({"timeout": 7.2})[1] == {"UV_HTTP_TIMEOUT": "8"}
    with pytest.raises(uv_install.NotForUv, match="pip's setting trusted-host=\\['pypi.internal'\\]"):
        uv_install.uv_options({"trusted-host": ["pypi.internal"]})


def run_script(tmp_path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    """qwen2_dist/uv_install.py ARGS, run as install.sh runs it, with the fake uv (unless UV= is given) and pip
    configured by env alone; what the fake uv recorded (None when it did not run)."""
    fake = tmp_path / "uv"
    fake.write_text(FAKE_UV)
    fake.chmod(0o755)
    record = tmp_path / "record.json"
    result = subprocess.run([sys.executable, "-I", SCRIPT, *args], capture_output=True, text=True, timeout=60,
                            env=without_pip_settings(**{"PIP_CONFIG_FILE": os.devnull, "UV": str(fake),
                                                        "FAKE_UV_RECORD": str(record), **env}))
    return result, json.loads(record.read_text()) if record.exists() else None


def test_uv_installs_with_pips_index_and_certificate_and_its_exit_code_is_the_scripts(tmp_path):
    result, seen = run_script(tmp_path, "--quiet", "-e", ".[dev]", PIP_INDEX_URL="https://mirror.invalid/simple",
                              PIP_FIND_LINKS="/w1 /w2", PIP_CERT="/ca.pem", FAKE_UV_EXIT="7")
    assert result.returncode == 7, result.stderr
    args = seen["args"]
    assert args[:5] == ["pip", "install", "--no-config", "--python", sys.executable]
    assert args[-3:] == ["--quiet", "-e", ".[dev]"]
    assert sorted(zip(args[5:-3:2], args[6:-3:2])) == [("--find-links", "/w1"), ("--find-links", "/w2"),
                                                       ("--index-url", "https://mirror.invalid/simple")]
    assert (seen["SSL_CERT_FILE"], seen["UV_HTTP_TIMEOUT"]) == ("/ca.pem", None)


def test_uvs_own_configuration_is_not_read(tmp_path):
    """A UV_PRERELEASE (or a uv.toml: --no-config) had uv install a release candidate pip would not; the variables
    that change no version (the cache's place, progress) stay."""
    result, seen = run_script(tmp_path, "x", UV_PRERELEASE="allow", UV_INDEX_URL="https://other.invalid/simple",
                              UV_CACHE_DIR=str(tmp_path / "cache"), UV_NO_PROGRESS="1")
    assert result.returncode == 0, result.stderr
    assert "--no-config" in seen["args"] and seen["UV"] == ["UV_CACHE_DIR", "UV_NO_PROGRESS"]
    assert result.stderr == "note: uv installs as pip is configured, without UV_INDEX_URL, UV_PRERELEASE\n"


def test_a_setting_uv_is_not_told_of_or_no_uv_leaves_the_install_to_pip(tmp_path):
    result, seen = run_script(tmp_path, "-e", ".", PIP_TRUSTED_HOST="pypi.internal")
    assert (result.returncode, seen) == (3, None)
    assert result.stderr == ("note: not installing with uv: pip's setting trusted-host=['pypi.internal'] is not "
                             "carried over to uv\n")
    result, _ = run_script(tmp_path, "-e", ".", UV=str(tmp_path / "missing"))
    assert result.returncode == 3
    assert result.stderr == f"note: not installing with uv: UV={tmp_path}/missing: not an executable\n"
    result, _ = run_script(tmp_path, "-e", ".", UV=str(tmp_path))  # a directory: was a PermissionError traceback
    assert result.returncode == 3
    assert result.stderr == f"note: not installing with uv: UV={tmp_path}: not an executable\n"
