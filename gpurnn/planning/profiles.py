"""Device profiles: what the plan needs to know about a GPU (SMs, shared memory, registers,
threads, DRAM bandwidth, L2), as named profiles or read off the current device.

Named profiles never touch numba.cuda (importing it fixes simulator mode for the process);
`device=None` reads the current device through numba.cuda, and means the "sim" profile when
numba.cuda runs in simulator mode.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

KB = 1024


@dataclass(frozen=True)
class DeviceProfile:
    """What the plan needs to know about a GPU. Sizes in bytes, bandwidth in bytes/s."""
    name: str
    sm_count: int
    smem_per_block_optin: int        # CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    smem_per_sm: int                 # CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
    smem_reserved_per_block: int     # the system's share of each resident block (1 KB on sm_80+)
    regs_per_sm: int
    regs_per_block: int
    max_threads_per_block: int
    max_threads_per_sm: int
    max_blocks_per_sm: int
    compute_capability: tuple
    mem_bandwidth: Optional[float]   # DRAM bytes/s; None if unknown
    l2_bytes: Optional[int]
    default_threads: int = 256
    simulator: bool = False

    def __str__(self):
        bw = f"{self.mem_bandwidth / 1e12:.2f} TB/s" if self.mem_bandwidth else "bandwidth unknown"
        cc = ".".join(map(str, self.compute_capability))
        return (f"{self.name} (cc {cc}, {self.sm_count} SMs, "
                f"{self.smem_per_block_optin / KB:g} KB opt-in shared memory per block, "
                f"{self.smem_per_sm / KB:g} KB per SM, {bw})")


def _hopper(name, bandwidth):
    return DeviceProfile(name=name, sm_count=132, smem_per_block_optin=227 * KB, smem_per_sm=228 * KB,
                         smem_reserved_per_block=KB, regs_per_sm=65536, regs_per_block=65536,
                         max_threads_per_block=1024, max_threads_per_sm=2048, max_blocks_per_sm=32,
                         compute_capability=(9, 0), mem_bandwidth=bandwidth, l2_bytes=50 * KB * KB)


def _a100(name, bandwidth):
    return DeviceProfile(name=name, sm_count=108, smem_per_block_optin=163 * KB, smem_per_sm=164 * KB,
                         smem_reserved_per_block=KB, regs_per_sm=65536, regs_per_block=65536,
                         max_threads_per_block=1024, max_threads_per_sm=2048, max_blocks_per_sm=32,
                         compute_capability=(8, 0), mem_bandwidth=bandwidth, l2_bytes=40 * KB * KB)


PROFILES = {
    "H100": _hopper("H100", 3.35e12),                  # SXM5 80 GB
    "H200": _hopper("H200", 4.8e12),                   # SXM 141 GB: an H100 with HBM3e
    "A100": _a100("A100", 1.555e12),                   # SXM4 40 GB
    "A100-80GB": _a100("A100-80GB", 2.039e12),
    "RTX4090": DeviceProfile(name="RTX4090", sm_count=128, smem_per_block_optin=99 * KB,
                             smem_per_sm=100 * KB, smem_reserved_per_block=KB, regs_per_sm=65536,
                             regs_per_block=65536, max_threads_per_block=1024,
                             max_threads_per_sm=1536, max_blocks_per_sm=24,
                             compute_capability=(8, 9), mem_bandwidth=1.008e12,
                             l2_bytes=72 * KB * KB),
    # Numba's simulator spends a Python thread per CUDA thread and runs blocks one after another:
    # a small pretend device keeps simulated launches quick. Its bandwidth is nominal.
    "sim": DeviceProfile(name="sim", sm_count=4, smem_per_block_optin=48 * KB, smem_per_sm=48 * KB,
                         smem_reserved_per_block=0, regs_per_sm=65536, regs_per_block=65536,
                         max_threads_per_block=1024, max_threads_per_sm=2048, max_blocks_per_sm=32,
                         compute_capability=(5, 2), mem_bandwidth=1e10, l2_bytes=4 * KB * KB,
                         default_threads=32, simulator=True),
}


def device_profile(device=None) -> DeviceProfile:
    """A DeviceProfile from a profile name (case-insensitive), a DeviceProfile, or None (the
    current CUDA device; the "sim" profile when numba.cuda runs in simulator mode)."""
    if isinstance(device, DeviceProfile):
        return device
    if isinstance(device, str):
        for name, prof in PROFILES.items():
            if name.lower() == device.lower():
                return prof
        raise ValueError(f"device must be one of {tuple(PROFILES)}, a DeviceProfile or None "
                         f"(the current CUDA device); got {device!r}")
    if device is None:
        return _current_device_profile()
    raise TypeError(f"device must be a profile name, a DeviceProfile or None; "
                    f"got {type(device).__name__}")


def _current_device_profile() -> DeviceProfile:
    from numba import cuda
    from numba.cuda.core import config
    if config.ENABLE_CUDASIM:
        return PROFILES["sim"]
    if not cuda.is_available():
        raise RuntimeError(f"device=None asks for the current CUDA device, but none is available; "
                           f"pass a profile name instead, one of {tuple(PROFILES)}, "
                           f"or a DeviceProfile")
    return profile_from_numba_device(cuda.get_current_device())


def profile_from_numba_device(dev) -> DeviceProfile:
    """Read a DeviceProfile off a numba.cuda Device (attributes are CU_DEVICE_ATTRIBUTE_* names)."""
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    cc = tuple(dev.compute_capability)
    try:
        # Memory clock (kHz) x bus width (bits) x 2 (double data rate) = peak DRAM bytes/s.
        bandwidth = 2.0 * dev.MEMORY_CLOCK_RATE * 1e3 * dev.GLOBAL_MEMORY_BUS_WIDTH / 8
    except AttributeError:
        bandwidth = None
    bandwidth = bandwidth or None
    return DeviceProfile(
        name=name, sm_count=int(dev.MULTIPROCESSOR_COUNT),
        smem_per_block_optin=int(dev.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
        smem_per_sm=int(dev.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR),
        smem_reserved_per_block=int(dev.RESERVED_SHARED_MEMORY_PER_BLOCK),
        regs_per_sm=int(dev.MAX_REGISTERS_PER_MULTIPROCESSOR),
        regs_per_block=int(dev.MAX_REGISTERS_PER_BLOCK),
        max_threads_per_block=int(dev.MAX_THREADS_PER_BLOCK),
        max_threads_per_sm=int(dev.MAX_THREADS_PER_MULTI_PROCESSOR),
        max_blocks_per_sm=int(dev.MAX_BLOCKS_PER_MULTIPROCESSOR),
        compute_capability=cc, mem_bandwidth=bandwidth, l2_bytes=int(dev.L2_CACHE_SIZE))


__all__ = ["KB", "DeviceProfile", "PROFILES", "device_profile", "profile_from_numba_device"]
