"""Accelerator presets for :func:`tpflax.suggest_mesh`: memory, bandwidths, hosts.

Every number here is **nominal**: the vendor's spec-sheet value (or, where the
sheet is silent, a stated assumption), not a measurement. Real collectives reach
a fraction of it, and the fraction differs per topology and message size. The
mesh suggestion ranks candidates by *ratios* of estimated communication time,
which these numbers get about right; override any of them when you know better
(``suggest_mesh(..., ici_bandwidth=..., dcn_bandwidth=..., chips_per_host=...,
device_memory=...)``, or ``--ici-bandwidth`` etc. on the command line).

Bandwidths are bytes per second **one device can send** during a collective:
half of a spec sheet's bidirectional per-chip figure, since the estimate counts
the bytes each device sends (:mod:`tpflax.estimate`, ring algorithm).

* ``fast`` (ICI on TPUs, NVLink on GPUs) connects every device in a
  ``fast_domain``: the largest single slice on TPUs (ICI spans hosts), one
  host on GPUs (NVLink within an 8-GPU node).
* ``slow`` (DCN between TPU slices, InfiniBand/RoCE between GPU hosts) connects
  domains.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from tpflax._src.errors import SuggestError

GiB = 1 << 30
GB = 10**9


@dataclass(frozen=True)
class Hardware:
    """One accelerator type, as the mesh suggestion sees it.

    Attributes:
        name: preset name (``"tpu-v5p"``) or ``"custom"``.
        device_memory: bytes of accelerator memory per device.
        fast_bandwidth: bytes/s a device sends over ICI / NVLink.
        slow_bandwidth: bytes/s a device sends over DCN / the host network.
        chips_per_host: devices per host (tensor parallelism stays within one).
        fast_domain: devices joined by the fast interconnect (a TPU slice, a GPU host).
        fast_name, slow_name: what to call the two links in reports.
        kind: ``"tpu"`` or ``"gpu"`` (decides how fsdp gradients are reduced).
        source: where the numbers come from.
        peak_flops: dense bf16 matmul flops/s of one device (spec sheet); the
            planner's chooser scores layouts by flops / peak + bytes / bandwidth.
        hbm_bandwidth: bytes/s of device memory (spec sheet): the optimizer
            update streams every parameter, gradient and moment byte per step.
    """

    name: str
    device_memory: int
    fast_bandwidth: float
    slow_bandwidth: float
    chips_per_host: int
    fast_domain: int
    fast_name: str = "ICI"
    slow_name: str = "DCN"
    kind: str = "tpu"
    source: str = ""
    peak_flops: float = 100e12
    hbm_bandwidth: float = 1000 * GB

    def describe(self) -> str:
        """One line for a report's header; memory in whole GiB where it is whole, else to a tenth (2 MiB was "0 GiB").

        >>> get_hardware("tpu-v5p").describe().split(",")[0], get_hardware(None, device_memory="2MiB").describe()[:23]
        ('tpu-v5p: 95 GiB/device', 'generic: 2.0 MiB/device')
        """
        from tpflax._src.specs import fmt_bytes

        whole = self.device_memory % GiB == 0
        memory = f"{self.device_memory // GiB} GiB" if whole else fmt_bytes(self.device_memory)
        return (f"{self.name}: {memory}/device, {self.fast_name} "
                f"{self.fast_bandwidth / GB:.0f} GB/s, {self.slow_name} {self.slow_bandwidth / GB:.2f} GB/s "
                f"per device, {self.chips_per_host} per host, {self.fast_name} domain {self.fast_domain}")


# Sources (nominal, public):
#  TPU figures: Google Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p,
#  v6e): HBM per chip, bidirectional ICI bandwidth per chip, chips per host, pod / slice size, and
#  DCN where the page gives it.
#  GPU figures: NVIDIA A100 / H100 / H200 SXM data sheets (memory, NVLink bidirectional bandwidth)
#  and the DGX A100 / DGX H100 / HGX H200 reference designs (one 200 Gb/s HDR or 400 Gb/s NDR
#  InfiniBand port per GPU, 8 GPUs per host).
#  peak_flops, hbm_bandwidth: the same pages' dense bf16 (TPU) / dense BF16 tensor-core (GPU, without
#  sparsity) figure and memory bandwidth per chip.
PRESETS: Mapping[str, Hardware] = {
    "tpu-v4": Hardware(
        "tpu-v4", 32 * GiB, 135 * GB, 6.25 * GB, 4, 4096,
        source="cloud.google.com/tpu/docs/v4: 32 GiB HBM2, 4096-chip pod, 4 chips per host; the page "
               "gives no per-chip ICI figure: 6 ICI links x 45 GB/s one way (How to Scale Your Model, "
               "TPU chapter) = 270 GB/s, halved as for the other presets; DCN not listed, assumed 50 Gbps "
               "per chip like v5p", peak_flops=275e12, hbm_bandwidth=1200 * GB),
    "tpu-v5e": Hardware(
        "tpu-v5e", 16 * GB, 200 * GB, 3.125 * GB, 8, 256,
        source="cloud.google.com/tpu/docs/v5e: 16 GB HBM2, 400 GBps bidirectional ICI per chip, 8 chips "
               "per host, 256-chip pod, 2 x 100 Gbps NIC per host (= 25 Gbps per chip)", peak_flops=197e12, hbm_bandwidth=819 * GB),
    "tpu-v5p": Hardware(
        "tpu-v5p", 95 * GiB, 600 * GB, 6.25 * GB, 4, 6144,
        source="cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e, 1200 GBps bidirectional ICI per chip, "
               "50 Gbps DCN per chip, 4 chips per host, largest single slice 6144 chips", peak_flops=459e12, hbm_bandwidth=2765 * GB),
    "tpu-v6e": Hardware(
        "tpu-v6e", 32 * GB, 400 * GB, 12.5 * GB, 8, 256,
        source="cloud.google.com/tpu/docs/v6e: 32 GB HBM, 800 GBps bidirectional ICI per chip, 8 chips "
               "per host, 256-chip pod; DCN not listed, assumed 100 Gbps per chip", peak_flops=918e12, hbm_bandwidth=1640 * GB),
    "a100": Hardware(
        "a100", 80 * GiB, 300 * GB, 25 * GB, 8, 8, "NVLink", "InfiniBand", "gpu",
        source="NVIDIA A100 80GB SXM data sheet: 80 GB HBM2e, NVLink 600 GB/s bidirectional; DGX A100: "
               "8 GPUs per host, one 200 Gb/s HDR InfiniBand port per GPU", peak_flops=312e12, hbm_bandwidth=2039 * GB),
    "h100": Hardware(
        "h100", 80 * GiB, 450 * GB, 50 * GB, 8, 8, "NVLink", "InfiniBand", "gpu",
        source="NVIDIA H100 SXM data sheet: 80 GB HBM3, NVLink 900 GB/s bidirectional; DGX H100: 8 GPUs "
               "per host, one 400 Gb/s NDR InfiniBand port per GPU", peak_flops=989e12, hbm_bandwidth=3350 * GB),
    "h200": Hardware(
        "h200", 141 * GB, 450 * GB, 50 * GB, 8, 8, "NVLink", "InfiniBand", "gpu",
        source="NVIDIA H200 SXM data sheet: 141 GB HBM3e, NVLink 900 GB/s bidirectional; HGX H200: 8 GPUs "
               "per host, one 400 Gb/s NDR InfiniBand port per GPU", peak_flops=989e12, hbm_bandwidth=4800 * GB),
}

# Used when no hardware is named: a plain 8-device host with a 10x slower network.
GENERIC = Hardware("generic", 0, 100 * GB, 12.5 * GB, 8, 8, "intra-host", "inter-host", "tpu",
                   source="no hardware given: assumed 8 devices per host, 100 GB/s within a host and "
                          "12.5 GB/s (100 Gbps) between hosts, 100 Tflop/s, 1 TB/s HBM; pass hardware= for real numbers")

# What plan() prices its candidate layouts on when no hardware is named.
DEFAULT_PLAN_HARDWARE = "tpu-v5e"

_ALIASES = {"v4": "tpu-v4", "v5e": "tpu-v5e", "v5litepod": "tpu-v5e", "v5p": "tpu-v5p", "v6e": "tpu-v6e",
            "trillium": "tpu-v6e", "a100-80gb": "a100", "h100-sxm": "h100", "h200-sxm": "h200"}


def known() -> list[str]:
    """Names of the built-in presets."""
    return list(PRESETS)


def parse_bytes(value: Any, what: str = "device memory", minimum: int = 1) -> int:
    """``"95GiB"``, ``"16 GB"``, ``"80e9"``, ``"256k"`` or a number of bytes, as an int.

    GB/MB/KB/TB (and k/m/g/t) are powers of 1000 and GiB/MiB/KiB/TiB powers of 1024. Text is read exactly
    (``"4.1KB"`` is 4100 bytes, not float's 4099.99...); a size under ``minimum`` bytes is refused.

    >>> parse_bytes("95GiB"), parse_bytes("16GB"), parse_bytes(1024), parse_bytes("4.1KB"), parse_bytes("0", minimum=0)
    (102005473280, 16000000000, 1024, 4100, 0)
    """
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
             "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, (int, float)):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in units:
            raise SuggestError(f"{what} {value!r} cannot be parsed; write e.g. '95GiB', '16GB', '256k' or a number "
                               "of bytes (GB = 1e9 bytes, GiB = 2**30)")
        n = float(Decimal(m.group(1)) * units[unit])
    if not (minimum <= n < float("inf")):  # NaN and inf too: a size is a finite count of bytes
        raise SuggestError(f"{what} {value!r} must be a finite number of bytes, at least {minimum}")
    return int(n)


def parse_bandwidth(value: Any, what: str) -> float:
    """Bytes/s from ``"100GB/s"``, ``"400Gbps"`` or a number of bytes/s.

    >>> parse_bandwidth("400Gbps", "x"), parse_bandwidth("50GB/s", "x")
    (50000000000.0, 50000000000.0)
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite_rate(float(value), value, what)
    text = str(value).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][+-]?\d+)?)\s*([KMGT]?)(bps|b/s|B/s|Bps|)", text)
    if not m:
        raise SuggestError(f"{what} {value!r} cannot be parsed; write e.g. '100GB/s', '400Gbps' or bytes/s")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2)]
    n = float(m.group(1)) * scale
    if m.group(3) in ("bps", "b/s"):
        n /= 8
    return _finite_rate(n, value, what)


def _finite_rate(n: float, value: Any, what: str) -> float:
    """``n`` bytes/s, or a SuggestError: NaN, inf and rates under a byte a second would price a collective at
    no time or at infinite time (an ``Infinity`` in ``--json`` output).

    >>> _finite_rate(float("nan"), "nan", "ICI bandwidth")
    Traceback (most recent call last):
    tpflax._src.errors.SuggestError: ICI bandwidth 'nan' must be a finite rate of at least 1 byte/s
    """
    if not (1 <= n < float("inf")):
        raise SuggestError(f"{what} {value!r} must be a finite rate of at least 1 byte/s")
    return n


def _slice_hint(key: str) -> str:
    """For a TPU slice given where a preset belongs (``"tpu-v5e:2x4"``): which preset and device count it
    means; else ''."""
    from tpflax._src.tpu import slice_or_none  # tpu imports this module

    topo = slice_or_none(key) if ":" in key else None
    if topo is None:
        return ""
    return (f"; {key!r} is a TPU slice, not a preset: pass hardware={topo.generation!r} with its "
            f"{topo.devices} devices (the slice itself is make_mesh's and estimate's target=, suggest's --target)")


def get_hardware(hardware: Any = None, *, device_memory: Any = None, fast_bandwidth: Any = None,
                 slow_bandwidth: Any = None, chips_per_host: int | None = None,
                 fast_domain: int | None = None) -> Hardware:
    """A preset by name (or a :class:`Hardware`), with any user numbers applied on top.

    Args:
        hardware: a preset name (see :func:`known`), a :class:`Hardware`, or None
            for :data:`GENERIC` (then ``device_memory`` is required).
        device_memory: bytes or a string like ``"95GiB"``; overrides the preset's.
        fast_bandwidth, slow_bandwidth: bytes/s (or ``"400Gbps"``) per device.
        chips_per_host, fast_domain: override the preset's host and domain sizes.

    Raises:
        SuggestError: unknown name (the known ones are listed), unparsable numbers.

    >>> get_hardware("tpu-v5p", device_memory="90GiB").device_memory // 2**30
    90
    """
    if hardware is None:
        hw = GENERIC
    elif isinstance(hardware, Hardware):
        hw = hardware
    else:
        key = str(hardware).strip().lower()
        key = _ALIASES.get(key, key)
        if key not in PRESETS and f"tpu-{key}" in PRESETS:
            key = f"tpu-{key}"
        if key not in PRESETS:
            raise SuggestError(f"unknown hardware {hardware!r}; known presets: {', '.join(PRESETS)} (or give "
                               f"device_memory / bandwidths yourself){_slice_hint(key)}")
        hw = PRESETS[key]
    changes: dict[str, Any] = {}
    if device_memory is not None:
        changes["device_memory"] = parse_bytes(device_memory)
    if fast_bandwidth is not None:
        changes["fast_bandwidth"] = parse_bandwidth(fast_bandwidth, "fast (ICI/NVLink) bandwidth")
    if slow_bandwidth is not None:
        changes["slow_bandwidth"] = parse_bandwidth(slow_bandwidth, "slow (DCN/network) bandwidth")
    for name, v in (("chips_per_host", chips_per_host), ("fast_domain", fast_domain)):
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SuggestError(f"{name} {v!r} must be a positive integer")
            changes[name] = v
    if changes:
        hw = replace(hw, **changes)
        if "chips_per_host" in changes and fast_domain is None and hw.fast_domain < hw.chips_per_host:
            hw = replace(hw, fast_domain=hw.chips_per_host)
    if hw.device_memory <= 0:
        raise SuggestError("no device memory: pass device_memory (e.g. '95GiB') or a hardware preset "
                           f"({', '.join(PRESETS)})")
    return hw
