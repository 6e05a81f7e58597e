"""benchmarks.targets: the integer-path benchmark's targets read off its results (no timing here)."""
from benchmarks import targets


def _times(float32, r0, r05, r1):
  return {"float32": float32, "int tuned r=0": r0, "int tuned r=0.5": r05, "int tuned r=1": r1}


def _results(entries):
  return {"info": {"backend": "cpu"}, "models": entries}


def test_met_cnn_target_has_no_reason():
  entry = {"name": "resnet18:fmnist", "times": {"512": _times(0.2, 0.1, 0.1, 0.1)},
           "ratio_switch": {"compilations": 0}}
  rows = targets.targets(_results([entry]), 512)
  speed = [r for r in rows if "float32" in r["target"]][0]
  assert speed["met"] and speed["measured"] == "2.00x" and speed["reason"] == ""
  assert all(r["met"] for r in rows)


def test_missed_cnn_target_names_the_layers_and_the_bound():
  layers = [
      # a 16-channel conv run as float32 on codes: integer 60 ms, float 50 ms; the tuner saw int8 at 7x
      {"path": "layer1/conv", "impl": "float32", "seconds": 0.060, "float32_seconds": 0.050,
       "int8_over_float32": 7.0},
      {"path": "layer2/conv", "impl": "int8", "seconds": 0.020, "float32_seconds": 0.040},
  ]
  entry = {"name": "quickstart (resnet_small)", "times": {"512": _times(0.190, 0.180, 0.181, 0.180)},
           "layers": layers}
  speed = [r for r in targets.targets(_results([entry]), 512) if "float32 (CPU" in r["target"]][0]
  assert not speed["met"] and speed["measured"] == "1.06x"
  assert speed["reason"].index("layer1/conv") < speed["reason"].index("layer2/conv")  # worst first
  # outside the quantized layers: 190 - 90 = 100 ms; bound = 190 / (100 + 50 + 20)
  assert "100.0 ms is outside" in speed["reason"]
  assert f"{0.190 / 0.170:.2f}x" in speed["reason"]
  assert "7.0-7.0x slower" in speed["reason"]


def test_layer_times_above_the_whole_model_are_not_split():
  layers = [{"path": "a", "impl": "int8", "seconds": 0.003, "float32_seconds": 0.003}]
  entry = {"name": "regnetx_600mf:fmnist", "times": {"8": _times(0.002, 0.003, 0.003, 0.003)}, "layers": layers}
  speed = [r for r in targets.targets(_results([entry]), 8) if "float32 (CPU" in r["target"]][0]
  assert "more than the whole float32 model" in speed["reason"] and "outside" not in speed["reason"]


def test_mixed_ratio_overhead_reports_spread():
  entry = {"name": "vit_s:fmnist", "times": {"512": _times(0.4, 0.200, 0.210, 0.200)},
           "times_iqr": {"512": {"int tuned r=0": 0.004, "int tuned r=0.5": 0.020}}}
  rows = targets.targets(_results([entry]), 512)
  mixed = [r for r in rows if "ratio 0.5" in r["target"]][0]
  assert not mixed["met"] and mixed["measured"] == "+5.0%"
  assert "within run-to-run spread" in mixed["reason"]
  assert not any("float32 (CPU" in r["target"] for r in rows)  # a transformer has no CNN target
  entry["times_iqr"]["512"] = {"int tuned r=0": 0.001, "int tuned r=0.5": 0.001}
  mixed = [r for r in targets.targets(_results([entry]), 512) if "ratio 0.5" in r["target"]][0]
  assert "beyond run-to-run spread" in mixed["reason"]
  entry["times_iqr"]["512"] = {"int tuned r=0": 0.0, "int tuned r=0.5": 0.0}  # one round: no spread
  mixed = [r for r in targets.targets(_results([entry]), 512) if "ratio 0.5" in r["target"]][0]
  assert "spread is unknown" in mixed["reason"] and "run-to-run" not in mixed["reason"]


def test_recompilation_and_qat_targets():
  entry = {"name": "quickstart (resnet_small)", "times": {"512": _times(0.2, 0.1, 0.1, 0.1)},
           "ratio_switch": {"compilations": 2}, "qat_vs_float_step": {"qat_over_float": 1.5}}
  rows = {r["target"]: r for r in targets.targets(_results([entry]), 512)}
  assert not rows["0 compilations across ratio switches"]["met"]
  assert not rows["QAT step at most 1.2x the float step"]["met"]
  assert "**no**" in targets.markdown(list(rows.values()))


def test_gpu_target_only_for_the_full_size_models():
  t = dict(_times(0.2, 0.1, 0.1, 0.1), bfloat16=0.2)
  results = {"info": {"backend": "gpu"},
             "models": [{"name": n, "times": {"256": t}} for n in ("resnet50", "resnet50:fmnist", "vit_b:fmnist")]}
  gpu = [r for r in targets.targets(results, 256) if "bfloat16" in r["target"]]
  assert [r["model"] for r in gpu] == ["resnet50"] and gpu[0]["met"] and gpu[0]["measured"] == "2.00x"
