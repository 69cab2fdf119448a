"""Choosing the compute precision from the CPU's features."""

from __future__ import annotations

import pytest

from sharcs_jax.serve import precision


@pytest.mark.parametrize("requested, platform, flags, expected", [
    ("auto", "cpu", {"avx512f", "avx512_bf16"}, "bf16"),  # AMD EPYC (Zen 4)
    ("auto", "cpu", {"amx_bf16", "amx_tile"}, "bf16"),  # Intel Sapphire Rapids
    ("auto", "cpu", {"avx512f", "avx512_vnni"}, "fp32"),  # Intel Xeon without bf16: emulated
    ("auto", "gpu", {"avx512_bf16"}, "fp32"),  # not measured on accelerators: not assumed
    ("fp32", "cpu", {"avx512_bf16"}, "fp32"), ("bf16", "cpu", set(), "bf16"),
])
def test_resolve(requested, platform, flags, expected):
  assert precision.resolve(requested, platform, frozenset(flags)) == expected


def test_unknown_precision():
  with pytest.raises(ValueError, match=r"precision 'int4' is not one of \('auto', 'fp32', 'bf16'\)"):
    precision.resolve("int4")


def test_cpu_flags_from_a_cpuinfo_file(tmp_path):
  (tmp_path / "cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                                    "processor\t: 1\nflags\t\t: fpu\n")
  assert precision.cpu_flags(str(tmp_path / "cpuinfo")) == {"fpu", "avx2", "avx512_bf16"}
  assert precision.cpu_flags(str(tmp_path / "missing")) == frozenset()
