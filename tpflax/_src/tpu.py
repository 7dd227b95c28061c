"""TPU topologies for compiling with the real TPU compiler on a machine without TPUs.

``libtpu`` (``pip install "tpflax[tpu]"``) describes any TPU slice as abstract,
compile-only devices: ``jax.experimental.topologies.get_topology_desc``. A mesh
over them lowers and compiles with the TPU compiler, so memory, collectives and
FLOPs are the TPU's, while nothing is allocated and nothing runs.

A target is named ``"tpu-<generation>:<chip grid>"``, e.g. ``"tpu-v5e:16x16"``
(256 chips), ``"tpu-v4:4x4x4"`` or ``"tpu-v5p:4x4x4"`` (64 chips). TPU v4
topologies expose each chip's two TensorCores as two devices, so
``tpu-v4:4x4x4`` has 128 devices, each with half the chip's HBM.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from tpflax._src.errors import DeviceError, MeshError
from tpflax._src.hardware import PRESETS

# Chip grids per generation: the slice shapes Cloud TPU documents (v5e and v6e are
# 2D tori of up to 256 chips; v4 and v5p are 3D).
TOPOLOGIES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "tpu-v4": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x12",
               "8x8x16", "8x16x16", "12x16x16", "16x16x16"),
    "tpu-v5e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
    "tpu-v5p": ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4", "4x4x8", "4x8x8", "8x8x8", "8x8x16",
                "8x16x16", "16x16x16", "16x16x24"),
    "tpu-v6e": ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"),
})
# Abstract devices per chip in libtpu's topology description (v4: one per TensorCore).
DEVICES_PER_CHIP: Mapping[str, int] = MappingProxyType({"tpu-v4": 2})
# jax ``device_kind`` -> hardware preset, for the HBM of a mesh's devices.
DEVICE_KINDS: Mapping[str, str] = MappingProxyType({
    "TPU v4": "tpu-v4", "TPU v5 lite": "tpu-v5e", "TPU v5e": "tpu-v5e", "TPU v5": "tpu-v5p",
    "TPU v5p": "tpu-v5p", "TPU v6 lite": "tpu-v6e", "TPU v6e": "tpu-v6e"})
INSTALL = 'pip install "tpflax[tpu]"'


@dataclass(frozen=True)
class Topology:
    """One TPU slice the compiler can target.

    Attributes:
        generation: the hardware preset name, e.g. ``"tpu-v5e"``.
        grid: the chip grid, e.g. ``"16x16"``.
    """

    generation: str
    grid: str

    @property
    def name(self) -> str:
        return f"{self.generation}:{self.grid}"

    @property
    def libtpu_name(self) -> str:
        """The name libtpu knows: ``"v5e:16x16"``."""
        return f"{self.generation.removeprefix('tpu-')}:{self.grid}"

    @property
    def chips(self) -> int:
        return math.prod(int(x) for x in self.grid.split("x"))

    @property
    def devices(self) -> int:
        """How many jax devices the topology has (chips x devices per chip)."""
        return self.chips * DEVICES_PER_CHIP.get(self.generation, 1)

    @property
    def hbm_per_device(self) -> int:
        """Bytes of HBM one device owns: the preset's per-chip HBM over devices per chip."""
        return PRESETS[self.generation].device_memory // DEVICES_PER_CHIP.get(self.generation, 1)


def known_topologies() -> list[str]:
    """Every target name :func:`parse_topology` accepts.

    >>> known_topologies()[:2]
    ['tpu-v4:2x2x1', 'tpu-v4:2x2x2']
    """
    return [f"{g}:{t}" for g, grids in TOPOLOGIES.items() for t in grids]


def slice_or_none(text: Any) -> Topology | None:
    """The TPU slice ``text`` names (``"tpu-v5e:4x4"``), or None when it names none.

    >>> slice_or_none("v5e:2x4").devices, slice_or_none("8")
    (8, None)
    """
    try:
        return parse_topology(text)
    except MeshError:
        return None


def parse_topology(target: Any) -> Topology:
    """Validate a target name (``"tpu-v5e:16x16"``; the ``tpu-`` prefix is optional).

    Raises:
        MeshError: an unknown generation or grid; lists the known ones.

    >>> parse_topology("v5e:2x4").devices, parse_topology("tpu-v4:2x2x1").devices
    (8, 8)
    """
    if isinstance(target, Topology):
        return target
    text = str(target).strip().lower()
    gen, sep, grid = text.partition(":")
    gen = gen if gen.startswith("tpu-") else f"tpu-{gen}"
    if not sep or gen not in TOPOLOGIES:
        raise MeshError(f"unknown TPU target {target!r}; write tpu-<generation>:<chip grid>, e.g. "
                        f"tpu-v5e:16x16 (generations: {', '.join(TOPOLOGIES)})")
    if grid not in TOPOLOGIES[gen]:
        raise MeshError(f"unknown {gen} topology {grid!r} in target {target!r}; known {gen} topologies: "
                        f"{', '.join(TOPOLOGIES[gen])}")
    return Topology(gen, grid)


def topology_for(generation: str, devices: int) -> Topology | None:
    """The known topology of ``generation`` with exactly ``devices`` devices, or None.

    >>> topology_for("tpu-v5e", 64).name, topology_for("tpu-v4", 64).name
    ('tpu-v5e:8x8', 'tpu-v4:2x4x4')
    """
    gen = generation if generation.startswith("tpu-") else f"tpu-{generation}"
    for grid in TOPOLOGIES.get(gen, ()):
        if Topology(gen, grid).devices == devices:
            return Topology(gen, grid)
    return None


def topology_devices(target: Any) -> list[Any]:
    """The abstract (compile-only) devices of a target topology, in id order.

    Raises:
        MeshError: an unknown target.
        DeviceError: libtpu is not installed (says ``pip install "tpflax[tpu]"``).
    """
    return list(_devices(parse_topology(target).libtpu_name))


def hbm_per_device(devices: Any) -> tuple[int, str] | None:
    """``(bytes of HBM per device, preset name)`` for TPU devices, or None when unknown.

    A chip's HBM is split between the devices it exposes (libtpu's v4 topologies
    give each TensorCore its own device).
    """
    devs = list(devices)
    preset = DEVICE_KINDS.get(getattr(devs[0], "device_kind", "")) if devs else None
    if preset is None:
        return None
    per_chip = 1 + max(int(getattr(d, "core_on_chip", 0) or 0) for d in devs)
    return PRESETS[preset].device_memory // per_chip, preset


@functools.cache
def _devices(libtpu_name: str) -> tuple[Any, ...]:
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise DeviceError(f"compiling for TPU target {libtpu_name!r} needs libtpu, which is not installed; "
                          f"run {INSTALL} (it installs the libtpu matching your jax)")
    from jax.experimental import topologies

    quiet_libtpu()
    with _CapturedStderr() as err:
        try:
            desc = topologies.get_topology_desc(platform="tpu", topology_name=libtpu_name)
        except Exception as e:  # noqa: BLE001 - reported with what libtpu printed
            raise DeviceError(f"libtpu could not describe topology {libtpu_name!r}: {e}; libtpu said: "
                              f"{err.text()[-800:] or 'nothing'}") from e
    return tuple(sorted(desc.devices, key=lambda d: d.id))


# PCI device ids of TPU chips (vendor 0x1ae0, Google), as jax's hardware_utils lists them; newer chips
# also show up as /dev/accel* or /dev/vfio/<n>, which are checked too
_TPU_PCI_IDS = frozenset({"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})


def tpu_attached() -> bool:
    """Whether this machine has a TPU chip: a TPU PCI device, ``/dev/accel*`` or ``/dev/vfio/<n>``.

    >>> isinstance(tpu_attached(), bool)
    True
    """
    import glob

    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f, open(os.path.join(os.path.dirname(vendor), "device")) as g:
                if f.read().strip() == "0x1ae0" and g.read().strip() in _TPU_PCI_IDS:
                    return True
        except OSError:
            continue
    return False


def quiet_libtpu() -> None:
    """On a machine without TPUs, give libtpu the settings it would otherwise warn about.

    With libtpu installed (``tpflax[tpu]``), jax loads it whenever its backends start,
    even with no TPU attached, and libtpu prints that it cannot determine the
    accelerator type and the worker hostnames (and "Logging before InitGoogle") on
    every run. Compiling for a target topology needs neither, so when no TPU chip is
    attached the two are set to harmless defaults (a one-host v5e slice on
    localhost; compile-only topologies of every generation ignore them). Values the
    user set win, and on a TPU host nothing is touched, so libtpu finds its chips
    as usual. libtpu's lock file, which keeps two processes off one TPU, is not
    needed either: several processes may load it to compile side by side.
    Must run before jax starts its backends; ``import tpflax`` calls it.
    """
    import importlib.util

    if importlib.util.find_spec("libtpu") is None or tpu_attached():
        return
    for key, value in (("TPU_ACCELERATOR_TYPE", "v5litepod-8"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("TPU_SKIP_MDS_QUERY", "1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(key, value)


class _CapturedStderr:
    """Send file descriptor 2 to a temp file: libtpu's C++ start-up writes there directly.

    Without a TPU it warns that TPU_ACCELERATOR_TYPE and the worker hostnames are
    unset; compiling does not need them, so the warnings are dropped (and quoted
    only if the topology call fails).
    """

    def __enter__(self):
        import sys

        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.close()

    def text(self) -> str:
        self._file.seek(0)
        return self._file.read().decode(errors="replace").strip()


def one_ring(target: Any, devices: int) -> bool:
    """Whether XLA:TPU runs a collective over all ``devices`` devices of ``target`` (a topology,
    ``"tpu-v5p:2x2x2"``, or a generation, ``"tpu-v5p"``: its topology of that many devices) on
    one ring; None or an unknown count: assumed so.

    Only a one-ring all-reduce of a pinned fsdp gradient becomes a reduce-scatter (libtpu's
    ``AllReduceScatterFusion``, ``StrategyRing``); where the devices span three torus dims, or two
    both longer than 2, it runs as an N-dimensional all-reduce (``StrategyND``) and the gradient is
    all-reduced whole, then sliced. Measured with a fsdp-only mesh over the whole slice (libtpu
    0.0.42.1): one ring on v5e/v6e 2x2 and 2x4 and v5p 2x2x1; N-D on v5e/v6e 4x4, v5p 2x2x2
    and 2x2x4 and v4 2x2x1 (a v4 chip's two TensorCores are a dim of their own).

    >>> one_ring("tpu-v5e:2x4", 8), one_ring("tpu-v5p", 8), one_ring("tpu-v4:2x2x1", 8)
    (True, False, False)
    """
    topo = _slice(target, devices)
    if topo is None:
        return True
    dims = [int(x) for x in topo.grid.split("x")] + [DEVICES_PER_CHIP.get(topo.generation, 1)]
    long = [n for n in dims if n > 1]
    return len(long) <= 2 and sum(n > 2 for n in long) <= 1


# Measured (libtpu 0.0.42.1, benchmarks/tpu_aot_notes.md): the smallest slice on which XLA:TPU
# gathers parameters over all of its devices as all-reduces.
WHOLE_SLICE_GATHER_AR = 64


def gathers_reduce(target: Any, devices: int) -> bool:
    """Whether XLA:TPU runs an all-gather over all ``devices`` devices of ``target`` (as
    :func:`one_ring` takes it) as an all-reduce of the zero-padded value: on a known slice of 64
    or more devices (v5e/v6e 8x8 and up, v5p 4x4x4 and up), twice a gather's ring bytes.

    Measured with the zoo Llama's fsdp gathers: on fsdp-only meshes of 64, 128 and 256 devices
    every gather of a leaf up to 16 MiB (as stored) is combined into one all-reduce of
    dynamic-update-slices of the shards (``StrategyND``), larger leaves stay gathers
    (:func:`tpflax._src.cost.gradients.gradient_items`); a gather over part of the slice
    (``data=2,fsdp=64`` on v5e:8x16, 64 of 128) or over 32 devices (v5e:4x8) stays an all-gather.

    >>> gathers_reduce("tpu-v5e", 64), gathers_reduce("tpu-v5e:4x8", 32), gathers_reduce(None, 64)
    (True, False, False)
    """
    topo = _slice(target, devices)
    return topo is not None and topo.devices >= WHOLE_SLICE_GATHER_AR


def _slice(target: Any, devices: int) -> Topology | None:
    """The topology ``target`` (a topology or a generation) names for ``devices`` devices, or None."""
    if target is None:
        return None
    topo = parse_topology(target) if ":" in str(target) else topology_for(str(target), devices)
    return topo if topo is not None and topo.devices == devices else None


def slice_name(target: Any, devices: int) -> str:
    """The slice :func:`one_ring` judged: ``"tpu-v5e:4x4"`` for ``("tpu-v5e", 16)``, else ``target``.

    >>> slice_name("tpu-v5e", 16), slice_name("tpu-v5p:2x2x2", 8)
    ('tpu-v5e:4x4', 'tpu-v5p:2x2x2')
    """
    topo = _slice(target, devices)
    return topo.name if topo is not None else str(target)


# XLA:TPU's memory tile of a 2-D+ array: 8 sublanes x 128 lanes (fewer sublanes for a dim under 8)
LANES, SUBLANES = 128, 8
# XLA:TPU pads a reduce-scattered sublane shard to whole tiles holding a multiple of this many elements
# (two float32 tiles: 16 rows of 128 lanes, 8 of 256; :func:`scattered_rows`)
PAD_ELEMENTS = 2 * SUBLANES * LANES


def lane_pad(n: int) -> int:
    """``n`` padded to whole 128-lane tiles.

    >>> lane_pad(64), lane_pad(197), lane_pad(256)
    (128, 256, 256)
    """
    return -(-n // LANES) * LANES


def sublane_pad(k: int, itemsize: int) -> int:
    """``k`` rows padded to whole sublane tiles: 8, or the power of two at or above a shorter dim (at least
    2 for 16-bit types, which pack two rows per word).

    >>> sublane_pad(3, 4), sublane_pad(3, 2), sublane_pad(1, 2), sublane_pad(10, 4)
    (4, 4, 2, 16)
    """
    tile = min(SUBLANES, max(4 // itemsize, 1 << (k - 1).bit_length()))
    return -(-k // tile) * tile


@functools.lru_cache(maxsize=1 << 12)
def device_layout(shape: tuple[int, ...], itemsize: int, rows: int | None = None) -> tuple[int, int]:
    """The (lane, sublane) dims of the layout XLA:TPU gives an array of this per-device ``shape``:
    the pair of dims whose tiling pads it least, ties going to the later dims (the row-major
    ``(-1, -2)``). A sublane dim is tiled by 8, or by the power of two at or above a shorter dim
    (at least 2 for 16-bit types, which pack two rows per word); the lane dim by 128.

    It is the layout the TPU client gives a parameter (``Compiled.input_formats``: it matched 1000
    random shapes of 2 to 4 dims, float32 and bfloat16, libtpu 0.0.42.1), and an fsdp parameter's
    gradient takes it from the optimizer update in XLA's ``layout-assignment``
    (benchmarks/tpu_aot_notes.md, "What picks the gradient layout").

    ``rows``: tile the sublanes by this many rows whatever the dim (a 16-bit gradient of a float32
    kernel: :func:`whole_tiles`).

    >>> device_layout((80, 10, 64), 4), device_layout((64, 8, 64), 4), device_layout((96, 6, 128), 4)
    ((0, 2), (2, 1), (2, 0))
    >>> device_layout((8, 2, 16), 4), device_layout((8, 2, 16), 2, rows=16)
    ((2, 1), (2, 0))
    """
    def padded(lane: int, sub: int) -> int:
        rest = math.prod(n for i, n in enumerate(shape) if i not in (lane, sub))
        tiled = -(-shape[sub] // rows) * rows if rows else sublane_pad(shape[sub], itemsize)
        return rest * tiled * lane_pad(shape[lane])

    r = len(shape)
    pairs = [(lane, sub) for lane in reversed(range(r)) for sub in reversed(range(r)) if sub != lane]
    return min(pairs, key=lambda p: padded(*p))


def whole_tiles(shard: tuple[int, ...], split: tuple[int, ...], itemsize: int, grad_itemsize: int | None = None, *,
                devices: int) -> bool:
    """Whether XLA:TPU reduce-scatters a pinned fsdp gradient on one ring (:func:`one_ring`), rather
    than all-reduce it whole, by how the ``split`` dims of its per-device ``shard`` fit the tiles of
    the parameter's :func:`device_layout`. Measured on v5e:2x4 (benchmarks/tpu_aot_notes.md, rounds
    36-41; benchmarks/results/tpu_padded_rows.md). Each split dim must be:

    * the lane dim: a multiple of 128, 256 for a 16-bit gradient (``grad_itemsize``, default
      ``itemsize``): bfloat16 lane shards of 128 and 384 all-reduced, 256 and 512 reduce-scattered;
      ViT-B's ``[768, 12, 64]`` q/k/v kernels on fsdp=8 keep the split 768 in the lanes (shards of
      96), width 512's move it to the sublanes (shards of 64);
    * the sublane dim of a 2-D shard: whole tiles, or ``s`` rows XLA:TPU pads to ``P``
      (:func:`scattered_rows`) when the ``devices`` padded shards are at most 1.5 times the whole
      gradient's rows in 8-row tiles, ``2 n P <= 3 ceil8(n s)``. With 64 columns (16-row padding),
      all-reduced whole / padded: fsdp=8 shards of 9, 10, 17-21 / 11-15, 22-27, 33, 50-60 rows;
      fsdp=4 (beside model=2) 9, 10, 17-20 / 11, 21, 22; fsdp=2 (beside model=4) 17-20 / 9-13, 21,
      25, 33. At 8 devices: less than a third of the padded shard padding;
    * the sublane dim of a shard of three dims or more: whole tiles of 8 rows, 16 for a 16-bit
      gradient, never padded (float32 ``(K, C, 8 s)`` kernels split on ``8 s``, K = 2, 3, 4, 9:
      ``s = 8`` reduce-scattered, 11-25 all-reduced whole; ResNet-18's ``[3, 3, 64, 8]`` shards
      reduce-scattered in float32, all-reduced whole in bfloat16);
    * in a gradient narrower than its parameter (a float32 3-D kernel's bfloat16 gradient): the
      sublane dim of a layout tiled by 16 rows whatever the dims, whole tiles;
    * any other (major) dim: a multiple of 8 (``[8, 2, 16]``, ``[3, 128, 8]`` reduce-scattered;
      ``[10, 2, 16]``, ``[12, 2, 16]``, ``[12, 4, 32]``, ``[3, 128, 11]`` all-reduced whole; seen
      once otherwise: ``[11, 8, 16]`` padded to 12 rows and reduce-scattered).

    >>> whole_tiles((96, 12, 64), (0,), 4, devices=8), whole_tiles((64, 8, 64), (0,), 4, devices=8)
    (False, True)
    >>> whole_tiles((768, 384), (1,), 4, devices=8), whole_tiles((768, 384), (1,), 2, devices=8)
    (True, False)
    >>> whole_tiles((8, 64), (0,), 2, devices=8), whole_tiles((16, 64), (0,), 2, devices=8)
    (False, True)
    >>> whole_tiles((500, 256), (0,), 4, devices=8), whole_tiles((12, 64), (0,), 2, devices=8)
    (True, True)
    >>> [whole_tiles((s, 64), (0,), 4, devices=n) for n, s in ((8, 21), (4, 21), (2, 9), (2, 20))]
    [False, True, True, False]
    """
    if len(shard) < 2:
        return True
    narrow = bool(grad_itemsize) and grad_itemsize < itemsize  # a cast gradient: 16-row tiles whatever the dims
    pack = max(1, 4 // (grad_itemsize or itemsize))
    lane, sub = device_layout(tuple(shard), itemsize, SUBLANES * pack if narrow else None)
    if any(d == lane and shard[d] % (LANES * pack) for d in split):
        return False
    if any(d not in (lane, sub) and shard[d] % SUBLANES for d in split):  # a major dim: 8 at a time, unpadded
        return False
    if sub not in split:
        return True
    if narrow or len(shard) > 2:  # never padded (scattered_rows): whole tiles of 8 rows, 16 for a 16-bit gradient
        return shard[sub] % (SUBLANES * pack) == 0
    padded = scattered_rows(shard, split, itemsize)
    return padded is None or 2 * devices * padded <= 3 * (-(-devices * shard[sub] // SUBLANES) * SUBLANES)


def scattered_rows(shard: tuple[int, ...], split: tuple[int, ...], itemsize: int,
                   grad_itemsize: int | None = None) -> int | None:
    """The rows XLA:TPU pads the split sublane dim of a 2-D per-device gradient ``shard`` to before
    it reduce-scatters it, or None when the split is not on the sublanes, needs no padding, or the
    shard is one XLA:TPU never pads (:func:`whole_tiles`): of more dims, or a gradient narrower than
    its parameter (``grad_itemsize``).

    The padded rows are a multiple of 8 that, times the lanes (padded to 128), is a multiple of
    :data:`PAD_ELEMENTS`: 16 rows at a time beside 128 or 384 lanes, 8 beside 256 or 512, float32
    and bfloat16 parameters alike. XLA:TPU pads only where the padding is small enough
    (:func:`whole_tiles`), and its collective-permutes then
    move the ``P - s`` rows each device's padded shard is off by (``(n - 1) (P - s)`` rows in all,
    for ``n`` devices). Measured on v5e:2x4 (benchmarks/tpu_aot_notes.md, forty-first round;
    benchmarks/results/tpu_padded_rows.md): a ``(4000, 256)`` table's 500-row shards on fsdp=8
    reduce-scattered as 504 rows (a 28-row permute), 22-row shards of 64 columns as 32, 21-row
    shards of 256 columns as 24.

    >>> scattered_rows((500, 256), (0,), 4), scattered_rows((22, 64), (0,), 4), scattered_rows((21, 384), (0,), 2)
    (504, 32, 32)
    >>> scattered_rows((16, 64), (0,), 4), scattered_rows((24, 64), (0,), 4), scattered_rows((64, 21), (1,), 4)
    (None, 32, 32)
    >>> scattered_rows((4, 16, 11), (2,), 4), scattered_rows((22, 64), (0,), 4, 2)
    (None, None)
    """
    if len(shard) != 2 or (grad_itemsize and grad_itemsize < itemsize):
        return None
    lane, sub = device_layout(tuple(shard), itemsize)
    if sub not in split:
        return None
    grain = math.lcm(SUBLANES, PAD_ELEMENTS // math.gcd(PAD_ELEMENTS, lane_pad(shard[lane])))
    rows = shard[sub]
    return None if rows % grain == 0 else -(-rows // grain) * grain


def conv_kernel_gathered_as_stored(in_features: int, out_features: int, on_out: bool, devices: int,
                                   cast: bool, tensor_split: bool | None = None) -> bool:
    """Whether XLA:TPU gathers a float32 1x1 convolution kernel as float32, converting it to bfloat16 after the
    gather (else it converts first and gathers bfloat16). ``in_features`` and ``out_features`` are the
    kernel's on one device after the gather (a tensor split applied); ``on_out`` says which of them the
    ``devices`` split, ``on_out=False`` the input features; ``cast``: the model casts the kernel to bfloat16
    (mixed precision), else the convolution computes in float32 (and multiplies in bfloat16 by default).
    ``tensor_split``: which feature dim a tensor axis splits, as ``on_out`` (None: neither, or both).

    Every float32 gather is turned bfloat16 by XLA:TPU's ``bfloat16-propagation`` when its users read it through
    a convert. A bitcast between the gather and the convolution stops it: then the kernel's convert is fused into
    the convolution behind the bitcast, and the gather stays float32. The layout change is a bitcast when

    * the gather lays its result out in 1-row tiles, the split dim major: its shard is not whole 8-row tiles,
      or the split dim is the lane dim of the shard's own layout (:func:`device_layout`) and not whole 128-lane
      tiles there (the gather transposes);
    * the convolution reads the kernel with the other feature dim minor, within one 128-lane tile, and the
      gathered dim is a multiple of 8 rows. In bfloat16 the convolution reads the kernel in the layout that
      pads it least (:func:`device_layout` of its bfloat16 ``(in, out)``, the output minor on a tie); in
      float32 with the dim a tensor axis splits minor, else the smaller feature dim, the output on a tie.

    Measured on v5e (benchmarks/tpu_aot_notes.md, forty-second round; benchmarks/results/tpu_conv_gathers.md:
    chains of 1x1 convolutions over float32 kernels, in float32 and in bfloat16, on fsdp=8, fsdp=4 and
    fsdp=2,model=4; every gather's bytes estimated exactly). In bfloat16 on fsdp=8: ``(128, 272)`` split on its
    output, ``(200, 128)``, ``(136, 128)``, ``(72, 72)`` and ``(32, 32)`` on their input gathered as float32;
    ``(272, 272)`` (the other dim wider than a tile), ``(200, 96)`` and ``(32, 48)`` (the split dim minor),
    ``(256, 64)`` (8-row shards) as bfloat16, and ``(96, 144)`` on its output as float32 (its 144 would pad to 256
    lanes: the 96 is minor). In float32 ``(32, 48)`` on its output and ``(200, 96)`` on its
    input gather as float32 (the smaller dim minor), and ``(12, 128)`` on its output too (16-row shards, but its
    ``(12, 16)`` shard has the 16 in the lanes); ``(16, 256)`` split in two on its output (fsdp=2 beside a
    model split of its input) as bfloat16 (its shard's 128 lanes are a whole tile); a ``(24, 160)`` kernel split
    on its input over fsdp=2 and on its output over model=4 as float32 (the model-split 40 is minor, though the
    24 is smaller).

    >>> [conv_kernel_gathered_as_stored(i, o, on, 8, True) for i, o, on in ((128, 272, True), (32, 32, False),
    ...                                                                     (272, 272, False), (32, 48, True))]
    [True, True, False, False]
    >>> [conv_kernel_gathered_as_stored(i, o, on, 8, False) for i, o, on in ((32, 48, True), (12, 128, True),
    ...                                                                      (48, 128, True), (256, 64, False))]
    [True, True, False, False]
    >>> [conv_kernel_gathered_as_stored(24, 40, False, 2, False, split) for split in (None, True)]
    [False, True]
    """
    split, other = (out_features, in_features) if on_out else (in_features, out_features)
    if split % SUBLANES or other > LANES:
        return False
    rows = split // devices  # the split dim's shard
    lanes = device_layout((in_features, rows) if on_out else (rows, out_features), 4)[0] == int(on_out)
    if rows % SUBLANES == 0 and not (lanes and rows % LANES):  # lanes: the split dim is the shard's lane dim
        return False  # gathered in whole tiles: the convolution's own layout, no bitcast
    if cast:  # the bfloat16 kernel's own layout
        in_minor = device_layout((in_features, out_features), 2)[0] == 0
    elif tensor_split is not None:
        in_minor = not tensor_split
    else:
        in_minor = in_features < out_features
    return in_minor == on_out


def scatters(shard: tuple[int, ...], split: tuple[int, ...], itemsize: int, grad_itemsize: int | None = None, *,
             devices: int) -> bool:
    """Whether XLA:TPU reduce-scatters a pinned fsdp gradient of this per-device ``shard`` on one ring
    (:func:`one_ring`) of ``devices``: its split dims are :func:`whole_tiles`, the shard is more than one row of
    tiles (one (8, 128) tile of float32: ``[8, 16]`` of a ``[64, 16]`` kernel, the ``[16, 8]`` of a
    ``(16, 64)`` bias split on its 64; the lanes up to 128 and the other dims' product up to 8) and
    its first dim is not 1 (a ``(1, 1, c, c')`` convolution kernel, ViT's ``[1, T, d]`` position
    table, a ``[1, d, d]`` kernel). Measured on v5e:2x4, float32 and bfloat16 (benchmarks/tpu_aot_notes.md,
    "Which gradients are all-reduced whole"): shards of 16 rows reduce-scatter, of 8 rows and one
    lane tile do not, in every kernel and bias read.

    >>> [scatters(s, (0,), 4, devices=8) for s in ((8, 16), (16, 16), (8, 4, 16))]
    [False, True, True]
    >>> scatters((1, 1, 32, 256), (2,), 4, devices=8), scatters((3, 3, 32, 256), (2,), 4, devices=8)
    (False, True)
    """
    if len(shard) < 2:
        return True
    if shard[0] == 1 or not whole_tiles(shard, split, itemsize, grad_itemsize, devices=devices):
        return False
    lane, _ = device_layout(tuple(shard), itemsize)
    return shard[lane] > LANES or math.prod(n for i, n in enumerate(shard) if i != lane) > SUBLANES
