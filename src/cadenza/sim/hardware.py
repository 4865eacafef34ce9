"""The hardware the simulator prices: GPUs (peak compute, memory bandwidth and size, host link)
and the links between tiers and workers.

GPU figures are the vendors' datasheet peaks (dense, no sparsity); how much of a peak a step
reaches is a separate, stated parameter of the roofline (``roofline.RooflineParams``), not
folded in here:

* A100-80GB / A100-40GB (SXM): 312 TFLOPS BF16 tensor, 2,039 / 1,555 GB/s HBM2e — NVIDIA A100
  Tensor Core GPU datasheet (2021).
* H100 (SXM5): 989 TFLOPS BF16 tensor, 3.35 TB/s HBM3, 80 GB — NVIDIA H100 Tensor Core GPU
  datasheet.
* H200 (SXM): 989 TFLOPS BF16 tensor, 4.8 TB/s HBM3e, 141 GB — NVIDIA H200 Tensor Core GPU
  datasheet.
* RTX 4090: 165.2 TFLOPS FP16/BF16 tensor with FP32 accumulate, 1,008 GB/s GDDR6X, 24 GB —
  NVIDIA Ada Lovelace GPU architecture whitepaper (v1.01), Appendix A.

Host links: PCIe 4.0 x16 is 31.5 GB/s per direction raw and PCIe 5.0 x16 63 GB/s; pinned-memory
copies reach about 80% of that (``PCIE_EFFICIENCY``). NVMe defaults are a PCIe 4.0 data-centre
drive (about 7 GB/s sequential read, 5 GB/s write); the network default is 100 Gb/s per worker
(MELL's evaluation used 10 Gb/s: ``--network-gbps 10``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GB = 1e9
GIB = 1 << 30
PCIE_EFFICIENCY = 0.8
PCIE_RAW_GBPS = {4: 31.5, 5: 63.0}


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_tflops: float  # dense BF16/FP16 tensor peak
    hbm_gbps: float  # memory bandwidth, GB/s
    memory_bytes: int
    pcie_gen: int

    @property
    def pcie_bytes_per_s(self) -> float:
        return PCIE_RAW_GBPS[self.pcie_gen] * PCIE_EFFICIENCY * GB


GPUS: dict[str, GPUSpec] = {
    g.name: g
    for g in (
        GPUSpec("A100-80GB", 312.0, 2039.0, 80 * GIB, 4),
        GPUSpec("A100-40GB", 312.0, 1555.0, 40 * GIB, 4),
        GPUSpec("H100", 989.0, 3350.0, 80 * GIB, 5),
        GPUSpec("H200", 989.0, 4800.0, int(141 * GB), 5),
        GPUSpec("RTX-4090", 165.2, 1008.0, 24 * GIB, 4),
    )
}


def gpu_spec(name: str) -> GPUSpec:
    key = name.upper().replace("RTX4090", "RTX-4090").replace("RTX 4090", "RTX-4090")
    try:
        return GPUS[key]
    except KeyError:
        raise ValueError(f"gpu must be one of {', '.join(GPUS)}; got {name!r}") from None


@dataclass(frozen=True)
class Links:
    """Bandwidths (bytes/s) of the copies a simulated worker makes, and of the network."""

    host_to_device: float
    device_to_host: float
    disk_read: float
    disk_write: float
    network: float
    network_latency_s: float = 0.0

    def with_network(self, gbps: float | None, latency_s: float | None = None) -> Links:
        """These links with the network set to ``gbps`` gigabits per second (None: kept)."""
        links = self if gbps is None else replace(self, network=gbps * GB / 8)
        return links if latency_s is None else replace(links, network_latency_s=latency_s)


NVME_READ = 7.0 * GB
NVME_WRITE = 5.0 * GB
NETWORK_100G = 100 * GB / 8
NETWORK_LATENCY_S = 20e-6


def gpu_links(gpu: GPUSpec) -> Links:
    return Links(
        host_to_device=gpu.pcie_bytes_per_s,
        device_to_host=gpu.pcie_bytes_per_s,
        disk_read=NVME_READ,
        disk_write=NVME_WRITE,
        network=NETWORK_100G,
        network_latency_s=NETWORK_LATENCY_S,
    )
