"""Build script of ``ops_dscn``, the DSCN (deformable strip convolution) operator.

    cd ops_dscn && python setup.py install          # the original command
    pip install --no-build-isolation ./ops_dscn     # or this (torch must already be installed)
    pip install --no-build-isolation --use-pep517 -e ./ops_dscn    # editable (`setup.py develop` cannot see torch)

The C++ CPU kernel is always built. The CUDA kernel is built too when a GPU is visible or ``FORCE_CUDA=1`` is set
(``TORCH_CUDA_ARCH_LIST`` picks the architectures); ``FORCE_CUDA=0`` builds the CPU kernel only.
"""

import glob
import os
import sys
import sysconfig

from setuptools import find_packages, setup


def no_torch_message(exc: ImportError) -> str:
    """The one-line error for a build environment without torch, naming the commands that do see it.

    Without `--use-pep517`, pip 23 runs `pip install -e` of this project as `setup.py develop`, and setuptools >= 80
    runs that as an isolated PEP 517 build, which sees no torch whatever the surrounding environment holds; asking pip
    for the PEP 517 editable build itself keeps `--no-build-isolation` in force.
    """
    return (f"ops_dscn: building needs PyTorch importable in the build environment; got {type(exc).__name__}: {exc}. "
            "Install torch first, then build without build isolation: `pip install --no-build-isolation ./ops_dscn` "
            "or `cd ops_dscn && python setup.py install`; for an editable install use `pip install "
            "--no-build-isolation --use-pep517 -e ./ops_dscn` (not `python setup.py develop` or `pip install -e` "
            "without `--use-pep517`: they build in an isolated environment without torch), or `python setup.py "
            "build_ext --inplace`.")


try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - depends on the build environment
    sys.exit(no_torch_message(exc))

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
# Every header the sources include: setuptools rebuilds the extension only when one of `sources` or `depends` is newer
# than it, so a header edit alone would otherwise leave a stale _C in place.
HEADERS = sorted(os.path.join(CSRC, h) for h in glob.glob("**/*.h", root_dir=os.path.join(HERE, CSRC), recursive=True))


def _want_cuda() -> bool:
    force = os.environ.get("FORCE_CUDA")
    if force is not None and force not in ("0", "1"):
        sys.exit(f"ops_dscn: FORCE_CUDA must be 0 or 1; got {force!r}")
    if force == "0":
        return False
    if force == "1" or torch.cuda.is_available():
        if CUDA_HOME is None:
            sys.exit("ops_dscn: a CUDA build was requested but no CUDA toolkit was found; set CUDA_HOME.")
        return True
    return False


def _cuda_pip_include_dirs() -> list[str]:
    """Header folders of the NVIDIA pip packages torch depends on (cuBLAS, cuSPARSE, ... for ATen's CUDA headers).

    A bare CUDA toolkit may lack some of the library headers that ATen's CUDA headers include; torch's own pip
    dependencies ship them under site-packages/nvidia/*/include.
    """
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    roots.update(p for p in sys.path if p.endswith("site-packages"))
    found = []
    for root in sorted(roots):
        found.extend(sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))))
    return list(dict.fromkeys(found))


def _openmp_flags() -> list[str]:
    """["-fopenmp"] where the C++ compiler builds an OpenMP program, else [] with a warning (Apple clang, a clang
    without libomp's headers): the kernels then run on one thread. DSCN_OPENMP=0 / 1 skips the probe."""
    choice = os.environ.get("DSCN_OPENMP", "").strip()
    if choice in ("0", "1"):
        return ["-fopenmp"] if choice == "1" else []
    import tempfile

    from setuptools._distutils.ccompiler import new_compiler
    from setuptools._distutils.sysconfig import customize_compiler

    compiler = new_compiler()
    customize_compiler(compiler)
    if os.environ.get("CXX"):  # BuildExtension compiles C++ with CXX; probe the same compiler
        compiler.set_executable("compiler_so", [os.environ["CXX"], "-fPIC"])
    with tempfile.TemporaryDirectory() as tmp:
        probe = os.path.join(tmp, "openmp_probe.cpp")
        with open(probe, "w") as f:
            f.write("#include <omp.h>\nint probe() { return omp_get_max_threads(); }\n")
        try:
            compiler.compile([probe], output_dir=tmp, extra_postargs=["-fopenmp"])
        except Exception as exc:  # CompileError, or no compiler at all: the real build reports that one
            print(f"ops_dscn: WARNING: the C++ compiler cannot build OpenMP code ({type(exc).__name__}); building "
                  "without -fopenmp, so the CPU kernels will run on ONE thread. Install the compiler's OpenMP "
                  "support (e.g. libomp-dev for clang, `brew install libomp` on macOS) or build with GCC; "
                  "DSCN_OPENMP=1 forces the flag.")
            return []
    return ["-fopenmp"]


def _extensions():
    sources = [os.path.join(CSRC, "dscn.cpp"), os.path.join(CSRC, "cpu", "dscn_cpu.cpp"),
               os.path.join(CSRC, "cpu", "conv_mlp_cpu.cpp"), os.path.join(CSRC, "cpu", "strip_offsets_cpu.cpp"),
               os.path.join(CSRC, "cpu", "dw_conv_cpu.cpp"), os.path.join(CSRC, "cpu", "pointwise_cpu.cpp"),
               os.path.join(CSRC, "cpu", "gelu_cpu.cpp"),
               os.path.join(CSRC, "autocast", "dscn_autocast.cpp")]
    # -fopenmp: at::parallel_for is an inline OpenMP loop in ATen's headers; without the flag it silently runs on one
    # thread. With GCC the OpenMP symbols resolve at run time to the libgomp.so.1 torch has already loaded (same
    # soname), so torch.set_num_threads applies to the op too; clang links its own libomp, whose thread count
    # torch.set_num_threads does not set (the kernels do not depend on thread ids: csrc/cpu/cpu_parallel.h).
    openmp = _openmp_flags()
    cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-Wno-psabi", *openmp]
    link_flags = list(openmp)
    if _want_cuda():
        sources.append(os.path.join(CSRC, "cuda", "dscn_cuda.cu"))
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
        print(f"ops_dscn: building the CPU and CUDA kernels (CUDA_HOME={CUDA_HOME}, "
              f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<torch default>')})")
        return [
            CUDAExtension(
                "ops_dscn._C",
                sources,
                depends=HEADERS,
                include_dirs=[os.path.join(HERE, CSRC)] + _cuda_pip_include_dirs(),
                define_macros=[("DSCN_WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                extra_link_args=link_flags,
            )
        ]
    print("ops_dscn: no GPU visible and FORCE_CUDA is not 1: building the CPU kernel only "
          "(set FORCE_CUDA=1 with a CUDA toolkit to build the CUDA kernel too).")
    return [
        CppExtension(
            "ops_dscn._C",
            sources,
            depends=HEADERS,
            include_dirs=[os.path.join(HERE, CSRC)],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ]


def _readme() -> str:
    path = os.path.join(HERE, "README.md")
    if not os.path.exists(path):  # an sdist made before the README existed
        return ""
    with open(path, encoding="utf-8") as f:
        return f.read()


setup(
    name="ops_dscn",
    version="1.0.0",
    description="DSCN: deformable strip convolution (CPU and CUDA kernels, pure-PyTorch twin) for DSAN",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["ops_dscn", "ops_dscn.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.4"],
    zip_safe=False,
)
