"""PyTorch int8 settings for the benchmarks' peer columns (torch is imported by the functions only)."""


def full_range_qconfig_mapping():
  """PyTorch's `x86` default qconfig mapping with the activations observed at full 8-bit range.

  The default observes activations with `reduce_range=True` (7-bit codes), which spares FBGEMM's
  non-VNNI kernels the saturating 16-bit sums of `vpmaddubsw`; flexiq_jax's integer path keeps
  full 8-bit codes and pays for exactness without VNNI instead. This mapping is the same work as
  ours (on a CPU without VNNI its int16 sums may saturate, so its outputs are not checked here).

  Returns:
    A `QConfigMapping`: the default's, with every activation observer at `reduce_range=False`.
  """
  from torch.ao.quantization import QConfig, get_default_qconfig_mapping
  mapping = get_default_qconfig_mapping("x86")

  def widen(qconfig):
    if qconfig is None or not getattr(qconfig.activation(), "reduce_range", False):
      return qconfig
    return QConfig(activation=qconfig.activation.with_args(reduce_range=False), weight=qconfig.weight)

  mapping.global_qconfig = widen(mapping.global_qconfig)
  for table in (mapping.object_type_qconfigs, mapping.module_name_qconfigs, mapping.module_name_regex_qconfigs):
    for key in list(table):
      table[key] = widen(table[key])
  return mapping
