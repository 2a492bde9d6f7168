"""probe(): what is on this machine, through NVML and package metadata.

No torch import and no CUDA context by default: NVML reads the GPUs, ``importlib.metadata``
reads the versions, torch's ``version.py`` is read as text. ``deep=True`` adds what needs
imports, from a subprocess with a timeout (see ``_deep.py``), so a broken torch, extension
or driver can neither crash nor hang the probe.

The NVML side sits behind :class:`NvmlBackend`; tests pass a fake one in.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

from .facts import ENV_VARS, GPU, PACKAGES, UNKNOWN, Facts, Link

GIB = 1024**3


class NvmlUnavailable(Exception):
    """NVML could not be used. ``kind``: no-library, driver-not-loaded, mismatch, error."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class RawDevice:
    """One GPU as NVML reports it (NVML order = PCI bus order)."""

    nvml_index: int
    uuid: str
    pci_bus_id: str
    name: str
    compute_capability: tuple[int, int]
    memory_total: int
    memory_free: int
    mig_mode: Any = UNKNOWN  # True / False / UNKNOWN
    processes: Any = UNKNOWN  # list of (pid, used bytes or None)
    clock_event_reasons: Any = UNKNOWN  # list of names
    ecc_uncorrected: Any = UNKNOWN  # int


@dataclass
class RawLink:
    nvlink_links: Any = UNKNOWN
    p2p: Any = UNKNOWN
    topology: Any = UNKNOWN


class NvmlBackend(Protocol):
    def init(self) -> None: ...
    def driver(self) -> dict[str, str]: ...
    def devices(self) -> list[RawDevice]: ...
    def link(self, a: int, b: int) -> RawLink: ...
    def shutdown(self) -> None: ...


# ---------------------------------------------------------------------------- the real NVML
_TOPOLOGY = {0: "same-board", 10: "single-switch", 20: "multiple-switches", 30: "host-bridge", 40: "numa-node", 50: "system"}
# Clock-event reasons that mean "slower than it could be" (idle and app-clock settings are not).
_REASONS = {
    "nvmlClocksEventReasonSwPowerCap": "sw-power-cap",
    "nvmlClocksEventReasonHwSlowdown": "hw-slowdown",
    "nvmlClocksEventReasonSyncBoost": "sync-boost",
    "nvmlClocksEventReasonSwThermalSlowdown": "sw-thermal-slowdown",
    "nvmlClocksEventReasonHwThermalSlowdown": "hw-thermal-slowdown",
    "nvmlClocksEventReasonHwPowerBrakeSlowdown": "hw-power-brake",
}


class PynvmlBackend:
    """NVML through nvidia-ml-py (module ``pynvml``). Imported lazily."""

    def __init__(self) -> None:
        self._nv: Any = None
        self._handles: list[Any] = []

    def init(self) -> None:
        try:
            import pynvml
        except ImportError as e:  # nvidia-ml-py is a dependency, but be honest if it is gone
            raise NvmlUnavailable("no-binding", f"nvidia-ml-py is not installed ({e})") from None
        self._nv = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError_LibraryNotFound:
            raise NvmlUnavailable("no-library", "libnvidia-ml.so (the NVIDIA driver's NVML library) was not found") from None
        except pynvml.NVMLError_DriverNotLoaded:
            raise NvmlUnavailable("driver-not-loaded", "the NVIDIA kernel driver is not loaded") from None
        except pynvml.NVMLError_LibRmVersionMismatch:
            raise NvmlUnavailable(
                "mismatch", "NVML library and kernel driver versions differ (driver upgraded without a reboot?)"
            ) from None
        except pynvml.NVMLError as e:
            raise NvmlUnavailable("error", f"nvmlInit failed: {e}") from None
        n = pynvml.nvmlDeviceGetCount()
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]

    def driver(self) -> dict[str, str]:
        nv = self._nv
        version = _text(nv.nvmlSystemGetDriverVersion())
        cuda = nv.nvmlSystemGetCudaDriverVersion()  # e.g. 13000
        return {"version": version, "cuda": f"{cuda // 1000}.{(cuda % 1000) // 10}"}

    def devices(self) -> list[RawDevice]:
        nv = self._nv
        out = []
        for i, h in enumerate(self._handles):
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            dev = RawDevice(
                nvml_index=i,
                uuid=_text(nv.nvmlDeviceGetUUID(h)),
                pci_bus_id=_text(nv.nvmlDeviceGetPciInfo(h).busId),
                name=_text(nv.nvmlDeviceGetName(h)),
                compute_capability=tuple(nv.nvmlDeviceGetCudaComputeCapability(h)),
                memory_total=int(mem.total),
                memory_free=int(mem.free),
            )
            dev.mig_mode = self._try(lambda: nv.nvmlDeviceGetMigMode(h)[0] == 1)
            dev.processes = self._try(
                lambda: [(p.pid, p.usedGpuMemory) for p in nv.nvmlDeviceGetComputeRunningProcesses(h)]
            )
            dev.clock_event_reasons = self._try(lambda: self._reasons(nv.nvmlDeviceGetCurrentClocksEventReasons(h)))
            dev.ecc_uncorrected = self._try(
                lambda: int(nv.nvmlDeviceGetTotalEccErrors(h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC))
            )
            out.append(dev)
        return out

    def link(self, a: int, b: int) -> RawLink:
        nv = self._nv
        ha, hb = self._handles[a], self._handles[b]
        link = RawLink()
        link.topology = self._try(lambda: _TOPOLOGY.get(nv.nvmlDeviceGetTopologyCommonAncestor(ha, hb), "unknown"))
        link.p2p = self._try(lambda: nv.nvmlDeviceGetP2PStatus(ha, hb, 0) == nv.NVML_P2P_STATUS_OK)  # 0: READ
        target = _text(nv.nvmlDeviceGetPciInfo(hb).busId).lower()

        def nvlinks() -> int:
            count = 0
            for n in range(nv.NVML_NVLINK_MAX_LINKS):
                try:
                    if nv.nvmlDeviceGetNvLinkState(ha, n) != nv.NVML_FEATURE_ENABLED:
                        continue
                    remote = _text(nv.nvmlDeviceGetNvLinkRemotePciInfo(ha, n).busId).lower()
                except nv.NVMLError:
                    continue
                # A link to an NVSwitch reaches every GPU on the switch.
                if remote == target or self._try(lambda: nv.nvmlDeviceGetNvLinkRemoteDeviceType(ha, n) == 1) is True:
                    count += 1
            return count

        link.nvlink_links = self._try(nvlinks)
        return link

    def shutdown(self) -> None:
        try:
            self._nv.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down a half-initialised NVML must not fail the probe
            pass

    def _reasons(self, mask: int) -> list[str]:
        return [name for attr, name in _REASONS.items() if mask & getattr(self._nv, attr, 0)]

    def _try(self, fn: Any) -> Any:
        try:
            return fn()
        except Exception:  # noqa: BLE001 - NVML raises NotSupported & co. per query and device
            return UNKNOWN


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


# ---------------------------------------------------------------------------- CUDA ordinals
def cuda_order(devices: Sequence[RawDevice], env: Mapping[str, str]) -> tuple[list[RawDevice], str]:
    """The devices CUDA will show, in CUDA ordinal order, and how that order was obtained.

    NVML numbers GPUs by PCI bus. CUDA, unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, puts the
    fastest first by an undocumented heuristic; we approximate it by compute capability and
    memory (ties by PCI bus), and say so. ``CUDA_VISIBLE_DEVICES`` then selects (by ordinal
    or UUID prefix) and reorders; CUDA stops at the first entry it cannot resolve.
    """
    by_bus = sorted(devices, key=lambda d: d.pci_bus_id.lower())
    order_env = env.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    if order_env == "PCI_BUS_ID":
        ordered, basis = by_bus, "pci-bus"
    else:
        ordered = sorted(by_bus, key=lambda d: (-d.compute_capability[0], -d.compute_capability[1], -d.memory_total))
        same_model = len({(d.name, d.compute_capability) for d in devices}) <= 1
        basis = "pci-bus" if same_model else "fastest-first-heuristic"
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return ordered, basis
    chosen: list[RawDevice] = []
    for entry in (e.strip() for e in visible.split(",")):
        dev = None
        if re.fullmatch(r"\d+", entry):
            k = int(entry)
            dev = ordered[k] if k < len(ordered) else None
        elif entry.startswith("GPU-") or re.fullmatch(r"[0-9a-fA-F-]{4,}", entry):
            key = entry if entry.startswith("GPU-") else "GPU-" + entry
            matches = [d for d in ordered if d.uuid.lower().startswith(key.lower())]
            dev = matches[0] if len(matches) == 1 else None
        if dev is None or dev in chosen:
            break  # CUDA ignores this entry and every one after it
        chosen.append(dev)
    return chosen, basis + "+visible-devices"


# ---------------------------------------------------------------------------- packages, host
def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def torch_cuda_version() -> Any:
    """The CUDA torch was built with, from ``torch/version.py`` read as text (no import)."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return UNKNOWN
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "version.py"
        if path.is_file():
            m = re.search(r"^cuda\s*(?::[^=]*)?=\s*(.+)$", path.read_text(errors="replace"), re.M)
            if not m:
                return UNKNOWN
            value = m.group(1).strip()
            return None if value == "None" else value.strip("'\"")
    return UNKNOWN


_CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def host_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "os": platform.system(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    cpuinfo = _read("/proc/cpuinfo")
    if cpuinfo:
        m = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        if m:
            info["cpu"] = m.group(1).strip()
        m = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
        if m:
            flags = set(m.group(1).split())
            info["cpu_flags"] = [f for f in _CPU_FLAGS if f in flags]
    if "cpu" not in info and platform.processor():
        info["cpu"] = platform.processor()
    meminfo = _read("/proc/meminfo")
    m = re.search(r"^MemTotal:\s*(\d+) kB", meminfo or "", re.M)
    if m:
        info["ram_gib"] = round(int(m.group(1)) * 1024 / GIB, 1)
    m = re.search(r"^MemAvailable:\s*(\d+) kB", meminfo or "", re.M)
    if m:
        info["ram_available_gib"] = round(int(m.group(1)) * 1024 / GIB, 1)
    info["nvidia_device_nodes"] = os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")
    return info


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


# ---------------------------------------------------------------------------- probe()
def probe(
    *,
    nvml: NvmlBackend | None = None,
    env: Mapping[str, str] | None = None,
    packages: Mapping[str, str | None] | None = None,
    host: Mapping[str, Any] | None = None,
    torch_cuda: Any = None,
    deep: bool = False,
    deep_timeout: float = 90.0,
) -> Facts:
    """Probe this machine. Every part can be passed in, so tests hand in a fake machine."""
    env = dict(os.environ if env is None else env)
    backend = nvml if nvml is not None else PynvmlBackend()
    gpus: Any = ()
    links: Any = ()
    driver: Any = UNKNOWN
    nvml_status: dict[str, Any] = {"status": "ok"}
    try:
        backend.init()
        try:
            driver = backend.driver()
            raw = backend.devices()
            visible, basis = cuda_order(raw, env)
            nvml_status["ordinal_basis"] = basis
            gpus = tuple(_gpu(i, d) for i, d in enumerate(visible))
            links = tuple(
                _link(i, j, backend.link(visible[i].nvml_index, visible[j].nvml_index))
                for i in range(len(visible))
                for j in range(i + 1, len(visible))
            )
        finally:
            backend.shutdown()
    except NvmlUnavailable as e:
        nvml_status = {"status": e.kind, "message": str(e)}
        # No NVML library on a machine without NVIDIA device nodes is simply "no GPU".
        gpus, links = ((), ()) if e.kind == "no-library" else (UNKNOWN, UNKNOWN)
    except Exception as e:  # noqa: BLE001 - NVML listed GPUs but failed on them: a broken install
        nvml_status = {"status": "error", "message": f"{type(e).__name__}: {e}"}
        gpus, links = UNKNOWN, UNKNOWN

    facts = Facts(
        source="probe",
        taken_at=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        gpus=gpus,
        links=links,
        driver=driver,
        packages=dict(package_versions() if packages is None else packages),
        torch_cuda=torch_cuda_version() if torch_cuda is None else torch_cuda,
        host=dict(host_info() if host is None else host),
        env={k: env.get(k) for k in ENV_VARS},
        nvml=nvml_status,
    )
    if deep:
        facts = facts.replace(deep=deep_probe(timeout=deep_timeout, env=env))
    return facts


def _gpu(index: int, d: RawDevice) -> GPU:
    others: Any = UNKNOWN
    others_gib: Any = UNKNOWN
    if d.processes is not UNKNOWN:
        others = len(d.processes)
        used = [u for _, u in d.processes if isinstance(u, int)]
        others_gib = round(sum(used) / GIB, 2)
    return GPU(
        index=index,
        uuid=d.uuid,
        pci_bus_id=d.pci_bus_id,
        name=d.name,
        compute_capability=f"{d.compute_capability[0]}.{d.compute_capability[1]}",
        memory_total_gib=round(d.memory_total / GIB, 2),
        memory_free_gib=round(d.memory_free / GIB, 2),
        mig_mode=d.mig_mode,
        nvml_index=d.nvml_index,
        other_processes=others,
        memory_used_by_others_gib=others_gib,
        clock_event_reasons=d.clock_event_reasons,
        ecc_uncorrected=d.ecc_uncorrected,
    )


def _link(a: int, b: int, raw: RawLink) -> Link:
    return Link(a=a, b=b, nvlink_links=raw.nvlink_links, p2p=raw.p2p, topology=raw.topology)


# ---------------------------------------------------------------------------- --deep
def deep_probe(*, timeout: float = 90.0, env: Mapping[str, str] | None = None, python: str | None = None) -> dict[str, Any]:
    """Run ``_deep.py`` in a fresh interpreter; whatever it does, return a dict, never raise."""
    script = Path(__file__).with_name("_deep.py")
    try:
        proc = subprocess.run(
            [python or sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(os.environ if env is None else env),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "message": f"the deep probe did not finish in {timeout:.0f} s (a hung driver or import?)"}
    except OSError as e:
        return {"status": "error", "message": f"could not start {python or sys.executable}: {e}"}
    last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    if proc.returncode != 0 or not last:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"status": "crashed", "returncode": proc.returncode, "message": " | ".join(tail)[-500:]}
    try:
        data = json.loads(last[0])
    except json.JSONDecodeError:
        return {"status": "error", "message": "the deep probe printed no result"}
    data["status"] = "ok"
    return data
