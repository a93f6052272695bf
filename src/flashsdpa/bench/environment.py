"""What a benchmark ran on: device, driver, library versions, date (quoted by BENCHMARKS.md)."""

from __future__ import annotations

import datetime
import platform
import shutil
import subprocess
from pathlib import Path

import torch


def _run(command: list[str], timeout: float = 10.0) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def driver_version() -> str | None:
    """The NVIDIA driver, from nvidia-smi or NVML (torch does not report it)."""
    if shutil.which("nvidia-smi"):
        line = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        if line:
            return line.splitlines()[0].strip()
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return None


def cudnn_version() -> str | None:
    if not torch.backends.cudnn.is_available():
        return None
    number = torch.backends.cudnn.version()  # e.g. 91900
    if not number:
        return None
    major, rest = divmod(number, 10000)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


def git_commit() -> str | None:
    """The flashsdpa source's commit, when it runs from a git checkout."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    commit = _run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    return f"{commit}{'+dirty' if dirty else ''}" if commit else None


def collect(device: torch.device) -> dict:
    import flashsdpa

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flashsdpa": flashsdpa.__version__,
        "git_commit": git_commit(),
        "platform": platform.platform(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=props.name,
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            sm_count=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
            driver=driver_version(),
            cuda=torch.version.cuda,
            cudnn=cudnn_version(),
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    else:
        info.update(cpu_threads=torch.get_num_threads())
    return info


def headline(info: dict) -> str:
    """One line for the table header."""
    parts = [info.get("device_name") or info["device"]]
    for key, label in (("driver", "driver"), ("cuda", "CUDA"), ("cudnn", "cuDNN")):
        if info.get(key):
            parts.append(f"{label} {info[key]}")
    parts.append(f"torch {info['torch']}")
    if info.get("triton"):
        parts.append(f"triton {info['triton']}")
    parts.append(f"flashsdpa {info['flashsdpa']}" + (f" ({info['git_commit']})" if info.get("git_commit") else ""))
    parts.append(info["date"])
    return ", ".join(parts)
