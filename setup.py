"""Optional CUDA C++ extensions from csrc/.

Built only when a CUDA toolchain and a CUDA build of torch are present. DSM_FAST_BUILD_CUDA=1 forces
the build (and fails loudly without a toolchain), DSM_FAST_BUILD_CUDA=0 skips it; unset means 'auto'.
Everything in dsm_fast imports and runs without these extensions.
"""
import glob
import os
import shutil

from setuptools import setup


def cuda_extensions():
    mode = os.environ.get("DSM_FAST_BUILD_CUDA", "auto").lower()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if mode in ("0", "no", "false") or not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError:
        if mode in ("1", "yes", "true"):
            raise RuntimeError("DSM_FAST_BUILD_CUDA=1 but torch is not importable in the build environment "
                               "(install with --no-build-isolation)")
        return [], {}
    has_toolchain = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if not has_toolchain:
        if mode in ("1", "yes", "true"):
            raise RuntimeError("DSM_FAST_BUILD_CUDA=1 but nvcc or a CUDA build of torch is missing")
        return [], {}
    ext = CUDAExtension("dsm_fast._cuda", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
