"""The CPU kernels (`cpu_kv.cpp`), built once per machine with torch's C++ extension loader and called as torch
ops. Each has its torch twin beside it, which stays the fallback and the test oracle:

* `quantize_pack` / `quantize_into` (twin: `vlmkv.quant.quantize`): per-token groups quantized and bit-packed in
  one pass, bit for bit the twin's codes, scales and zero points; `quantize_into` writes straight into a
  segment's buffers, so a decode step's token costs one call;
* `decode_partial` (twin: `vlmkv.attention.qk_from_codes` / `pv_from_codes`): a one-token query's attention over a
  packed 2/4/8-bit segment, GQA-aware, reading each token's packed bytes once for scores and once for values,
  chunks in parallel on torch's thread pool, partial softmaxes merged by log-sum-exp.

The build needs a C++ compiler and `ninja` (a dependency of vlmkv); it goes to `$VLMKV_CACHE/kernels/` (keyed by
the source, torch's version and the CPU's flags, since it is compiled with `-march=native`) and takes about 10 s
the first time. Without a compiler vlmkv warns once and keeps the torch twins.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import warnings
from pathlib import Path

import torch

from ..quant.uniform import QTensor, QuantSpec

SOURCE = Path(__file__).with_name("cpu_kv.cpp")
LIBRARY = "vlmkv_cpu_kv"
_STATE: dict = {"loaded": None, "error": None}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_dir() -> Path:
    from ..models.loading import cache_dir

    key = hashlib.sha256(SOURCE.read_bytes() + _BUILDER.encode() + torch.__version__.encode()
                         + _cpu_flags().encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"cpu-{key}"


def _check_private(path: Path) -> None:
    """Raise PermissionError unless `path` and every folder above it up to the cache root belong to this user (or
    root) and nobody else can write them: a library planted in a shared cache must never be loaded."""
    from ..models.loading import cache_dir

    root = cache_dir().resolve()
    p = path.resolve()
    uid = os.getuid() if hasattr(os, "getuid") else None
    for q in [p, *p.parents]:
        st = q.stat()
        if uid is not None and st.st_uid not in (uid, 0):
            raise PermissionError(f"{q} belongs to uid {st.st_uid}, not to this user: the kernel is not loaded from it")
        if q == root or root not in q.parents:
            if st.st_mode & 0o022 and not (st.st_mode & 0o1000):  # sticky folders (/tmp) keep others' files out
                raise PermissionError(f"{q} is writable by others: the kernel is not loaded from it")
            break
        if st.st_mode & 0o022:
            raise PermissionError(f"{q} is writable by others: the kernel is not loaded from it")


_BUILDER = """
import ctypes, os, signal, sys
try:  # die with the parent (Linux), taking the compiler with us: nothing keeps running after a kill
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except Exception:
    pass
signal.signal(signal.SIGTERM, lambda *a: os.killpg(0, signal.SIGKILL))
from torch.utils import cpp_extension
# no contraction into fused multiply-adds: the kernel must round as the reference does, operation by operation
cpp_extension.load(sys.argv[1], [sys.argv[2]], extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"],
                   extra_ldflags=["-fopenmp"], build_directory=sys.argv[3], is_python_module=False, verbose=False)
"""


def _clean_stale(parent: Path) -> None:
    """Remove scratch folders of builds whose process is gone (killed mid-build)."""
    for tmp in parent.glob("*.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            pass


def _build(d: Path) -> None:
    """Compile in a child process (its own process group, killed with this one) into a private scratch folder,
    record the sha256 of what it built (a manifest), then move the folder into place: processes starting together
    (data-parallel eval) never share a ninja run or see a half-written file."""
    import subprocess
    import sys

    d.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_private(d.parent)
    _clean_stale(d.parent)
    tmp = d.parent / f"{d.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700)
    proc = subprocess.Popen([sys.executable, "-c", _BUILDER, LIBRARY, str(SOURCE), str(tmp)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=900)
    except BaseException:  # interrupted or timed out: stop the compiler, leave nothing behind
        os.killpg(proc.pid, 9)
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    so = tmp / f"{LIBRARY}.so"
    if proc.returncode != 0 or not so.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"the CPU kernel build failed: {out.strip()[-500:]}")
    from ..models.loading import write_manifest

    write_manifest(tmp)  # the sha256 of every file built, checked before each load
    try:
        os.rename(tmp, d)
    except OSError:  # another process got there first: its copy is the same
        shutil.rmtree(tmp, ignore_errors=True)


def _verified(d: Path) -> Path | None:
    """The library in `d` if the folder is private and its files match the manifest written at build time
    (`models.loading.verified`, which removes a corrupt or truncated build for the caller to rebuild). Raises
    PermissionError for a folder that others could have written."""
    from ..models.loading import verified

    so = d / f"{LIBRARY}.so"
    if not so.exists():
        return None
    _check_private(d)
    _check_private(so)
    return so if verified(d) else None


def load() -> bool:
    """Build (first time on this machine), verify and load the CPU kernels; False, with one warning, if that fails."""
    if _STATE["loaded"] is None:
        try:
            d = build_dir()
            so = _verified(d)
            if so is None:
                _build(d)
                so = _verified(d)
                if so is None:
                    raise RuntimeError(f"the CPU kernel built in {d} did not verify")
            torch.ops.load_library(str(so))
            _STATE["loaded"] = True
        except Exception as e:  # no compiler, no ninja, a read-only or shared cache: keep the torch twins
            _STATE["loaded"] = False
            _STATE["error"] = f"{type(e).__name__}: {e}"
            warnings.warn(f"vlmkv: the CPU kernels are not used, decoding uses the slower torch path "
                          f"({_STATE['error'][:300]})", RuntimeWarning, stacklevel=2)
    return _STATE["loaded"]


def error() -> str | None:
    """Why the kernels did not load (None if they did or were not tried)."""
    return _STATE["error"]


def available(x: torch.Tensor) -> bool:
    """Whether `x` takes the CPU kernels: on the CPU, `VLMKV_KERNELS` auto or cpu, and built."""
    from . import mode

    return x.device.type == "cpu" and mode() in ("auto", "cpu") and load()


def code_format(spec: QuantSpec) -> int:
    """The kernels' code format of a spec: its bits (2, 4, 8), or 3 for ternary codes (`levels=3`)."""
    return 3 if spec.levels == 3 else spec.bits


_BOUNDS: dict = {}


def _tables(spec: QuantSpec, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 group bounds `[ng + 1]`, float32 clip ratios `[ng]`) of a spec's per-token groups over d channels,
    made once per (spec, d): the kernels' description of the groups (even or uneven alike)."""
    key = (spec, d)
    if key not in _BOUNDS:
        _BOUNDS[key] = (torch.tensor(spec.group_bounds(d), dtype=torch.int32),
                        torch.tensor(spec.group_clips(d), dtype=torch.float32))
    return _BOUNDS[key]


def fits_quantize(spec: QuantSpec, d: int) -> bool:
    """Whether `quantize_pack` takes this spec: per-token groups (even ones dividing d, or uneven `bounds`) of
    2/4/8-bit or ternary codes, any zero point (int16, int8, none) and clips, fp16 scales (as the Triton kernel);
    codebook formats are quantized by the reference (`quant.quantize`)."""
    from . import _fits_token_groups

    return _fits_token_groups(spec, d) and not spec.codebook


def quantize_into(x: torch.Tensor, out: QTensor) -> None:
    """Quantize x `[B, H, n, D]` with `out.spec` and write codes, scales and zero points into `out`'s tensors (of
    shapes `[B, H, n, bytes]` and `[B, H, n, groups]`, views into larger buffers allowed). Same values as
    `quantize(x, out.spec)`."""
    spec = out.spec
    bounds, clips = _tables(spec, x.shape[-1])
    torch.ops.vlmkv_cpu.quantize_pack_(x.float().contiguous(), out.codes, out.scale, out.zero, code_format(spec),
                                       bounds, clips)


_ZERO_DTYPES = {"int16": torch.int16, "int8": torch.int8}


def quantize_pack(x: torch.Tensor, spec: QuantSpec) -> QTensor:
    """Kernel twin of `vlmkv.quant.quantize` for every per-token format (see `fits_quantize`).

    x: float `[..., n, D]` on the CPU. Returns the same QTensor as `quantize(x, spec)`, bit for bit.
    """
    *lead, n, D = x.shape
    if not fits_quantize(spec, D):
        raise ValueError(f"spec must be per-token 2/4/8-bit or ternary groups covering {D} channels with fp16 scales, "
                         f"got {spec!r}")
    rows = x.reshape(-1, 1, n, D)
    N = rows.shape[0]
    ng = len(_tables(spec, D)[1])
    zdt = _ZERO_DTYPES.get(spec.zero_point)
    out = QTensor(torch.empty(N, 1, n, spec.code_bytes(D), dtype=torch.uint8), torch.empty(N, 1, n, ng, dtype=torch.float16),
                  None if zdt is None else torch.empty(N, 1, n, ng, dtype=zdt), spec, D, x.dtype)
    if N * n:
        quantize_into(rows, out)
    zero = None if out.zero is None else out.zero.view(*lead, n, -1)
    return QTensor(out.codes.view(*lead, n, -1), out.scale.view(*lead, n, -1), zero, spec, D, x.dtype)


def fits_decode(qt: QTensor, d: int, key: bool) -> bool:
    """Whether `decode_partial` reads this QTensor: 2/4/8-bit or ternary codes `[B, H, n, bytes]` with fp16 scales,
    rows of d <= 512 channels, in per-token groups (even ones dividing d, or uneven `bounds`) with int16, int8 or no
    zero points or, for keys, in per-channel groups of tokens (KIVI)."""
    spec = qt.spec
    if qt.codes.dim() != 4 or qt.d != d or d > 512 or spec.bits not in (2, 4, 8) or spec.meta_dtype != torch.float16:
        return False
    if spec.axis == "channel":
        return key
    from . import _fits_token_groups

    return _fits_token_groups(spec, d)  # codebooks too: their levels are a table the kernel reads


def _check(qt: QTensor, name: str) -> None:
    from . import check_rows

    if not fits_decode(qt, qt.d, key=name == "kq"):
        raise ValueError(f"{name} must hold 2/4/8-bit or ternary codes `[B, H, n, bytes]` with fp16 scales in per-token "
                         f"groups (keys: or per-channel groups), got {qt.spec!r}")
    check_rows(qt, name)


def decode_partial(q: torch.Tensor, kq: QTensor, vq: QTensor, ok: torch.Tensor | None, scaling: float,
                   checked: bool = False):
    """Partial attention of one-token queries over a packed segment, the CPU twin of the Triton kernel.

    q: float32 `[B, Hkv, R, D]` (R query heads per kv head, GQA); kq, vq: QTensors `[B, Hkv, n, .]` (see
    `fits_decode`; views into a segment's buffers are fine); ok: bool `[B, n]` (False: masked) or None (nothing masked).
    Returns (m, l, o): `[B, Hkv, R, 1]`, `[B, Hkv, R, 1]`, `[B, Hkv, R, D]`, m the max scaled score (at least
    -1e30), l = sum exp(s - m), o = sum exp(s - m) v; o / l equals softmax(q k^T * scaling) v over the allowed
    tokens, up to float summation order. checked: the formats were already found to fit (`kernels.decode_backend`);
    the op still checks every shape and stride.
    """
    if not checked:
        _check(kq, "kq")
        _check(vq, "vq")
    if q.dim() != 4 or q.shape[-1] != kq.d or kq.d != vq.d:
        raise ValueError(f"q must be [B, Hkv, R, D] with D = the codes' head dim {kq.d}, got shape {tuple(q.shape)!r}")
    okb = None if ok is None else ok.to(torch.int8).contiguous()
    ks, vs = kq.spec, vq.spec
    return torch.ops.vlmkv_cpu.decode_partial(
        q.float().contiguous(), kq.codes, kq.scale, kq.zero, vq.codes, vq.scale, vq.zero, okb, float(scaling),
        code_format(ks), _tables(ks, kq.d)[0], ks.group_size, ks.axis == "channel", code_format(vs),
        _tables(vs, vq.d)[0], ks.code_levels(), vs.code_levels())


_FLOAT_FORMATS = {torch.float16: 16, torch.bfloat16: 17, torch.float32: 32}
_NO_BOUNDS = torch.zeros(2, dtype=torch.int32)


def decode_layer(q: torch.Tensor, parts: list, scaling: float):
    """Every segment of a layer in one call (`kernels.decode_layer`): parts are (keys, values, ok), keys and values
    QTensors or float tensors `[B, Hkv, n, D]`; returns the merged (m, l, o) as `decode_partial`'s."""
    kv, scales, zeros, oks, fmts, bounds, kgroups, levels = [], [], [], [], [], [], [], []
    for k, v, ok in parts:
        for x in (k, v):
            if isinstance(x, QTensor):
                kv.append(x.codes)
                scales.append(x.scale)
                zeros.append(x.zero)
                fmts.append(code_format(x.spec))
                bounds.append(_tables(x.spec, x.d)[0])
                levels.append(x.spec.code_levels())
            else:
                if x.dtype not in _FLOAT_FORMATS:
                    raise ValueError(f"a float segment must be fp16, bf16 or float32, got {x.dtype!r}")
                kv.append(x)
                scales.append(x)  # not read: a float segment has no scales
                zeros.append(None)
                fmts.append(_FLOAT_FORMATS[x.dtype])
                bounds.append(_NO_BOUNDS)
                levels.append(None)
        kgroups.append(k.spec.group_size if isinstance(k, QTensor) and k.spec.axis == "channel" else 0)
        oks.append(None if ok is None else ok.to(torch.int8).contiguous())
    return torch.ops.vlmkv_cpu.decode_layer(q.float().contiguous(), kv, scales, zeros, oks, fmts, bounds, levels,
                                            kgroups, float(scaling))


__all__ = ["available", "build_dir", "code_format", "decode_layer", "decode_partial", "error", "fits_decode", "fits_quantize", "load",
           "quantize_into", "quantize_pack"]
