"""kvx from Python: ctypes bindings over libkvx.so, built from kvx's C headers.

    import kvx
    with kvx.Context(name="decode", tp_rank=0, tp_size=1) as ctx:
        cache = ctx.register_cache(kv_caches, layout="NHD")   # one tensor/array per layer
        peer = ctx.add_peer(metadata_bytes_from_the_owner)
        q = ctx.queue()
        t = q.read(peer, local_blocks, remote_blocks, notify_id=7)
        t.wait(timeout_ms=5000)

Layouts (vLLM's): "NHD" is [2, num_blocks, block_size, num_kv_heads,
head_size] (FlashAttention), "HND" is [2, num_blocks, num_kv_heads,
block_size, head_size], "MLA" is [num_blocks, block_size, latent_dim].
Tensors are torch tensors or numpy arrays, contiguous; a registered cache
holds references to them until it is deregistered (its context closed).

Every kvx status other than success is raised as a subclass of kvx.Error,
carrying kvx's own message.
"""
from __future__ import annotations

import array as _array
import ctypes as C
import json
import os
import struct as _struct
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

# The struct mirrors, generated from kvx.h (tools/gen_pymirrors.py); checked
# field by field against the library's table at load (_check_mirrors).
from ._structs import MIRRORS as _MIRRORS
from ._structs import (_AbiField, _CacheDesc, _Completion, _CtxDesc, _CudaDesc, _Layout,  # noqa: F401
                       _Notification, _OfiDesc, _QueueCuda, _QueueDesc, _Read, _Stats, _UcxDesc)

__all__ = [
    "Context", "Cache", "Peer", "Queue", "Ticket", "Completion", "Notification",
    "Error", "ArgumentError", "NoMemoryError", "UnsupportedError", "MismatchError", "BackendError",
    "PeerError", "TimeoutError", "CorruptError", "CanceledError", "StaleError", "QueueFullError", "backends", "cuda_available",
    "library_path",
]

# --- errors -------------------------------------------------------------------


class Error(Exception):
    """A kvx status other than success; ``status`` is kvx's code, str() its message."""

    status: int = 0

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class ArgumentError(Error, ValueError):
    status = -1


class NoMemoryError(Error, MemoryError):
    status = -2


class UnsupportedError(Error):
    status = -3


class MismatchError(Error):
    status = -4


class BackendError(Error):
    status = -5


class PeerError(Error):
    status = -6


class TimeoutError(Error):  # noqa: A001 (kvx's own, as DESIGN names it)
    status = -7


class CorruptError(Error):
    status = -8


class CanceledError(Error):
    status = -9


class StaleError(Error):
    """KVX_ERR_STALE: the owner retired a block the read expected (block
    generations): what landed may be another request's."""
    status = -10


class QueueFullError(Error):
    """kvx_post's KVX_PENDING: the queue holds depth reads not yet reported;
    poll (or wait) some, then post again."""
    status = 1


_ERRORS = {c.status: c for c in (ArgumentError, NoMemoryError, UnsupportedError, MismatchError, BackendError,
                                  PeerError, TimeoutError, CorruptError, CanceledError, StaleError, QueueFullError)}
_OK, _PENDING = 0, 1

# --- the library ----------------------------------------------------------------

_HERE = os.path.dirname(os.path.abspath(__file__))


_CUDA_WHY = ""  # why libkvx_cuda.so was not chosen, for errors about CUDA tensors
_chosen: Optional[str] = None
_backends: Optional[List[str]] = None


def _build_info(path: str) -> Dict[str, Any]:
    try:
        with open(os.path.join(os.path.dirname(path), "build_info.json")) as f:
            return dict(json.load(f)["libraries"][os.path.basename(path)])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _open_cuda_driver() -> str:
    """Opens libcuda.so.1 into the global namespace (libkvx_cuda.so's cu*
    calls bind to it); returns "" or why it cannot be opened."""
    try:
        C.CDLL("libcuda.so.1", mode=C.RTLD_GLOBAL)
        return ""
    except OSError as e:
        return "libcuda.so.1 cannot be opened (%s): no GPU driver here" % e


def library_path() -> str:
    """The library kvx loads: $KVX_LIBRARY; else libkvx_cuda.so beside this
    file where it was built and the GPU driver's libcuda.so.1 opens (unless
    KVX_PY_CUDA=0), else libkvx.so. Chosen once per process."""
    global _CUDA_WHY, _chosen
    if _chosen is not None:
        return _chosen
    env = os.environ.get("KVX_LIBRARY")
    cuda = os.path.join(_HERE, "libkvx_cuda.so")
    if env:
        _chosen = env
    elif os.environ.get("KVX_PY_CUDA", "1") == "0":
        _CUDA_WHY = "KVX_PY_CUDA=0 is set"
    elif not os.path.exists(cuda):
        _CUDA_WHY = "the package was built without CUDA (no cuda.h under $CUDA_HOME or /usr/local/cuda)"
    else:
        _CUDA_WHY = _open_cuda_driver()
        if not _CUDA_WHY:
            _chosen = cuda
    if _chosen is None:
        _chosen = os.path.join(_HERE, "libkvx.so")
    return _chosen


def backends() -> List[str]:
    """The backends of the library kvx loads, in the order a context's
    default takes them: "ucx", "ofi", "cuda", then "local"."""
    global _backends, _CUDA_WHY
    if _backends is None:
        built = set(_build_info(library_path()).get("backends", ["local"]))
        _backends = [b for b in ("ucx", "ofi", "cuda", "local") if b in built]
        if "cuda" not in _backends and not _CUDA_WHY:
            _CUDA_WHY = "%s was built without CUDA" % library_path()
    return list(_backends)


def cuda_available() -> bool:
    """True when the loaded library has CUDA: GPU caches, backend "cuda", stream_wait."""
    return "cuda" in (_backends if _backends is not None else backends())


_COMPLETION_SIZE = C.sizeof(_Completion)
_COMPLETION_RECORD = _struct.Struct("=QQi%dxQQ" % (_Completion.bytes.offset - _Completion.status.offset - 4))
assert _COMPLETION_RECORD.size == _COMPLETION_SIZE and C.sizeof(C.c_void_p) == 8


def _abi_table(lib: C.CDLL) -> Dict[str, Dict[Optional[str], Tuple[int, int]]]:
    """The library's kvx_abi_fields(): struct -> field -> (offset, size), the
    struct's own size under None."""
    try:
        fn = lib.kvx_abi_fields
    except AttributeError:
        raise ImportError("kvx: %s has no kvx_abi_fields: it was built from older headers than these bindings; "
                          "rebuild the package" % getattr(lib, "_name", "the library")) from None
    fn.restype, fn.argtypes = C.POINTER(_AbiField), [C.POINTER(C.c_uint32)]
    n = C.c_uint32()
    rows = fn(C.byref(n))
    table: Dict[str, Dict[Optional[str], Tuple[int, int]]] = {}
    for i in range(n.value):
        r = rows[i]
        field = r.field.decode() if r.field is not None else None
        table.setdefault(r.type.decode(), {})[field] = (int(r.offset), int(r.size))
    return table


def _check_mirrors(table: Dict[str, Dict[Optional[str], Tuple[int, int]]], mirrors: Dict[str, Any],
                   where: str = "the library") -> None:
    """Raises ImportError naming every struct and field where a ctypes mirror
    and the library's table differ (offset, size, or present on one side
    only). Sizes alone would pass two fields of one size swapped."""
    bad: List[str] = []
    for cname, cls in mirrors.items():
        lib = table.get(cname)
        if lib is None:
            bad.append("%s: mirrored here (%s), not in %s" % (cname, cls.__name__, where))
            continue
        whole = lib.get(None)
        if whole is None or whole[1] != C.sizeof(cls):
            bad.append("%s: %s in %s, %d bytes here" % (cname, "%d bytes" % whole[1] if whole else "no size", where, C.sizeof(cls)))
        ours = {f[0]: (getattr(cls, f[0]).offset, getattr(cls, f[0]).size) for f in cls._fields_}
        for name, (off, size) in ours.items():
            if name not in lib:
                bad.append("%s.%s: here (offset %d, %d bytes), not in %s" % (cname, name, off, size, where))
            elif lib[name] != (off, size):
                bad.append("%s.%s: offset %d, %d bytes in %s; offset %d, %d bytes here"
                           % (cname, name, lib[name][0], lib[name][1], where, off, size))
        bad += ["%s.%s: in %s, not here" % (cname, name, where) for name in lib if name is not None and name not in ours]
    bad += ["%s: in %s, not mirrored here" % (cname, where) for cname in table if cname not in mirrors]
    if bad:
        raise ImportError("kvx: these bindings' structs differ from %s's (rebuild the package; after a header "
                          "change run tools/gen_pymirrors.py): %s" % (where, "; ".join(bad)))


_lib: Optional[C.CDLL] = None


def _load() -> C.CDLL:
    global _lib
    if _lib is not None:
        return _lib
    path = library_path()
    if not os.path.exists(path):
        raise ImportError("kvx: %s is missing: install the package with pip (it builds the library), "
                          "or run python -m kvx._build %s" % (path, os.path.dirname(path)))
    if "cuda" in _build_info(path).get("backends", []):
        why = _open_cuda_driver()
        if why:
            raise ImportError("kvx: %s is built with CUDA but %s" % (path, why))
    lib = C.CDLL(path)
    # the bindings and the headers must agree, field by field, or nothing works
    _check_mirrors(_abi_table(lib), _MIRRORS, os.path.basename(path))
    P, U32, U64, I = C.c_void_p, C.c_uint32, C.c_uint64, C.c_int
    sigs = {
        "kvx_ctx_create": (I, [C.POINTER(_CtxDesc), C.POINTER(P)]),
        "kvx_ctx_destroy": (None, [P]),
        "kvx_ctx_rotate": (I, [P]),
        "kvx_ctx_error": (C.c_char_p, [P]),
        "kvx_status_name": (C.c_char_p, [I]),
        "kvx_cache_register": (I, [P, C.POINTER(_CacheDesc), C.POINTER(P)]),
        "kvx_cache_deregister": (None, [P]),
        "kvx_cache_seal": (I, [P, C.POINTER(U32), U32]),
        "kvx_blocks_retire": (I, [P, C.POINTER(U32), U32]),
        "kvx_block_generation": (U64, [P, U32]),
        "kvx_metadata": (I, [P, P, C.POINTER(C.c_size_t)]),
        "kvx_peer_add": (I, [P, C.c_char_p, C.c_size_t, C.POINTER(P)]),
        "kvx_peer_remove": (None, [P]),
        "kvx_peer_transport": (C.c_char_p, [P]),
        "kvx_peer_name": (C.c_char_p, [P]),
        "kvx_peer_rank": (I, [P]),
        "kvx_peer_heads": (I, [P, P, U32, C.POINTER(U32), C.POINTER(U32)]),
        "kvx_queue_create": (I, [P, C.POINTER(_QueueDesc), C.POINTER(P)]),
        "kvx_queue_destroy": (None, [P]),
        "kvx_post": (I, [P, C.POINTER(_Read), C.POINTER(U64)]),
        "kvx_post_batch": (I, [P, C.POINTER(_Read), U32, C.POINTER(U64), C.POINTER(U32)]),
        "kvx_test": (I, [P, U64]),
        "kvx_wait": (I, [P, U64, U32]),
        "kvx_poll": (I, [P, C.POINTER(_Completion), I]),
        "kvx_stream_wait": (I, [P, U64, P]),
        "kvx_stream_status_ptr": (P, [P, U64]),
        "kvx_notify_expect": (I, [P, U64, U32]),
        "kvx_notify_expect_retire": (I, [P, U64, U32, P, C.POINTER(U32), U32]),
        "kvx_notify_expect_readers": (I, [P, U64, U32, U32, P, C.POINTER(U32), U32]),
        "kvx_notifications": (I, [P, C.POINTER(_Notification), I]),
        "kvx_progress": (I, [P]),
        "kvx_stats_get": (None, [P, C.POINTER(_Stats)]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    _lib = lib
    return lib


def _error(status: int, ctx: Optional[int], what: str = "", msg: Optional[str] = None) -> Error:
    """The exception of a kvx status: "what: KVX_ERR_...: kvx's message"
    (the context's last error, or msg)."""
    lib = _load()
    if msg is None:
        msg = lib.kvx_ctx_error(ctx).decode(errors="replace") if ctx is not None else ""
    name = lib.kvx_status_name(status).decode()
    text = "%s: %s" % (name, msg) if msg else name
    if what:
        text = "%s: %s" % (what, text)
    return _ERRORS.get(status, Error)(text, status)


def _raise(status: int, ctx: Optional[int], what: str = "", msg: Optional[str] = None) -> None:
    raise _error(status, ctx, what, msg)


def _made(h: C.c_void_p) -> int:
    """The handle a successful create call wrote."""
    if not h.value:
        raise Error("kvx returned success without a handle", -5)
    return int(h.value)


def _check(status: int, ctx: Optional[int], what: str = "") -> None:
    if status != _OK:
        _raise(status, ctx, what)


_BACKENDS = {None: 0, "default": 0, "ucx": 1, "ofi": 2, "libfabric": 2, "cuda": 3, "local": 4}
# Layout names, as vLLM spells them. Two planes (K and V apart), 5-d per
# layer: "NHD" [2, blocks, tokens, heads, head_size] and "HND" [2, blocks,
# heads, tokens, head_size] (also with K/V second: [blocks, 2, ...]). One
# plane, K and V side by side in the last dim (C = head_size + head_size_v),
# 4-d per-layer views: the HND family [blocks, heads, tokens, C] -- LBHNC
# (vLLM 0.33's "HND"), and the block-outermost BLHNC, BHLNC, LHBNC, whose
# per-layer views stride a block across the layers -- and the NHD family
# [blocks, tokens, heads, C] -- LBNHC (vLLM's "NHD"), BLNHC. "MLA": [blocks,
# tokens, latent]. The view's strides say where each layer lies, whatever
# its name; the name says which dims are heads and which tokens.
_HND_NAMES = ("HND", "LBHNC", "BLHNC", "BHLNC", "LHBNC")
_NHD_NAMES = ("NHD", "LBNHC", "BLNHC")
_LAYOUT_NAMES = _HND_NAMES + _NHD_NAMES + ("MLA",)
# kvx_dtype codes (kvx.h), by the names torch and numpy give them
_DTYPES = {"torch.float16": 1, "float16": 1, "torch.bfloat16": 2, "bfloat16": 2, "torch.float32": 3, "float32": 3,
           "torch.float8_e4m3fn": 4, "float8_e4m3fn": 4, "torch.float8_e5m2": 5, "float8_e5m2": 5,
           "torch.int8": 6, "int8": 6, "torch.uint8": 7, "uint8": 7, "torch.float64": 8, "float64": 8,
           "torch.uint16": 9, "uint16": 9}

# --- tensors --------------------------------------------------------------------


class _TensorInfo:
    """What kvx needs of one layer's tensor or array."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        mod = type(obj).__module__
        if mod.startswith("torch"):
            self.kind = "torch"
            self.shape = tuple(int(s) for s in obj.shape)
            self.itemsize = int(obj.element_size())
            self.strides = tuple(int(s) * self.itemsize for s in obj.stride())
            self.ptr = int(obj.data_ptr())
            self.contiguous = bool(obj.is_contiguous())
            self.dtype = str(obj.dtype)
            self.cuda = bool(obj.is_cuda)
            self.device = int(obj.device.index) if self.cuda and obj.device.index is not None else (0 if self.cuda else -1)
            self.nbytes = int(obj.numel()) * self.itemsize
        elif hasattr(obj, "__array_interface__") and hasattr(obj, "ctypes"):
            self.kind = "numpy"
            self.shape = tuple(int(s) for s in obj.shape)
            self.itemsize = int(obj.itemsize)
            self.strides = tuple(int(s) for s in obj.strides)
            self.ptr = int(obj.ctypes.data)
            self.contiguous = bool(obj.flags["C_CONTIGUOUS"])
            self.dtype = str(obj.dtype)
            self.cuda = False
            self.device = -1
            self.nbytes = int(obj.nbytes)
            if not obj.flags["WRITEABLE"]:
                raise ArgumentError("register_cache: a read-only array cannot receive blocks", -1)
        else:
            raise ArgumentError("register_cache: %s is neither a torch tensor nor a numpy array" % type(obj).__name__, -1)


class _Form:
    """How one cache's layers lie: kvx's layout, a base per layer and plane,
    and the strides of a block, a head (HND) and a token (NHD), in bytes."""

    def __init__(self, lay: _Layout, bases: List[int], block_stride: int, head_stride: int, token_stride: int, name: str) -> None:
        self.lay, self.bases, self.name = lay, bases, name
        self.block_stride, self.head_stride, self.token_stride = block_stride, head_stride, token_stride


def _shape_words(t: _TensorInfo) -> str:
    return "shape %s strides %s (bytes, %s)" % (list(t.shape), list(t.strides), t.dtype)


def _infer_layout(t: _TensorInfo, block_size: Optional[int]) -> str:
    """A layout name from one layer's shape and strides (refused where they do not tell)."""
    nd = len(t.shape)
    if nd == 3:
        return "MLA"
    if nd == 5 and 2 in (t.shape[0], t.shape[1]):
        dims = t.shape[2:4] if t.shape[0] == 2 else t.shape[2:4]
        if block_size is not None and dims[0] == block_size and dims[1] != block_size:
            return "NHD"
        if block_size is not None and dims[1] == block_size and dims[0] != block_size:
            return "HND"
    if nd == 4 and block_size is not None and (t.shape[1] == block_size) != (t.shape[2] == block_size):
        # the tokens' dim is the one of block_size; the order is which of
        # the two is packed inside the other (vLLM 0.33 hands [B, H, N, C]
        # views in every layout, with strides that tell)
        tok, head = (2, 1) if t.shape[2] == block_size else (1, 2)
        packed = t.shape[3] * t.itemsize
        if t.strides[head] == packed and t.strides[tok] != packed:
            return "LBNHC"
        return "LBHNC"
    raise ArgumentError("register_cache: cannot tell the layout of %s%s: give layout= (%s), or block_size= where the "
                        "tokens' dim differs from the heads'" % (_shape_words(t), "" if block_size is None else
                                                                  " with block_size %d" % block_size, ", ".join(_LAYOUT_NAMES)), -1)


def _same_layers(tensors: Sequence[_TensorInfo]) -> None:
    """Every layer's tensor like layer 0's: shape, dtype, strides and device."""
    first = tensors[0]
    for i, t in enumerate(tensors):
        if t.shape != first.shape or t.dtype != first.dtype or t.strides != first.strides:
            raise ArgumentError("register_cache: layer %d is %s, layer 0 %s: every layer must match"
                                % (i, _shape_words(t), _shape_words(first)), -1)
        if (t.kind, t.cuda, t.device) != (first.kind, first.cuda, first.device):
            raise ArgumentError("register_cache: layer %d is on %s, layer 0 on %s: every layer must be on one device"
                                % (i, "cuda:%d" % t.device if t.cuda else "cpu", "cuda:%d" % first.device if first.cuda else "cpu"), -1)


class _Dims(NamedTuple):
    """A 4-d or 5-d layer's dims: blocks, the two middle dims (a, b) in memory
    order with their strides, the last dim, and where K and V lie."""
    num_blocks: int
    a: int
    b: int
    hd: int
    sa: int
    sb: int
    sd: int
    plane_step: int
    kv_planes: int
    blk: int


def _dims_of(name: str, sh: Tuple[int, ...], st: Tuple[int, ...], e: int, block_size: Optional[int],
             refuse: Callable[[str], ArgumentError]) -> _Dims:
    if len(sh) == 5:  # two planes: K and V apart
        if name not in ("NHD", "HND"):
            raise refuse("a 5-d layer is [2, num_blocks, ...] (or [num_blocks, 2, ...]): use NHD or HND")
        kv = 0 if sh[0] == 2 else 1 if sh[1] == 2 else -1
        if kv < 0:
            raise refuse("neither dim 0 nor dim 1 is 2 (K and V)")
        return _Dims(sh[1 - kv], sh[2], sh[3], sh[4], st[2], st[3], st[4], st[kv], 2, 1 - kv)
    if len(sh) == 4:  # one plane: K and V side by side in the last dim
        nb, a, b, hd = sh
        sa, sb, sd = st[1], st[2], st[3]
        # Dims 1 and 2 in the name's order ([B, N, H, C] for NHD), or swapped
        # where the strides (or block_size) say so: vLLM 0.33 hands every
        # layout as a [B, H, N, C] view whose strides give the order.
        nhd = name in _NHD_NAMES
        std_fits = sb == hd * e and (block_size is None or sh[1 if nhd else 2] == block_size)
        swap_fits = sa == hd * e and (block_size is None or sh[2 if nhd else 1] == block_size)
        if std_fits and swap_fits:  # one of them has size 1, its stride any: that one is the heads
            std_fits = sh[2 if nhd else 1] == 1
        if swap_fits and not std_fits:
            a, b, sa, sb = b, a, sb, sa
        return _Dims(nb, a, b, hd, sa, sb, sd, 0, 1, 0)
    raise refuse("kvx reads 5-d two-plane layers, 4-d one-plane views, or 3-d MLA")


def _layout_of(tensors: Sequence[_TensorInfo], layout: Optional[str], block_size: Optional[int] = None) -> _Form:
    """kvx's view of one tensor per layer: every layer alike, from its strides."""
    first = tensors[0]
    name = _infer_layout(first, block_size) if layout is None else layout
    if name not in _LAYOUT_NAMES:
        raise ArgumentError("register_cache: layout %r: use one of %s (vLLM's names), or None to infer it"
                            % (layout, ", ".join(_LAYOUT_NAMES)), -1)
    _same_layers(tensors)
    e, sh, st = first.itemsize, first.shape, first.strides
    lay = _Layout()
    lay.num_layers = len(tensors)
    lay.elem_bytes = e
    lay.dtype = _DTYPES.get(first.dtype, 0)
    head_stride = token_stride = 0

    def refuse(why: str) -> ArgumentError:
        return ArgumentError("register_cache: layout %s cannot read %s: %s" % (name, _shape_words(first), why), -1)

    if name == "MLA":
        if len(sh) != 3:
            raise refuse("MLA is [num_blocks, block_size, latent_dim]")
        if st[2] != e or st[1] != sh[2] * e:
            raise refuse("a block's tokens must be packed (strides [*, latent_dim * elem, elem])")
        lay.num_blocks, lay.block_tokens, lay.head_dim = sh
        lay.num_heads, lay.total_heads, lay.kv_planes, lay.order = 1, 1, 1, 0
        return _Form(lay, [t.ptr for t in tensors], st[0], 0, 0, name)
    d = _dims_of(name, sh, st, e, block_size, refuse)
    lay.num_blocks, lay.kv_planes = d.num_blocks, d.kv_planes
    if d.sd != e:
        raise refuse("the last dim (head_size, or K|V) must be packed")
    if name in _NHD_NAMES:  # [.., tokens, heads, C]
        lay.block_tokens, lay.num_heads, lay.order = d.a, d.b, 1
        if d.sb != d.hd * e:
            raise refuse("a token's heads must be packed (heads stride %d bytes, not %d)" % (d.sb, d.hd * e))
        token_stride = d.sa if d.a > 1 else 0
    else:                   # [.., heads, tokens, C]
        lay.num_heads, lay.block_tokens, lay.order = d.a, d.b, 0
        if d.sb != d.hd * e:
            raise refuse("a head's tokens must be packed (tokens stride %d bytes, not %d)" % (d.sb, d.hd * e))
        head_stride = d.sa if d.a > 1 else 0  # one head: its stride means nothing (vLLM gives a size-1 dim any)
    lay.head_dim = d.hd
    bases = [t.ptr + p * d.plane_step for t in tensors for p in range(lay.kv_planes)]
    return _Form(lay, bases, st[d.blk], head_stride, token_stride, name)


# --- objects ----------------------------------------------------------------------


class Cache:
    """A registered KV cache: one tensor or array per layer. Holds references
    to them while registered, so they cannot be freed under kvx."""

    def __init__(self, ctx: "Context", handle: int, tensors: List[Any], layout: str, lay: _Layout, index: int) -> None:
        self._ctx = ctx
        self._h: Optional[int] = handle
        self.tensors = tensors
        self.layout = layout
        self.index = index
        self.num_blocks = int(lay.num_blocks)
        self.num_layers = int(lay.num_layers)
        self.num_heads = int(lay.num_heads)

    @property
    def handle(self) -> int:
        if self._h is None:
            raise ArgumentError("the cache is deregistered", -1)
        return self._h

    def seal(self, blocks: Sequence[int]) -> None:
        """Record the checksums of these blocks (caches registered with checksums=True)."""
        arr, n = _u32_array(blocks)
        _check(_load().kvx_cache_seal(self.handle, arr, n), self._ctx._handle, "seal")

    def retire(self, blocks: Sequence[int]) -> None:
        """Advance the generation of blocks being freed or given to another
        request (caches registered with generations=True), before they are
        written again: a read that expected the old one fails with StaleError."""
        arr, n = _u32_array(blocks)
        _check(_load().kvx_blocks_retire(self.handle, arr, n), self._ctx._handle, "retire")

    def generation(self, block: int) -> int:
        """A block's current generation, to send with its id in a request."""
        g = int(_load().kvx_block_generation(self.handle, int(block)))
        if g == (1 << 64) - 1:
            raise ArgumentError("generation: block %r is past the cache's %d blocks, or the cache has no generations"
                                % (block, self.num_blocks), -1)
        return g

    def generations(self, blocks: Sequence[int]) -> List[int]:
        return [self.generation(b) for b in blocks]

    def deregister(self) -> None:
        """Give the memory back to the engine; drops the references."""
        if self._h is not None and self._ctx._h is not None:
            _load().kvx_cache_deregister(self._h)
        self._h = None
        self.tensors = []


class Peer:
    """An imported context (a remote TP rank): ``name`` and ``rank`` are its,
    ``transport`` what kvx reads it over."""

    def __init__(self, ctx: "Context", handle: int) -> None:
        lib = _load()
        self._ctx = ctx
        self._h: Optional[int] = handle
        self.name: str = lib.kvx_peer_name(handle).decode()
        self.rank: int = lib.kvx_peer_rank(handle)
        #: The transport kvx chose to read this peer over, as kvx_peer_transport
        #: says it: "ucx:tcp (sw)", "ucx:rc_mlx5", "ofi:tcp;ofi_rxm (sw)",
        #: "cuda:ipc same-gpu (GPU 0)"; "(sw)" where the owner's CPU serves reads.
        self.transport: str = lib.kvx_peer_transport(handle).decode()

    @property
    def handle(self) -> int:
        if self._h is None:
            raise ArgumentError("the peer is removed", -1)
        return self._h

    def heads(self, cache: Cache, remote_cache: int = 0) -> Tuple[int, int]:
        """(first, count) of the global heads a read of this peer's cache into ``cache`` takes."""
        first, count = C.c_uint32(), C.c_uint32()
        _check(_load().kvx_peer_heads(self.handle, cache.handle, remote_cache, C.byref(first), C.byref(count)),
               self._ctx._handle, "heads")
        return int(first.value), int(count.value)

    def remove(self) -> None:
        if self._h is not None and self._ctx._h is not None:
            _load().kvx_peer_remove(self._h)
        self._h = None

    def __repr__(self) -> str:
        return "kvx.Peer(%s/%d, %s)" % (self.name, self.rank, self.transport)


class Completion:
    """One reported read: ticket, the caller's tag, kvx status, bytes.
    ``ok`` is status 0; ``error`` the exception of a failed read: its class
    names the status, its message what failed, where and why."""

    __slots__ = ("ticket", "tag", "status", "bytes", "message")

    def __init__(self, ticket: int, tag: int, status: int, nbytes: int, message: str = "") -> None:
        self.ticket, self.tag, self.status, self.bytes, self.message = ticket, tag, status, nbytes, message

    @property
    def ok(self) -> bool:
        return self.status == _OK

    @property
    def error(self) -> Optional[Error]:
        if self.status == _OK:
            return None
        return _error(self.status, None, "read %d (tag %d)" % (self.ticket, self.tag), self.message or None)

    def __repr__(self) -> str:
        return "kvx.Completion(ticket=%d, tag=%d, status=%d, bytes=%d)" % (self.ticket, self.tag, self.status, self.bytes)


class Notification:
    """A reader's notification (status 0) with its rank and TP size, or an
    expectation that expired (status -7, reader_rank -1, reader_tp_size 0)."""

    __slots__ = ("id", "status", "reader_rank", "reader_tp_size")

    def __init__(self, nid: int, status: int, reader_rank: int, reader_tp_size: int = 0) -> None:
        self.id, self.status, self.reader_rank, self.reader_tp_size = nid, status, reader_rank, reader_tp_size

    @property
    def done(self) -> bool:
        """The reader notified: its read of the blocks completed."""
        return self.status == _OK

    @property
    def expired(self) -> bool:
        """The expectation's time ran out before the reader notified."""
        return self.status == TimeoutError.status

    def __repr__(self) -> str:
        return "kvx.Notification(id=%d, status=%d, reader_rank=%d, reader_tp_size=%d)" % (
            self.id, self.status, self.reader_rank, self.reader_tp_size)


_SUCCEEDED = object()


class Ticket:
    """A posted read. ``wait`` raises its error; ``done`` tests without blocking."""

    def __init__(self, queue: "Queue", ticket: int) -> None:
        self.queue = queue
        self.ticket = ticket
        # kvx reports a read once; its outcome is kept: None until then, then
        # the read's exception, or _SUCCEEDED
        self._outcome: Any = None

    def _report(self, st: int) -> None:
        if self._outcome is None:
            self._outcome = _SUCCEEDED if st == _OK else _error(st, self.queue._ctx._handle, "read %d" % self.ticket)
        if self._outcome is not _SUCCEEDED:
            raise self._outcome

    def done(self) -> bool:
        """True once the read succeeded; raises its error if it failed."""
        st = _OK
        if self._outcome is None:
            st = _load().kvx_test(self.queue.handle, self.ticket)
            if st == _PENDING:
                return False
        self._report(st)
        return True

    def wait(self, timeout_ms: int = 30000) -> None:
        """Block until the read completes (raises its error), or raise
        kvx.TimeoutError if it is still running after timeout_ms."""
        st = _OK
        if self._outcome is None:
            st = _load().kvx_wait(self.queue.handle, self.ticket, int(timeout_ms))
            if st == _PENDING:
                raise TimeoutError("read %d still running after %d ms (its own deadline has not passed)" % (self.ticket, timeout_ms), -7)
        self._report(st)

    def __repr__(self) -> str:
        return "kvx.Ticket(%d)" % self.ticket


_ndarray: Any = None  # numpy's array type, once one has come (numpy is not imported for it)
_ARRAY_I_IS_U32 = _array.array("I").itemsize == 4  # array.array('I') is kvx's uint32 (C's unsigned int)


def _u32_ids(ids: Any) -> Tuple[Any, int, int]:
    """Block ids as uint32 memory kvx can read: (the object that holds it,
    which the caller keeps alive while kvx_post runs; its address; the
    count). A writable, contiguous 1-d uint32 numpy array is read where it
    is, by pointer (0.3 us for any length); lists, tuples and other arrays
    go through array.array, torch tensors through numpy. The range checks
    run in C: a per-id Python loop would cost more than kvx's whole post of
    a 128-block read."""
    global _ndarray
    if type(ids) is _ndarray and ids.dtype.char == "I" and ids.ndim == 1 and ids.flags.c_contiguous and ids.flags.writeable and len(ids):
        ref = C.c_char.from_buffer(ids)  # keeps ids alive; kvx_post copies the table before it returns
        return ref, C.addressof(ref), len(ids)
    if isinstance(ids, (list, tuple, range)):
        try:
            arr = _array.array("I", ids)
        except (TypeError, OverflowError, ValueError) as e:
            raise ArgumentError("block ids must be integers in [0, 2^32): %s" % e, -1) from None
        return arr, arr.buffer_info()[0], len(arr)
    if type(ids) is _array.array and ids.typecode == "I" and _ARRAY_I_IS_U32:
        return ids, ids.buffer_info()[0], len(ids)
    if type(ids).__module__.startswith("torch"):
        ids = ids.detach().cpu().numpy()
    if not hasattr(ids, "dtype"):  # (not __array_interface__: numpy builds a dict for that)
        try:
            mv = memoryview(ids)
        except TypeError:
            return _u32_ids(list(ids))
        if mv.format in ("I", "=I", "<I") and mv.itemsize == 4 and mv.ndim == 1 and mv.c_contiguous:
            arr = _array.array("I")
            arr.frombytes(mv.cast("B"))  # one copy, not a step per id
            return arr, arr.buffer_info()[0], len(arr)
        return _u32_ids(mv.tolist())
    if type(ids).__module__ == "numpy":
        _ndarray = type(ids)
    if ids.ndim != 1:
        raise ArgumentError("block ids: a 1-d array, not shape %s" % (list(ids.shape),), -1)
    if ids.dtype.kind not in "ui":
        raise ArgumentError("block ids: integers, not %s" % ids.dtype, -1)
    if ids.dtype.char != "I" or not ids.flags.c_contiguous:
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) > 0xFFFFFFFF):
            raise ArgumentError("block ids: %d..%d is not within [0, 2^32)" % (int(ids.min()), int(ids.max())), -1)
        ids = ids.astype("uint32", order="C")
    # a copy into an array.array costs less than asking numpy for the address
    arr = _array.array("I")
    arr.frombytes(memoryview(ids).cast("B"))
    return arr, arr.buffer_info()[0], len(arr)


def _u32_array(ids: Any) -> Tuple[Any, int]:
    """A uint32 C array of block ids, for calls that take one as a pointer
    argument. from_buffer keeps the ids' memory alive with the array."""
    arr, _, n = _u32_ids(ids)
    return (C.c_uint32 * n).from_buffer(arr), n


class Queue:
    """An async read queue: ``read`` posts and returns a Ticket at once."""

    def __init__(self, ctx: "Context", handle: int) -> None:
        self._ctx = ctx
        self._h: Optional[int] = handle
        self._out = (_Completion * 64)()  # poll's buffer, made once
        self._ticket = C.c_uint64()  # read's out-parameter, made once
        self._ticket_ref = C.byref(self._ticket)

    @property
    def handle(self) -> int:
        if self._h is None:
            raise ArgumentError("the queue is destroyed", -1)
        return self._h

    def read(self, peer: Peer, local_blocks: Any, remote_blocks: Any, cache: Optional[Cache] = None,
             remote_cache: int = 0, layers: Optional[Tuple[int, int]] = None, notify_id: Optional[int] = None,
             timeout_ms: Optional[int] = None, verify: int = 0, tag: int = 0,
             remote_generations: Optional[Sequence[int]] = None) -> Ticket:
        """Post a read of remote_blocks of peer's cache into local_blocks of
        cache (default: the context's first). layers: (first, count). Every id
        is checked against both layouts before anything is posted. No blocks
        with a notify_id only notifies (see notify).
        remote_generations: the owner's generation of each remote block, as it
        sent them; a block retired since fails the read with StaleError."""
        la, laddr, n = _u32_ids(local_blocks)
        ra, raddr, m = _u32_ids(remote_blocks)  # la and ra live until kvx_post returns: it copies the table
        if n != m:
            raise ArgumentError("read: %d local blocks but %d remote blocks" % (n, m), -1)
        if cache is None:
            if not self._ctx.caches:
                raise ArgumentError("read: this context has no cache registered", -1)
            cache = self._ctx.caches[0]
        rd = _Read(peer.handle, cache.handle, remote_cache, laddr, raddr, n)
        if layers is not None:
            rd.layer_begin, rd.layer_count = layers
        if notify_id is not None:
            rd.notify, rd.notify_id = 1, notify_id
        if tag:
            rd.user_tag = tag
        if timeout_ms:
            rd.timeout_ms = timeout_ms
        if verify:
            rd.verify = verify
        gens = None
        if remote_generations is not None:
            gl = [int(g) for g in remote_generations]
            if len(gl) != n or any(g < 0 or g >= 1 << 64 for g in gl):
                raise ArgumentError("read: %d remote generations (each in [0, 2**64)) for %d blocks" % (len(gl), n), -1)
            gens = (C.c_uint64 * max(n, 1))(*gl)  # lives until kvx_post returns: it copies them
            rd.remote_generations = C.addressof(gens)
        st = _load().kvx_post(self.handle, rd, self._ticket_ref)
        if st:
            _raise(st, self._ctx._handle, "read")
        return Ticket(self, self._ticket.value)

    def notify(self, peer: Peer, notify_id: int, timeout_ms: Optional[int] = None, tag: int = 0) -> Ticket:
        """Tell peer this reader is done with notify_id without reading: a
        read of no blocks, for a reader that found every block locally or a
        rank that takes no heads of that peer. Completes like a read."""
        return self.read(peer, [], [], notify_id=notify_id, timeout_ms=timeout_ms, tag=tag)

    def read_batch(self, peer: Union[Peer, Sequence[Peer]], local_blocks: Any, remote_blocks: Any, counts: Sequence[int],
                   cache: Optional[Cache] = None, remote_cache: int = 0, layers: Optional[Tuple[int, int]] = None,
                   notify_ids: Optional[Sequence[Optional[int]]] = None, timeout_ms: Optional[int] = None,
                   tags: Optional[Sequence[int]] = None) -> List[Ticket]:
        """Post many reads in one call (kvx_post_batch), as an engine's step
        posts its requests: read i takes the next counts[i] ids of
        local_blocks and remote_blocks (all reads' ids one after another, as
        lists or arrays: each is converted once, not per read), from peer
        (one for all, or one per read), with notify_ids[i] and tags[i] if
        given. Reads go in order; if one is refused, those before it are
        posted and the error raised says how many (its .posted) and why.
        On the CUDA backend the reads of one call go in one kernel launch."""
        la, laddr, n = _u32_ids(local_blocks)
        ra, raddr, m = _u32_ids(remote_blocks)
        k = len(counts)
        if n != m or sum(counts) != n:
            raise ArgumentError("read_batch: %d local and %d remote block ids for counts summing to %d" % (n, m, sum(counts)), -1)
        if cache is None:
            if not self._ctx.caches:
                raise ArgumentError("read_batch: this context has no cache registered", -1)
            cache = self._ctx.caches[0]
        peers = [peer] * k if isinstance(peer, Peer) else list(peer)
        if len(peers) != k or (notify_ids is not None and len(notify_ids) != k) or (tags is not None and len(tags) != k):
            raise ArgumentError("read_batch: %d reads, but %d peers, %s notify ids, %s tags" % (
                k, len(peers), "no" if notify_ids is None else len(notify_ids), "no" if tags is None else len(tags)), -1)
        rds = (_Read * max(k, 1))()
        ch = cache.handle
        off = 0
        for i in range(k):
            c = int(counts[i])
            if c < 0:
                raise ArgumentError("read_batch: count %d of read %d" % (c, i), -1)
            r = rds[i]
            r.peer, r.cache, r.remote_cache, r.num_blocks = peers[i].handle, ch, remote_cache, c
            r.local_blocks, r.remote_blocks = laddr + 4 * off, raddr + 4 * off
            off += c
            if layers is not None:
                r.layer_begin, r.layer_count = layers
            if notify_ids is not None and notify_ids[i] is not None:
                r.notify, r.notify_id = 1, notify_ids[i]
            if tags is not None:
                r.user_tag = tags[i]
            if timeout_ms:
                r.timeout_ms = timeout_ms
        tickets = (C.c_uint64 * max(k, 1))()
        posted = C.c_uint32()
        st = _load().kvx_post_batch(self.handle, rds, k, tickets, C.byref(posted))  # la, ra live until it returns: it copies the tables
        if st:
            e = _error(st, self._ctx._handle, "read_batch: read %d" % posted.value)
            e.posted = [Ticket(self, t) for t in tickets[:posted.value]]  # type: ignore[attr-defined]
            raise e
        return [Ticket(self, t) for t in tickets[:k]]

    def poll(self, max_completions: int = 64) -> List[Completion]:
        """Completions reported since the last poll (each read exactly once)."""
        out = self._out if len(self._out) >= max_completions else (_Completion * max_completions)()
        self._out = out
        n = _load().kvx_poll(self.handle, out, max_completions)
        if n <= 0:
            return []
        # the records unpacked in one pass, not a ctypes object per field
        return [Completion(t, tag, st, nb, C.string_at(err).decode(errors="replace") if err else "")
                for t, tag, st, nb, err in _COMPLETION_RECORD.iter_unpack(memoryview(out).cast("B")[:n * _COMPLETION_SIZE])]

    def stream_wait(self, ticket: Ticket, stream: Any) -> None:
        """Make later work on a CUDA stream wait for the read, without
        blocking the host (kvx_stream_wait). stream: a torch.cuda.Stream (or
        anything with .cuda_stream) or a CUstream handle as an int. Works
        under torch.cuda.graph capture: the captured wait waits, at each
        replay, for the read that holds the ticket's slot (ticket % depth)."""
        handle = getattr(stream, "cuda_stream", stream)
        if not cuda_available():
            raise UnsupportedError("stream_wait: the loaded library has no CUDA: %s" % (_CUDA_WHY or library_path()), -3)
        _check(_load().kvx_stream_wait(self.handle, ticket.ticket, C.c_void_p(int(handle or 0))), self._ctx._handle, "stream_wait")

    def stream_status_ptr(self, ticket: Ticket) -> int:
        """The device-visible address of the completion word of the ticket's
        slot: (ticket << 2) | state, state 1 done, 2 failed. Kernels that
        follow a stream_wait check it (see stream_status_tensor)."""
        p = _load().kvx_stream_status_ptr(self.handle, ticket.ticket)
        if not p:
            _raise(-1, self._ctx._handle, "stream_status_ptr")
        return int(p)

    def stream_status_tensor(self, ticket: Ticket) -> Any:
        """The completion word of the ticket's slot as a one-element int64
        torch CUDA tensor (a view, no copy), for torch code that checks on
        the GPU, behind stream_wait, that the read it waited for succeeded."""
        import torch  # only where torch with CUDA is what the caller uses

        class _Word:
            __cuda_array_interface__ = {"shape": (1,), "typestr": "<i8", "data": (self.stream_status_ptr(ticket), False),
                                        "version": 2}
        return torch.as_tensor(_Word(), device="cuda")

    def destroy(self) -> None:
        if self._h is not None and self._ctx._h is not None:
            _load().kvx_queue_destroy(self._h)
        self._h = None


class Context:
    """One per engine rank: its name, tensor-parallel rank and size, backend
    ("ucx", "ofi", "cuda", "local"; None: UCX where it is built in, else
    libfabric, else CUDA: the first of kvx.backends()), and the default
    deadline of its reads. A context manager; close() releases everything it made."""

    def __init__(self, name: str = "kvx", tp_rank: int = 0, tp_size: int = 1, backend: Optional[str] = None,
                 progress_thread: bool = True, timeout_ms: int = 30000, host_id: Optional[str] = None,
                 transport_policy: Optional[str] = None, metadata_key: Optional[bytes] = None,
                 net_devices: Optional[str] = None, log_level: Optional[str] = None,
                 ucx_connections: int = 0) -> None:
        """transport_policy: which transports add_peer accepts ("!sw" refuses
        software-served paths, "ipc,rdma" demands one of those; see kvx.h's
        kvx_ctx_desc); None: $KVX_TRANSPORT_POLICY, else any.
        metadata_key: a deployment key (16 bytes or more): metadata is signed
        with it and must be signed by it; None: the file $KVX_METADATA_KEY_FILE
        names, else none. net_devices: UCX's devices that peers reach ("eth1",
        "lo"); None: $UCX_NET_DEVICES, else the default route's device.
        log_level: what kvx logs to stderr: "off", "error", "warn", "info",
        "debug"; None: $KVX_LOG, else "warn". Errors raised to the caller are
        not logged again below "info". ucx_connections: how many connections
        kvx's get spreads a peer's reads over (1 to 8; several only where
        both sides run UCX 1.22 or later); 0: $KVX_UCX_CONNECTIONS, else by
        the peer: 4 to a peer on another host over TCP, 1 to any other."""
        lib = _load()
        if backend not in _BACKENDS:
            raise ArgumentError("backend %r: use one of ucx, ofi, cuda, local (or None)" % (backend,), -1)
        d = _CtxDesc()
        self._name = name.encode()
        self._host = host_id.encode() if host_id else None
        d.name = self._name
        d.tp_rank, d.tp_size = int(tp_rank), int(tp_size)
        d.backend = _BACKENDS[backend]
        d.timeout_ms = int(timeout_ms)
        d.progress_thread = 1 if progress_thread else 0
        if log_level is not None:
            levels = {"off": 1, "none": 1, "error": 2, "warn": 3, "warning": 3, "info": 4, "debug": 5}
            if str(log_level).lower() not in levels:
                raise ArgumentError("log_level %r: use one of off, error, warn, info, debug" % (log_level,), -1)
            d.log_level = levels[str(log_level).lower()]
        d.host_id = self._host
        self._policy = transport_policy.encode() if transport_policy is not None else None
        d.transport_policy = self._policy
        if metadata_key is not None:
            self._key = bytes(metadata_key)
            d.metadata_key, d.metadata_key_len = self._key, len(self._key)
        self._devices = net_devices.encode() if net_devices is not None else None
        d.ucx.net_devices = self._devices
        if not 0 <= int(ucx_connections) <= 8:
            raise ArgumentError("ucx_connections %r: 1 to 8, or 0 (by the peer)" % (ucx_connections,), -1)
        d.ucx.connections = int(ucx_connections)
        h = C.c_void_p()
        st = lib.kvx_ctx_create(C.byref(d), C.byref(h))
        if st != _OK:
            _raise(st, None, "Context", lib.kvx_ctx_error(None).decode(errors="replace"))
        self._h: Optional[int] = h.value
        self.name, self.tp_rank, self.tp_size = name, tp_rank, tp_size
        self.caches: List[Cache] = []
        self.peers: List[Peer] = []
        self.queues: List[Queue] = []

    @property
    def _handle(self) -> Optional[int]:
        return self._h

    @property
    def handle(self) -> int:
        if self._h is None:
            raise ArgumentError("the context is closed", -1)
        return self._h

    def register_cache(self, kv_caches: Any, layout: Optional[str] = "NHD", total_heads: Optional[int] = None,
                       checksums: bool = False, generations: bool = False, block_size: Optional[int] = None) -> Cache:
        """Register a KV cache as it lies, without a copy: one tensor or array
        per layer (a list; a single one is one layer), or vLLM's dict of them
        (layer name to tensor, in the model's order), as vLLM hands a
        connector. layout: vLLM's name -- "NHD" or "HND" ([2, blocks, ...]
        two-plane layers, or 4-d one-plane views with K and V side by side),
        "LBHNC", "LBNHC", the block-outermost "BLHNC", "BLNHC", "BHLNC",
        "LHBNC" (per-layer views of one buffer: their strides are read), or
        "MLA"; None infers it from shapes and strides (block_size tells
        tokens from heads). A form kvx cannot read is refused naming its shape
        and strides. total_heads: the model's KV heads, when fewer than
        tp_size (replicated heads)."""
        if isinstance(kv_caches, dict):
            items = list(kv_caches.values())
        else:
            items = list(kv_caches) if isinstance(kv_caches, (list, tuple)) else [kv_caches]
        if not items:
            raise ArgumentError("register_cache: no tensors", -1)
        infos = [_TensorInfo(t) for t in items]
        f = _layout_of(infos, layout, block_size)
        lay = f.lay
        if infos[0].cuda and not cuda_available():
            raise UnsupportedError("register_cache: CUDA tensors need kvx with CUDA, and %s loaded %s: %s"
                                   % (__name__, os.path.basename(library_path()), _CUDA_WHY or "it has no CUDA"), -3)
        if total_heads is not None and f.name != "MLA":
            lay.total_heads = int(total_heads)
        bases = (C.c_void_p * len(f.bases))(*f.bases)
        d = _CacheDesc()
        d.layout = lay
        d.mem = 1 if infos[0].cuda else 0
        d.device = max(infos[0].device, 0)
        d.bases = bases
        d.block_stride = f.block_stride
        d.head_stride = f.head_stride
        d.token_stride = f.token_stride
        d.checksums = 1 if checksums else 0
        d.generations = 1 if generations else 0
        h = C.c_void_p()
        _check(_load().kvx_cache_register(self.handle, C.byref(d), C.byref(h)), self._h, "register_cache")
        c = Cache(self, _made(h), items, f.name, lay, len(self.caches))
        self.caches.append(c)
        return c

    def metadata(self) -> bytes:
        """This context's metadata: ship it to readers, who pass it to add_peer."""
        lib = _load()
        n = C.c_size_t(0)
        _check(lib.kvx_metadata(self.handle, None, C.byref(n)), self._h, "metadata")
        buf = C.create_string_buffer(n.value)
        _check(lib.kvx_metadata(self.handle, buf, C.byref(n)), self._h, "metadata")
        return buf.raw[:n.value]

    def add_peer(self, metadata: bytes) -> Peer:
        """Import another context's metadata and connect to it."""
        if not isinstance(metadata, (bytes, bytearray)):
            raise ArgumentError("add_peer: metadata must be bytes, not %s" % type(metadata).__name__, -1)
        h = C.c_void_p()
        _check(_load().kvx_peer_add(self.handle, bytes(metadata), len(metadata), C.byref(h)), self._h, "add_peer")
        p = Peer(self, _made(h))
        self.peers.append(p)
        return p

    def queue(self, depth: int = 0, max_ops: int = 0, cuda_stream: Any = None) -> Queue:
        """An async read queue (depth: reads in flight; max_ops: transport operations)."""
        d = _QueueDesc()
        d.depth, d.max_ops = int(depth), int(max_ops)
        if cuda_stream is not None:
            d.cuda.stream = int(getattr(cuda_stream, "cuda_stream", cuda_stream))
        h = C.c_void_p()
        _check(_load().kvx_queue_create(self.handle, C.byref(d), C.byref(h)), self._h, "queue")
        q = Queue(self, _made(h))
        self.queues.append(q)
        return q

    def expect(self, notify_id: int, timeout_ms: int, retire: Optional[Tuple[Cache, Sequence[int]]] = None,
               readers: int = 1) -> None:
        """Owner side: a lease. readers notifications of notify_id should
        arrive within timeout_ms; each is delivered as it comes, and one
        expired notification stands for the readers that never came.
        retire=(cache, blocks): at expiry those blocks are retired too, so a
        late reader gets StaleError."""
        if retire is None:
            _check(_load().kvx_notify_expect_readers(self.handle, int(notify_id), int(readers), int(timeout_ms), None, None, 0),
                   self._h, "expect")
            return
        cache, blocks = retire
        arr, n = _u32_array(blocks)
        _check(_load().kvx_notify_expect_readers(self.handle, int(notify_id), int(readers), int(timeout_ms), cache.handle, arr, n),
               self._h, "expect")

    def notifications(self, max_notifications: int = 256) -> List[Notification]:
        out = (_Notification * max_notifications)()
        n = _load().kvx_notifications(self.handle, out, max_notifications)
        return [Notification(int(x.id), int(x.status), int(x.peer_rank), int(x.peer_tp_size)) for x in out[:max(n, 0)]]

    def progress(self) -> int:
        return int(_load().kvx_progress(self.handle))

    def rotate(self) -> None:
        """A new epoch and secret, and the caches registered anew: every reader
        of metadata taken before is cut off until it adds the metadata() now."""
        _check(_load().kvx_ctx_rotate(self.handle), self._h, "rotate")

    def stats(self) -> Dict[str, Any]:
        s = _Stats()
        _load().kvx_stats_get(self.handle, C.byref(s))
        out: Dict[str, Any] = {f[0]: int(getattr(s, f[0])) for f in _Stats._fields_[1:]}
        out["backend"] = s.backend.decode() if s.backend else ""
        return out

    def close(self) -> None:
        """Destroy the context: its queues, peers and caches, in that order;
        the caches then let go of their tensors."""
        if self._h is None:
            return
        lib = _load()
        for q in self.queues:
            q.destroy()
        for p in self.peers:
            p.remove()
        for c in reversed(self.caches):
            c.deregister()
        lib.kvx_ctx_destroy(self._h)
        self._h = None

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
