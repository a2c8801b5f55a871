"""Build script for mskd-fast.

Metadata lives in ``pyproject.toml``; this file only adds what PEP 621 cannot express:

* the torch extension ``mskd_fast._C`` compiled from ``csrc/`` (CPU kernels always; CUDA kernels
  when ``nvcc`` is found through ``CUDA_HOME`` or ``PATH``; ``MSKD_FAST_BUILD_CUDA=0/1`` forces
  the choice, and ``1`` without nvcc is an error);
* the mapping of the top-level ``kernels/`` folder onto the package ``mskd_fast.kernels``.

Build without isolation so the extension is compiled against the torch already installed:
``pip install --no-build-isolation -e .``.
"""

from __future__ import annotations

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
        return "/usr/local/cuda/bin/nvcc"
    return None


def _want_cuda() -> bool:
    flag = os.environ.get("MSKD_FAST_BUILD_CUDA", "").strip()
    nvcc = _find_nvcc()
    if flag == "0":
        return False
    if flag == "1":
        if nvcc is None:
            raise RuntimeError("MSKD_FAST_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True
    if flag not in ("",):
        raise RuntimeError(f"MSKD_FAST_BUILD_CUDA must be 0 or 1, got {flag!r}")
    return nvcc is not None


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
    cpp_sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cuda_sources = rel("csrc/cuda/*.cu")
    if not cpp_sources:
        raise RuntimeError("csrc/ holds no C++ sources: the checkout is incomplete")
    cxx_flags = ["-O3"]  # the C++ standard comes from torch (C++17 or C++20 depending on its version)
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return [
            CUDAExtension(
                "mskd_fast._C",
                cpp_sources + cuda_sources,
                extra_compile_args={"cxx": cxx_flags + ["-DMSKD_WITH_CUDA"], "nvcc": nvcc_flags + ["-DMSKD_WITH_CUDA"]},
            )
        ]
    return [CppExtension("mskd_fast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags})]


def _build_ext_cls():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None or _has_ninja_module())


def _has_ninja_module() -> bool:
    try:
        import ninja  # noqa: F401
    except ImportError:
        return False
    return True


packages = find_packages(include=["mskd_fast", "mskd_fast.*"]) + ["mskd_fast.kernels"]

setup(
    packages=packages,
    package_dir={"mskd_fast.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext_cls()},
    include_package_data=False,
    zip_safe=False,
)
