"""Run metadata: the commit a results file names, and whether its code was edited."""

import subprocess

from flexiq_jax import records


def test_records_call_code_dirty_only_when_code_differs(tmp_path):
  """A sweep's later workers see the records of earlier jobs in the checkout's results folder:
  that must not mark their records '-dirty', while an edited source file must."""
  def git(*args):
    subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
  (tmp_path / "experiments" / "results").mkdir(parents=True)
  (tmp_path / "experiments" / "results" / "t1.md").write_text("old\n")
  (tmp_path / "model.py").write_text("x = 1\n")
  git("init", "-q")
  git("add", ".")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
  clean = records.git_commit.__wrapped__(str(tmp_path))
  assert len(clean) == 40
  (tmp_path / "experiments" / "results" / "t1.md").write_text("new\n")
  assert records.git_commit.__wrapped__(str(tmp_path / "experiments")) == clean
  (tmp_path / "model.py").write_text("x = 2\n")
  assert records.git_commit.__wrapped__(str(tmp_path)) == clean + "-dirty"
