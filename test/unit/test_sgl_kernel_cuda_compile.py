"""sgl_kernel_cuda builds where nvcc is, GPU or not: each kernel file compiles for sm_90a, the torch
binding compiles against torch's headers, and the objects link into a library that loads into
this (CPU) torch, registering the CPU ops' schemas, with Python wrappers and fake
implementations that lmprog's layers reach for CUDA tensors. Running the kernels is
test/gpu/test_cuda_ops.py's job.

The build settings (arch flags, toolkit discovery) are checked here too. About 30 s on 2 cores,
mostly the binding (torch's headers); skipped without nvcc.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.utils import cpp_extension

NVCC = shutil.which("nvcc")
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit)")

ROOT = Path(__file__).resolve().parents[2]
OPS = ("rmsnorm", "fused_add_rmsnorm", "silu_and_mul", "rope_kv_store")


def load_build_config() -> ModuleType:
    """sgl_kernel_cuda/_build.py by path (as setup.py does): importing the package loads ops."""
    path = ROOT / "sgl-kernel" / "python" / "sgl_kernel_cuda" / "_build.py"
    spec = importlib.util.spec_from_file_location("sgl_kernel_cuda_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load_build_config()


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sgl_kernel_cuda")


_objects: dict[str, Path] = {}


def compile_object(src: Path, out_dir: Path) -> Path:
    """src compiled (once per run) as the extension build compiles it, for sm_90a."""
    if src.name not in _objects:
        obj = out_dir / f"{src.name}.o"
        if src.suffix == ".cu":
            # torch's own nvcc flags (no implicit half/bfloat16 conversions, ...) plus ours.
            flags = [*cpp_extension.COMMON_NVCC_FLAGS, "-std=c++17", "-O3", "-Xcompiler", "-fPIC"]
            arch = "-gencode=arch=compute_90a,code=sm_90a"
            run([NVCC, *flags, arch, "-c", str(src), "-o", str(obj)])
        else:
            # The binding is plain C++ over torch's headers and the CUDA runtime's; C++20 as
            # recent torch builds its extensions (torch 2.11 uses C++17, which this code is too).
            home = build.cuda_home()
            assert home is not None, "nvcc is on PATH but no toolkit headers were found"
            includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{home / 'include'}"]
            run([CXX, "-std=c++20", "-O0", "-fPIC", *includes, "-c", str(src), "-o", str(obj)])
        _objects[src.name] = obj
    return _objects[src.name]


# ---- compiling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("src", build.kernel_sources(), ids=lambda p: p.name)
def test_each_kernel_file_compiles_for_sm90a(src: Path, out_dir: Path) -> None:
    assert compile_object(src, out_dir).stat().st_size > 0


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
def test_the_torch_binding_compiles_against_torch_headers(out_dir: Path) -> None:
    assert compile_object(build.CSRC / "ops.cpp", out_dir).stat().st_size > 0


# ---- linking and loading -----------------------------------------------------------------------
PROBE = """
import json, sys, torch
torch.ops.load_library(sys.argv[1])
import sgl_kernel_cuda
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from lmprog.runtime.layers.activation import SiluAndMul
from lmprog.runtime.layers.kernels import kernels_for
from lmprog.runtime.layers.layernorm import RMSNorm

class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

def meta(t):
    return [list(t.shape), str(t.dtype), t.device.type]

out = {"source": sgl_kernel_cuda.source, "schemas": {}, "fakes": {}}
for name in sys.argv[2:]:
    out["schemas"][name] = str(getattr(torch.ops.sgl_kernel_cuda, name).default._schema)
norm = RMSNorm(4096, 1e-6, torch.bfloat16)
log = OpLog()
# Fake CUDA tensors: shapes, dtypes and devices without a GPU.
with FakeTensorMode():
    bf16 = {"dtype": torch.bfloat16, "device": "cuda"}
    x, r = torch.empty(5, 4096, **bf16), torch.empty(5, 4096, **bf16)
    w = torch.empty(4096, **bf16)
    f = out["fakes"]
    f["rmsnorm"] = meta(sgl_kernel_cuda.rmsnorm(x, w, 1e-6))
    f["fused_add_rmsnorm"] = sgl_kernel_cuda.fused_add_rmsnorm(x, r, w, 1e-6)
    f["silu_and_mul"] = meta(sgl_kernel_cuda.silu_and_mul(torch.empty(2, 3, 200, **bf16)))
    qkv = torch.empty(7, (32 + 2 * 8) * 128, **bf16)
    cs = torch.empty(7, 64, dtype=torch.float32, device="cuda")
    loc = torch.empty(7, dtype=torch.int64, device="cuda")
    k_buf, v_buf = torch.empty(50, 8, 128, **bf16), torch.empty(50, 8, 128, **bf16)
    q, k = sgl_kernel_cuda.rope_kv_store(qkv, cs, cs, loc, k_buf, v_buf, 32, 8)
    f["rope_kv_store"] = [meta(q), meta(k)]
    picked = {}
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.int32):
        module = kernels_for(torch.empty(2, 8, dtype=dt, device="cuda"))
        picked[str(dt)] = getattr(module, "__name__", None)
    out["picked"] = picked
    # Only the kernels' path: this torch cannot run its own ops on fake CUDA tensors.
    if picked["torch.bfloat16"] is not None:
        norm.weight = torch.nn.Parameter(torch.ones(4096, **bf16), requires_grad=False)
        gate_up = torch.empty(5, 2 * 4096, **bf16)
        with log:
            norm(x)
            norm(x, r)
            SiluAndMul()(gate_up)
out["layer_ops"] = log.names
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def library(out_dir: Path) -> Path:
    """The extension linked from the compiled objects, as setup.py's CUDAExtension links it."""
    if CXX is None:
        pytest.skip("needs a C++ compiler")
    objects = [compile_object(src, out_dir) for src in build.sources()]
    home = build.cuda_home()
    cudart = next((home / d for d in ("lib64", "lib") if (home / d).is_dir()), home / "lib64")
    torch_lib = Path(torch.__file__).parent / "lib"
    so = out_dir / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    link = [CXX, "-shared", *map(str, objects), f"-L{cudart}", f"-Wl,-rpath,{cudart}", "-lcudart"]
    run([*link, f"-L{torch_lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-o", str(so)])
    return so


def probe(library: Path, **env: str) -> dict:
    """What PROBE reports from a fresh process that loaded `library` (this process keeps no
    trace of it)."""
    paths = [ROOT / "python", ROOT / "sgl-kernel" / "python"]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths)), **env}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(library), *OPS],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probed(library: Path) -> dict:
    return probe(library)


def test_the_library_registers_the_cpu_ops_schemas(probed: dict) -> None:
    assert probed["source"] == "registered before import"
    pytest.importorskip("sgl_kernel", reason="the CPU ops' schemas come from it")
    for name in OPS:
        cpu = str(getattr(torch.ops.sgl_kernel, name).default._schema)
        assert probed["schemas"][name] == cpu.replace("sgl_kernel::", "sgl_kernel_cuda::", 1)


def test_the_fakes_give_the_ops_output_shapes_on_cuda(probed: dict) -> None:
    fakes = probed["fakes"]
    assert fakes["rmsnorm"] == [[5, 4096], "torch.bfloat16", "cuda"]
    assert fakes["fused_add_rmsnorm"] is None
    assert fakes["silu_and_mul"] == [[2, 3, 100], "torch.bfloat16", "cuda"]
    assert fakes["rope_kv_store"] == [
        [[7, 32, 128], "torch.bfloat16", "cuda"],
        [[7, 8, 128], "torch.bfloat16", "cuda"],
    ]


def test_lmprog_layers_call_the_cuda_ops_for_cuda_tensors(library: Path, probed: dict) -> None:
    assert probed["picked"] == {
        "torch.float32": "sgl_kernel_cuda",
        "torch.float16": "sgl_kernel_cuda",
        "torch.bfloat16": "sgl_kernel_cuda",
        "torch.int32": None,
    }
    assert probed["layer_ops"] == [
        "sgl_kernel_cuda.rmsnorm",
        "sgl_kernel_cuda.fused_add_rmsnorm",
        "sgl_kernel_cuda.silu_and_mul",
    ]
    off = probe(library, LMPROG_CUDA_OPS="0")
    assert set(off["picked"].values()) == {None}


# ---- build settings ----------------------------------------------------------------------------
def test_arch_flags_default_to_sm90a_and_follow_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(build.ARCH_ENV, raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert build.arch_flags() == ["-gencode=arch=compute_90a,code=sm_90a"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert build.arch_flags() == []  # torch's flags from its list
    monkeypatch.setenv(build.ARCH_ENV, "9.0a;100a")
    assert build.arch_flags() == [
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_100a,code=sm_100a",
    ]
    monkeypatch.setenv(build.ARCH_ENV, "hopper")
    with pytest.raises(ValueError, match="not an arch"):
        build.arch_flags()


def test_the_toolkit_is_found_behind_nvcc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    home = build.cuda_home()
    assert home is not None and (home / "include" / "cuda_runtime_api.h").is_file()
    assert (home / "bin" / "nvcc").is_file()
