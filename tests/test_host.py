"""targets/host.py: the CPU name and flags every published number carries."""

from __future__ import annotations

from graphopt.targets import host


def test_cpu_summary_names_the_cpu_and_the_speed_flags_it_has(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9B45\nflags\t\t: fpu sse avx2 avx512f avx512_vnni sha_ni\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 9B45\nflags\t\t: fpu\n")
    monkeypatch.setattr(host, "CPUINFO", str(info))
    assert host.cpu_flags() == {"fpu", "sse", "avx2", "avx512f", "avx512_vnni", "sha_ni"}  # the first CPU's
    assert host.cpu_summary() == "AMD EPYC 9B45 (avx2 avx512f avx512_vnni)"


def test_arm_features_and_an_unreadable_cpuinfo(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp crc32\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n")
    monkeypatch.setattr(host, "CPUINFO", str(info))
    assert host.cpu_summary() == "Raspberry Pi 4 Model B Rev 1.4 (asimddp)"
    monkeypatch.setattr(host, "CPUINFO", str(tmp_path / "missing"))
    assert host.cpu_flags() == set()
    assert host.cpu_summary().endswith("(no SIMD flags read)")
