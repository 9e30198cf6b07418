"""The wheel `pip install qwen2-dist` (not editable) installs: every subpackage, the vocabulary, and conf/, which an
installed qwen2-train composes its job from."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the build writes build/ and *.egg-info beside them)."""
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "qwen2_dist", src / "qwen2_dist", ignore=ignore)
    shutil.copytree(REPO / "conf", src / "conf")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(src)], check=True, capture_output=True)
    (path,) = out.glob("qwen2_dist-*.whl")
    return path


def test_the_wheel_holds_every_subpackage_the_vocabulary_and_conf(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.parent.relative_to(REPO)) for p in (REPO / "qwen2_dist").rglob("__init__.py")}
    assert packages and all(f"{package}/__init__.py" in names for package in packages), \
        "pyproject.toml's [tool.setuptools] packages must list every subpackage of qwen2_dist"
    assert "qwen2_dist/assets/qwen.tiktoken" in names
    confs = {str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")}
    assert confs and {f"qwen2_dist/conf/{c}" for c in confs} <= names


def test_an_installed_package_composes_its_job_from_the_conf_it_holds(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {k: v for k, v in os.environ.items() if k != "QWEN2_DIST_CONF"}
    env["PYTHONPATH"] = str(site)  # ahead of the editable install's finder, and of no source tree (cwd is tmp_path)
    script = ("import qwen2_dist; from qwen2_dist.cli.train import compose_job, conf_dir; "
              "print(qwen2_dist.__file__); print(conf_dir()); print(compose_job(['model=tiny']).model.name)")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    package_file, conf, model = out.stdout.split()
    assert package_file == str(site / "qwen2_dist" / "__init__.py")
    assert conf == str(site / "qwen2_dist" / "conf") and model == "tiny"
