"""Build remoe_engine._C: C++ kernels always, CUDA kernels when nvcc and a CUDA torch exist.

Environment:
  REMOE_BUILD_CUDA      auto (default) | 1 | 0. `auto` compiles the .cu files whenever nvcc and a
                        CUDA build of torch are present, whether or not a GPU is visible; `0`
                        builds the C++ kernels only; `1` fails clearly when CUDA can't be built.
  TORCH_CUDA_ARCH_LIST  GPU architectures. Default: the visible GPUs' own (e.g. "8.6"), else
                        "8.0;9.0+PTX": Ampere and Hopper binaries, and PTX that newer GPUs
                        (Blackwell) compile at load time.
  MAX_JOBS              parallel compile jobs (read by ninja through torch's BuildExtension).
  NVCC_THREADS          threads per nvcc invocation (default 2).
  REMOE_DEBUG           1 builds with -O0 -g (and nvcc -G). The default release build carries no
                        debug info (-g0, linked with --strip-debug): Python's own CFLAGS add -g,
                        which made DWARF about 96% of the .so.

pip hides the compiler's output: `pip install -v ...` shows what is being built and ninja's
[n/N] progress.

The extension registers its ops with TORCH_LIBRARY and exposes no Python bindings of its own, so it
must be built against the torch it runs with: install torch first, then
`pip install --no-build-isolation .`.
"""

import glob
import os
import shutil
import sys
import time

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _fail(message: str) -> None:
    sys.stderr.write(f"\nremoe-engine build error: {message}\n\n")
    raise SystemExit(1)


def _find_cuda_home() -> str | None:
    """The CUDA toolkit root, for torch's build helpers.

    torch guesses CUDA_HOME as the parent of the `nvcc` on PATH, which is wrong when that nvcc is
    a wrapper script (as on machines where /usr/local/bin/nvcc execs the real toolkit's nvcc):
    the link then fails with "cannot find -lcudart". Prefer a directory that really holds the
    toolkit's headers.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(root, "bin", "nvcc")
        ):
            return root
    return None


if _find_cuda_home() is not None:
    os.environ.setdefault("CUDA_HOME", _find_cuda_home())

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    _fail(
        "torch is not installed in this environment. Install it first, then build without "
        "isolation so the extension matches it:\n"
        "    pip install torch setuptools wheel ninja\n"
        "    pip install --no-build-isolation ."
    )


# What the build will do, printed once when it starts (setup.py itself runs several times per pip
# install, so not at import).
_PLAN: list[str] = []


def _want_cuda() -> bool:
    mode = os.environ.get("REMOE_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        _fail(f"REMOE_BUILD_CUDA must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        return False
    nvcc = None
    if CUDA_HOME is not None:
        candidate = os.path.join(CUDA_HOME, "bin", "nvcc")
        nvcc = candidate if os.path.exists(candidate) else None
    nvcc = nvcc or shutil.which("nvcc")
    torch_has_cuda = torch.version.cuda is not None
    if nvcc and torch_has_cuda:
        return True
    reason = []
    if not nvcc:
        reason.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if not torch_has_cuda:
        reason.append(f"torch {torch.__version__} is a CPU-only build")
    if mode == "1":
        _fail("REMOE_BUILD_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reason))
    _PLAN.append("building C++ kernels only: " + "; ".join(reason))
    return False


def _default_arch_list() -> str:
    """The visible GPUs' compute capabilities ("8.6;9.0"), or "8.0;9.0+PTX" when none is."""
    try:
        import torch

        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i)
                           for i in range(torch.cuda.device_count())})
            return ";".join(f"{major}.{minor}" for major, minor in caps)
    except Exception:  # a broken driver must not break a build that needs no GPU
        pass
    return "8.0;9.0+PTX"


# Build times measured on a 2-core VM with MAX_JOBS=2; shown so a silent wait has a known length.
_EXPECTED_TIME = {"cpp": "about 1 minute on 2 cores",
                  "cuda": "3 to 5 minutes on 2 cores for the default two architectures"}


def _extension():
    build_cuda = _want_cuda()
    debug = os.environ.get("REMOE_DEBUG", "0") == "1"
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    # -g0 overrides the -g in Python's CFLAGS, which torch's build passes to every C++ compile.
    opt = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    extra_link_args = [] if debug else ["-Wl,--strip-debug"]  # any debug info left in an object
    # -fno-trapping-math: nothing here reads FP exception flags, and without it GCC will not
    # if-convert (and so not vectorize) loops with float selects, such as the routing exp.
    extra_compile_args = {"cxx": [*opt, "-fvisibility=hidden", "-fno-trapping-math",
                                  "-fdiagnostics-color=always"]}
    # Py_LIMITED_API lets one wheel serve every CPython >= 3.10: the module only registers ops.
    define_macros = [("Py_LIMITED_API", "0x030A0000")]
    if build_cuda:
        # Without an explicit list torch compiles for every known architecture when no GPU is
        # visible, which takes many minutes. A binary for one architecture alone fails on any
        # other GPU with "no kernel image", so the default is the GPUs of this machine, or
        # Ampere + Hopper with PTX for newer ones.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list())
        nvcc_threads = os.environ.get("NVCC_THREADS", "2")
        extra_compile_args["nvcc"] = [
            # -lineinfo maps device code to source lines for profilers; it is not DWARF.
            *(["-O0", "-g", "-G"] if debug else ["-O3", "-Xcompiler=-g0", "-lineinfo"]),
            "--threads",
            nvcc_threads,
        ]
        # Every .cu file must compile: a broken kernel fails the build (and CI).
        _PLAN.append(f"compiling {len(cpp_sources)} C++ and {len(cu_sources)} CUDA files for "
                     f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
                     f"(NVCC_THREADS={nvcc_threads}); usually {_EXPECTED_TIME['cuda']}")
    else:
        _PLAN.append(f"compiling {len(cpp_sources)} C++ files, no CUDA kernels; usually "
                     f"{_EXPECTED_TIME['cpp']}")
    jobs = os.environ.get("MAX_JOBS", "unset (ninja's default)")
    _PLAN.append(("debug build (REMOE_DEBUG=1): -O0 -g" if debug else
                  "release build: -O3, no debug info (REMOE_DEBUG=1 for a debug build)")
                 + f"; MAX_JOBS={jobs}")
    if build_cuda:
        return CUDAExtension(
            "remoe_engine._C",
            cpp_sources + cu_sources,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
            define_macros=define_macros,
            py_limited_api=True,
        )
    return CppExtension(
        "remoe_engine._C",
        cpp_sources,
        extra_compile_args={"cxx": extra_compile_args["cxx"]},
        extra_link_args=extra_link_args,
        define_macros=define_macros,
        py_limited_api=True,
    )


class _Build(BuildExtension):
    """torch's build, with a line saying what it builds before the long silent part, and the
    time it took after."""

    def run(self) -> None:
        for line in _PLAN:
            print(f"remoe-engine: {line}", flush=True)
        start = time.monotonic()
        super().run()
        print(f"remoe-engine: built remoe_engine._C in {time.monotonic() - start:.0f} s",
              flush=True)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": _Build},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
