"""Imported timm weights give timm's logits: every model of the zoo, reduced in width/depth/resolution.

Each case builds the timm model (random weights, non-trivial norms and BN statistics), saves its
state dict as .safetensors, imports it with `load_timm` and compares eval-mode float32 logits.
The full-size 224x224 check is `experiments/verify_timm_import.py`. Needs torch and timm
(requirements-test.txt); skipped without them.
"""

import importlib.util

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("timm") is None:
  pytest.skip("timm is not installed", allow_module_level=True)

from flexiq_jax import models  # noqa: E402
import timm_reference  # noqa: E402  (tests/timm_reference.py)

timm = timm_reference.import_timm()


@pytest.mark.parametrize("name", sorted(timm_reference.SMALL_CASES))
def test_logits_match_timm(name):
  r = timm_reference.compare(name, timm_reference.SMALL_CASES[name])
  assert r["max_abs_logit"] > 1e-3  # a non-degenerate output to compare
  assert r["max_abs_diff"] <= 1e-4 * r["max_abs_logit"], r


def test_every_model_has_a_case():
  assert set(timm_reference.SMALL_CASES) == set(models.available()) - {"resnet_small"}


def test_regnetx_006_stage_config_matches_timm():
  """Our RegNetX-600MF defaults equal the widths/depths/groups timm derives from w0/wa/wm."""
  ours = models.create("regnetx_006")
  theirs = timm_reference.regnet_kwargs_from_timm(timm.create_model("regnetx_006", pretrained=False))
  assert {k: tuple(getattr(ours, k)) if isinstance(v, tuple) else getattr(ours, k) for k, v in theirs.items()} == theirs


def test_perturbation_breaks_a_wrong_mapping(tmp_path):
  """The comparison is sensitive: swapping two BN statistics in the checkpoint breaks the match."""
  from safetensors.torch import save_file

  case = timm_reference.SMALL_CASES["resnet18"]
  tmodel = case.build_timm(timm, 10).eval()
  state = timm_reference.perturb_state_dict(tmodel.state_dict(), seed=3)
  tmodel.load_state_dict(state)
  bad = dict(state)
  bad["layer1.0.bn1.running_mean"], bad["layer1.0.bn1.running_var"] = state["layer1.0.bn1.running_var"], state["layer1.0.bn1.running_mean"].abs()
  path = str(tmp_path / "bad.safetensors")
  save_file(bad, path)
  kwargs = case.flax_kwargs(tmodel)
  variables = models.load_timm("resnet18", path, **kwargs)
  x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  out = np.asarray(models.create("resnet18", num_classes=10, **kwargs).apply(variables, x, train=False))
  assert np.abs(out - ref).max() > 1e-3 * np.abs(ref).max()


def test_pth_checkpoint_matches_safetensors(tmp_path):
  from safetensors.torch import save_file

  case = timm_reference.SMALL_CASES["deit_tiny_patch16_224"]
  tmodel = case.build_timm(timm, 10)
  state = timm_reference.perturb_state_dict(tmodel.state_dict(), seed=1)
  # A timm training checkpoint: weights under "state_dict", with DDP's "module." prefix.
  torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}, tmp_path / "ckpt.pth")
  save_file(state, str(tmp_path / "ckpt.safetensors"))
  kwargs = case.flax_kwargs(tmodel)
  a = models.load_timm("deit_t", str(tmp_path / "ckpt.pth"), **kwargs)
  b = models.load_timm("deit_t", str(tmp_path / "ckpt.safetensors"), **kwargs)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_swin_checkpoint_with_stored_buffers_loads(tmp_path):
  """Checkpoints from the original Swin code also hold relative_position_index/attn_mask: ignored."""
  from safetensors.torch import save_file

  case = timm_reference.SMALL_CASES["swin_tiny_patch4_window7_224"]
  tmodel = case.build_timm(timm, 10)
  state = {k: v for k, v in tmodel.state_dict().items()
           if not k.endswith(("relative_position_index", "attn_mask"))}
  save_file(state, str(tmp_path / "plain.safetensors"))
  state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
  state["layers.0.blocks.1.attn_mask"] = torch.zeros(16, 16, 16)
  save_file(state, str(tmp_path / "swin.safetensors"))
  variables = models.load_timm("swin_t", str(tmp_path / "swin.safetensors"), **case.flax_kwargs(tmodel))
  plain = models.load_timm("swin_t", str(tmp_path / "plain.safetensors"), **case.flax_kwargs(tmodel))
  # The buffers change nothing: the same variables as a checkpoint without them.
  assert jax.tree.structure(variables) == jax.tree.structure(plain)
  jax.tree.map(np.testing.assert_array_equal, variables, plain)
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(variables)]
  assert not [n for n in names if "relative_position_index" in n or "attn_mask" in n]
