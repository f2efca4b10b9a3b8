"""Fake CUDA on a CPU-only torch build, for the dry run (runtime/dry_run.py) and nothing else.

`FakeTensorMode` creates `cuda` tensors without a GPU, but on a CPU-only build the first
autograd edge of such a tensor aborts the process: autograd asks the CUDA device guard for
the tensor's stream, and a CPU build registers no CUDA guard (torch >= 2.10 only installs its
no-op guard on CUDA builds without devices). Two stand-ins make the CUDA path traceable:

1. C++ (a 20-line shared library compiled once with the system C++ compiler against this
   torch's headers, cached under ~/.cache/gptoss-runtime): torch's own `FakeGuardImpl`
   registered as the CUDA device guard, and CUDA hooks that report CUDA as built and present
   (device 0, a primary context) so that autograd's stream bookkeeping finds an accelerator.
   The hooks are read once when torch is first imported: `install()` must run BEFORE
   `import torch` (runtime.plan imports torch only after it).
2. Python: the `torch.cuda` calls FSDP2 makes (current_device, Stream, Event, stream,
   current_stream, synchronize) become no-ops, and autocast accepts device_type "cuda".

`torch.cuda.is_available()` stays False, so FakeTensorMode keeps avoiding real device work.
No kernel ever runs: every tensor is a FakeTensor (shapes, dtypes, devices; no data).
On a CUDA build (the GPU machine) nothing is installed: torch's own guard and hooks serve.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_SOURCE = r"""
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/FakeGuardImpl.h>

namespace {
c10::impl::FakeGuardImpl<c10::DeviceType::CUDA> fake_cuda_guard;
c10::impl::DeviceGuardImplRegistrar guard_registrar(c10::DeviceType::CUDA, &fake_cuda_guard);

struct FakeCUDAHooks : at::CUDAHooksInterface {
  explicit FakeCUDAHooks(at::CUDAHooksArgs) {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  void init() const override {}
  c10::DeviceIndex deviceCount() const override { return 1; }
  void setCurrentDevice(c10::DeviceIndex) const override {}
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  c10::DeviceIndex exchangeDevice(c10::DeviceIndex) const override { return 0; }
  c10::DeviceIndex maybeExchangeDevice(c10::DeviceIndex) const override { return 0; }
};
}  // namespace

namespace at {
C10_REGISTER_TYPED_CLASS(CUDAHooksRegistry, "CUDAHooks", FakeCUDAHooks)
}
"""

_installed = False


class FakeCudaError(RuntimeError):
    """The fake CUDA runtime cannot be set up (no compiler, torch already imported, ...)."""


def _torch_dir() -> Path:
    spec = importlib.util.find_spec("torch")  # without importing it
    if spec is None or spec.origin is None:
        raise FakeCudaError("torch is not installed")
    return Path(spec.origin).parent


def needed() -> bool:
    """A CPU-only torch build (no libtorch_cuda): the stand-ins are needed."""
    return not any((_torch_dir() / "lib").glob("libtorch_cuda*.so*"))


def _torch_version(torch_dir: Path) -> str:
    text = (torch_dir / "version.py").read_text()
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("'\"")
    return "unknown"


def _build(torch_dir: Path) -> Path:
    """The compiled library for this torch (built once, then reused from the cache)."""
    key = hashlib.sha256(f"{_torch_version(torch_dir)}|{torch_dir}|{_SOURCE}".encode()).hexdigest()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptoss-runtime"
    lib = cache / f"fake_cuda_{key[:16]}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    abi = "1"  # every torch wheel since 2.7 uses the C++11 ABI (torch can't be imported yet)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src, out = Path(tmp) / "fake_cuda.cpp", Path(tmp) / "fake_cuda.so"
        src.write_text(_SOURCE)
        cmd = [os.environ.get("CXX", "c++"), "-std=c++17", "-O1", "-shared", "-fPIC",
               f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{torch_dir / 'include'}", str(src),
               "-o", str(out), f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu",
               f"-Wl,-rpath,{torch_dir / 'lib'}"]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise FakeCudaError(f"cannot compile the fake CUDA shim ({e}); a C++ compiler "
                                "(g++) is needed for the dry run on a CPU-only torch") from e
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["?"])[-1]
            raise FakeCudaError(f"compiling the fake CUDA shim failed: {last}")
        os.replace(out, lib)  # atomic: a concurrent build never loads a half-written file
    return lib


def install() -> None:
    """Set up fake CUDA for this process (idempotent; a no-op on a CUDA build). Must run
    before torch is imported."""
    global _installed
    if _installed or not needed():
        _installed = True
        return
    if "torch" in sys.modules:
        raise FakeCudaError("runtime.fake_cuda.install() must run before torch is imported")
    torch_dir = _torch_dir()
    # Loading the shim loads libc10/libtorch_cpu first; its static registrations then
    # run before torch's Python import reads the CUDA hooks.
    ctypes.CDLL(str(_build(torch_dir)), mode=ctypes.RTLD_GLOBAL)
    _install_python_stubs()
    _installed = True


class _Stream:
    """A CUDA stream that orders nothing (no kernel ever runs under fake tensors)."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event if event is not None else _Event()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _Event:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        return self

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


def _install_python_stubs() -> None:
    import torch
    import torch.cuda.amp.common as amp_common

    default = _Stream()
    cuda = torch.cuda
    cuda.is_bf16_supported = lambda *args, **kwargs: True
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = lambda device: None
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = lambda device=None: default
    cuda.default_stream = lambda device=None: default
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.synchronize = lambda device=None: None
    # autocast("cuda") would disable itself with a warning on a build without CUDA
    amp_common.amp_definitely_not_available = lambda: False
