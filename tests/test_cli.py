"""flexiq_jax.cli: `--config=<name>` found in configs/, unknown names listing the configs, and the
default workdir named after the config; run.py without --workdir from another directory."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_py
from flexiq_jax import cli


@pytest.fixture
def in_repo(monkeypatch):
  monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("value,want", [
    ("quickstart.py", "configs/quickstart.py"),
    ("quickstart", "configs/quickstart.py"),
    ("quickstart.py:smoke", "configs/quickstart.py:smoke"),
    ("vit_b:fmnist,smoke", "configs/vit_b.py:fmnist,smoke"),
    ("configs/quickstart.py:smoke", "configs/quickstart.py:smoke"),  # an existing path is kept as given
])
def test_resolve_config_from_the_repository(in_repo, value, want):
  assert cli.resolve_config(value) == want


def test_resolve_config_from_another_directory(tmp_path, monkeypatch):
  """The repository's configs/ are found from anywhere; a ./configs/ beside the caller comes first."""
  monkeypatch.chdir(tmp_path)
  path, _, arg = cli.resolve_config("quickstart.py:smoke").partition(":")
  assert arg == "smoke" and os.path.samefile(path, os.path.join(ROOT, "configs", "quickstart.py"))
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "mine.py").write_text("def get_config(arg=None):\n  return {}\n")
  (tmp_path / "configs" / "quickstart.py").write_text("def get_config(arg=None):\n  return {}\n")
  assert cli.resolve_config("mine:x") == os.path.join("configs", "mine.py") + ":x"
  assert cli.resolve_config("quickstart") == os.path.join("configs", "quickstart.py")
  assert "mine.py" in cli.available_configs() and "vit_b.py" in cli.available_configs()


def test_unknown_config_lists_the_known_ones(in_repo):
  with pytest.raises(SystemExit) as e:
    cli.resolve_config("quikstart.py:smoke")
  message = str(e.value)
  assert "config 'quikstart.py' not found" in message
  known = message.split("Known configs: ")[1].split(", ")
  assert "quickstart.py" in known and "vit_b.py" in known and "resnet18.py" in known
  assert "common.py" not in known and "__init__.py" not in known


def test_resolve_config_argv_touches_only_the_config(in_repo):
  argv = ["run.py", "--config=quickstart:smoke", "--workdir=quickstart", "--mode=train"]
  assert cli.resolve_config_argv(argv) == ["run.py", "--config=configs/quickstart.py:smoke", "--workdir=quickstart",
                                          "--mode=train"]
  assert cli.resolve_config_argv(["run.py", "--config", "vit_s"]) == ["run.py", "--config", "configs/vit_s.py"]


@pytest.mark.parametrize("value,want", [
    ("configs/vit_b.py:fmnist,smoke", "workdirs/vit_b_fmnist_smoke"),
    ("configs/quickstart.py", "workdirs/quickstart"),
    ("/elsewhere/configs/quickstart.py:smoke", "workdirs/quickstart_smoke"),
    ("configs/vit_s.py:fmnist,batch=64", "workdirs/vit_s_fmnist_batch=64"),
])
def test_default_workdir(value, want):
  assert cli.default_workdir(value) == want.replace("/", os.sep)


def test_run_py_without_workdir_writes_under_workdirs(tiny_fmnist, tmp_path):
  """`python <repo>/run.py --config=quickstart.py:smoke` from another directory, no --workdir."""
  out = run_py("--config=quickstart.py:smoke", "--mode=train", f"--config.data.data_dir={tiny_fmnist}",
               "--config.train.batch_size=32", cwd=tmp_path).check()
  workdir = tmp_path / "workdirs" / "quickstart_smoke"
  assert f"workdir: {os.path.join('workdirs', 'quickstart_smoke')}" in out.stdout
  config = json.load(open(workdir / "config.json"))
  assert config["model"]["name"] == "resnet_small" and config["data"]["data_dir"] == tiny_fmnist
  assert config["train"]["batch_size"] == 32
  assert json.load(open(workdir / "float" / "done.json"))["total_steps"] == 1  # smoke: 0.02 epochs of 256
  assert not (workdir / "calibrate").exists()  # --mode=train stops after the float model


def test_recorded_command_names_the_module_when_run_with_dash_m(tmp_path):
  """`python -m pkg.mod args` is recorded as typed; sys.argv[0] would be the file's path."""
  package = tmp_path / "probe_pkg"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "show.py").write_text("from flexiq_jax import records\nprint(' '.join(records.command_argv()))\n")
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  shown = subprocess.run([sys.executable, "-m", "probe_pkg.show", "--flag=1"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True).stdout.split("\n")[-2]
  assert shown == "-m probe_pkg.show --flag=1"
  direct = subprocess.run([sys.executable, str(package / "show.py"), "--flag=1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, check=True).stdout.split("\n")[-2]
  assert direct == f"{package / 'show.py'} --flag=1"
