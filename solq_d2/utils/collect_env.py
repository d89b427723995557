"""``python -m solq_d2.utils.collect_env``: Detectron2's environment report plus solq_d2's.

Adds solq_d2's version and location, whether ``solq_d2._C`` is built (compiler, CUDA kernels,
CUDA version and architectures) and which implementation each op uses on CPU and CUDA tensors.
"""
import os

from tabulate import tabulate

__all__ = ["collect_env_info"]


def _detectron2_report() -> str:
    try:
        from detectron2.utils.collect_env import collect_env_info as d2_info
    except ImportError as e:
        return f"detectron2: not importable ({e})"
    try:
        return d2_info()
    except Exception as e:  # a broken field must not hide solq_d2's report
        return f"detectron2's collect_env failed: {type(e).__name__}: {e}"


def collect_env_info() -> str:
    import solq_d2
    from solq_d2 import layers  # noqa: F401  (registers the ops)
    from solq_d2.layers import _ext

    info = _ext.build_info()
    rows = [("solq_d2", f"{solq_d2.__version__} @{os.path.dirname(solq_d2.__file__)}")]
    if info["available"]:
        rows += [
            ("solq_d2._C", info["file"]),
            ("solq_d2._C compiler", info["compiler"]),
            ("solq_d2._C CPU kernels", "yes"),
            ("solq_d2._C CUDA kernels", "yes" if info["cuda"] else "no"),
        ]
        if info["cuda"]:
            rows += [
                ("solq_d2._C CUDA version", info["cuda_version"]),
                ("solq_d2._C CUDA archs", info["cuda_archs"]),
            ]
    else:
        rows.append(("solq_d2._C", f"not available: {info['reason']}"))
    for op, impl in _ext.op_report().items():
        rows.append((f"op {op} (CPU tensors)", impl["cpu"]))
        rows.append((f"op {op} (CUDA tensors)", impl["cuda"]))
    return _detectron2_report() + "\n" + tabulate(rows)


if __name__ == "__main__":
    print(collect_env_info())
