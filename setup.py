"""Build script: the pure-Python package plus, where nvcc exists, the CUDA extension.

The extension `perceiver_kernels._C` is built by CMake (Ninja generator) from csrc/.
It needs no torch headers: it takes raw device pointers, sizes, strides and a stream
from Python, so one build works with any installed torch (CPU builds included).

Environment switches:
  PERCEIVER_KERNELS_SKIP_CUDA=1    do not build the extension
  PERCEIVER_KERNELS_FORCE_CUDA=1   a failed (or impossible) build is an error
  PERCEIVER_KERNELS_CUDA_ARCHS     CMake architecture list, default "80;90a",
                                   limited to what the found nvcc supports
  PERCEIVER_KERNELS_BUILD_TYPE     CMake build type, default Release
  MAX_JOBS                         parallel compile jobs
  CUDA_HOME / CUDA_PATH            where to look for nvcc before PATH
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;90a"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _say(message: str) -> None:
    print(f"perceiver-kernels: {message}", file=sys.stderr, flush=True)


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def supported_archs(nvcc: str) -> set[str]:
    """Base architectures this nvcc can compile for ("80", "90", ...).

    nvcc lists only base architectures; the arch-specific variants ("90a", "100a")
    are available wherever their base is.
    """
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, check=True)
    return set(re.findall(r"compute_(\d+)", listed.stdout))


def requested_archs(nvcc: str) -> str:
    wanted = [a.strip() for a in os.environ.get("PERCEIVER_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS).split(";") if a.strip()]
    available = supported_archs(nvcc)
    kept = [a for a in wanted if a.rstrip("af") in available]
    dropped = [a for a in wanted if a not in kept]
    if dropped:
        _say(f"nvcc at {nvcc} does not support architectures {dropped}; building for {kept}")
    if not kept:
        raise RuntimeError(f"none of the requested CUDA architectures {wanted} is supported by {nvcc}")
    return ";".join(kept)


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    """Builds CMakeExtensions; a failure is fatal only with PERCEIVER_KERNELS_FORCE_CUDA."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        try:
            self._build_with_cmake(ext)
        except Exception as error:  # a missing CUDA backend must not block the install
            if _flag("PERCEIVER_KERNELS_FORCE_CUDA"):
                raise
            _say(f"the CUDA backend was NOT built ({error}); the triton and torch backends are unaffected")

    def _build_with_cmake(self, ext: CMakeExtension) -> None:
        import pybind11

        nvcc = find_nvcc()
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        config = [
            "cmake", str(ext.source_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('PERCEIVER_KERNELS_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={requested_archs(nvcc)}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
        ]
        build = ["cmake", "--build", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            build += ["-j", os.environ["MAX_JOBS"]]
        subprocess.run(config, cwd=build_dir, check=True)
        subprocess.run(build, cwd=build_dir, check=True)
        _say(f"built the CUDA backend into {out_dir}")


def extensions() -> list[Extension]:
    if _flag("PERCEIVER_KERNELS_SKIP_CUDA"):
        _say("PERCEIVER_KERNELS_SKIP_CUDA is set: the CUDA backend is not built")
        return []
    if find_nvcc() is None:
        if _flag("PERCEIVER_KERNELS_FORCE_CUDA"):
            raise RuntimeError("PERCEIVER_KERNELS_FORCE_CUDA is set but nvcc was not found (set CUDA_HOME)")
        _say("nvcc not found: the CUDA backend is not built; the triton and torch backends are unaffected")
        return []
    return [CMakeExtension("perceiver_kernels._C", ROOT)]


setup(ext_modules=extensions(), cmdclass={"build_ext": CMakeBuild})
