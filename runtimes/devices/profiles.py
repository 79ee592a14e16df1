"""Phone profiles and a roofline estimate of per-call latency (labelled as an estimate, not a measurement).

Roofline: a call needs ``2·MACs`` operations and must stream its weights once, so it takes at
least ``max(2·MACs / (peak · efficiency), weight_bytes / bandwidth)``. ``efficiency`` defaults to
0.25, what published Stable Diffusion pipelines reach on phone NPUs (METHODS.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    accelerator: str
    peak_tops: float  # int8/fp16 dense TOPS of the accelerator, as published
    bandwidth_gbs: float  # DRAM bandwidth, GB/s
    source: str


PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile("iphone-14-pro", "Apple A16 Neural Engine", 17.0, 51.2,
                      "Apple A16 Bionic announcement (Sept 2022): 17 TOPS Neural Engine; LPDDR5-6400 64-bit"),
        DeviceProfile("iphone-15-pro", "Apple A17 Pro Neural Engine", 35.0, 51.2,
                      "Apple A17 Pro announcement (Sept 2023): 35 TOPS Neural Engine; LPDDR5-6400 64-bit"),
        DeviceProfile("galaxy-s24-snapdragon", "Snapdragon 8 Gen 3 Hexagon NPU", 45.0, 76.8,
                      "Qualcomm Snapdragon 8 Gen 3 product brief (Oct 2023): 45 TOPS AI; LPDDR5X-9600 64-bit"),
        DeviceProfile("pixel-8-pro", "Google Tensor G3 TPU", 8.0, 68.2,
                      "Google Tensor G3 disclosures (Oct 2023, third-party measured ~8 TOPS int8); LPDDR5X-8533 64-bit"),
    )
}


def roofline_ms(macs: int, weight_bytes: int, profile: DeviceProfile, efficiency: float = 0.25) -> dict:
    """Estimated lower bound of one call's latency on ``profile`` (ms), and which bound binds."""
    compute = 2.0 * macs / (profile.peak_tops * 1e12 * efficiency) * 1e3
    memory = weight_bytes / (profile.bandwidth_gbs * 1e9) * 1e3
    return {"device": profile.name, "estimate_ms": max(compute, memory), "compute_ms": compute, "memory_ms": memory,
            "bound": "compute" if compute >= memory else "memory", "efficiency": efficiency, "label": "estimate", "source": profile.source}
