"""Peak dense bfloat16 FLOP/s of accelerator chips, for model FLOPs utilisation (MFU).

Vendor figures per chip (one jax device: a TPU chip, or a GPU): Cloud TPU system-architecture
pages (v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s) and NVIDIA data sheets (A100 312, H100 / H200
SXM 989, H100 PCIe 756, B200 2250), all without sparsity.
"""

from __future__ import annotations

TPU_PEAK_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}

# (substring of jax's device_kind, TFLOP/s), the first match wins.
_KINDS = (
  ("v6 lite", TPU_PEAK_TFLOPS["v6e"]),
  ("v6e", TPU_PEAK_TFLOPS["v6e"]),
  ("v5 lite", TPU_PEAK_TFLOPS["v5e"]),
  ("v5e", TPU_PEAK_TFLOPS["v5e"]),
  ("v5", TPU_PEAK_TFLOPS["v5p"]),  # "TPU v5" / "TPU v5p"
  ("v4", TPU_PEAK_TFLOPS["v4"]),
  ("H100 PCIe", 756.0),
  ("H100", 989.0),
  ("H200", 989.0),
  ("GH200", 989.0),
  ("A100", 312.0),
  ("B200", 2250.0),
)


def peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 peak TFLOP/s of one device of ``device_kind`` (``jax.devices()[0].device_kind``),
  or None where unknown (CPUs, other chips)."""
  for part, peak in _KINDS:
    if part in device_kind:
      return peak
  return None
