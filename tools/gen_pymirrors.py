#!/usr/bin/env python3
"""Writes python/kvx/_structs.py: the ctypes mirrors of kvx's public structs,
read from the headers' declarations (typedef struct kvx_x { ... } kvx_x;).

    python3 tools/gen_pymirrors.py           write it (only where it changed)
    python3 tools/gen_pymirrors.py --check   exit 1 with a diff where the file
                                             in the tree is not what this makes

Mirrors written by hand were checked by size only, which passes two fields of
one size swapped; generated ones follow the header, and the package compares
each field with the library's kvx_abi_fields() at load. Standard library only.
"""
from __future__ import annotations

import argparse
import difflib
import glob
import os
import re
import sys
import textwrap
from typing import Dict, List, Optional, Tuple

OUT = os.path.join("python", "kvx", "_structs.py")

# The package's names for the structs (kept from the mirrors it had). An
# unnamed sub-struct is named by its path. A public struct missing here
# stops the generator: a binding's name is a choice, not a guess.
PY_NAMES = {
    "kvx_ofi_desc": "_OfiDesc",
    "kvx_ucx_desc": "_UcxDesc",
    "kvx_cuda_desc": "_CudaDesc",
    "kvx_ctx_desc": "_CtxDesc",
    "kvx_layout": "_Layout",
    "kvx_cache_desc": "_CacheDesc",
    "kvx_queue_desc": "_QueueDesc",
    "kvx_queue_desc.cuda": "_QueueCuda",
    "kvx_read": "_Read",
    "kvx_completion": "_Completion",
    "kvx_notification": "_Notification",
    "kvx_stats": "_Stats",
    "kvx_abi_field": "_AbiField",
}

# Fields whose ctypes type is not the plain mapping, and why. Each must name
# a field that exists, so a rename in the header is not silently dropped.
OVERRIDES = {
    ("kvx_cache_desc", "bases"): ("C.POINTER(C.c_void_p)", "an array of layer bases the package builds with (c_void_p * n)"),
    ("kvx_ctx_desc", "metadata_key"): ("C.c_char_p", "the package assigns the key as bytes, which a c_void_p field refuses"),
    ("kvx_read", "local_blocks"): ("C.c_void_p", "addresses: block ids are passed without a ctypes cast"),
    ("kvx_read", "remote_blocks"): ("C.c_void_p", "addresses: block ids are passed without a ctypes cast"),
    ("kvx_read", "remote_generations"): ("C.c_void_p", "an address (C.addressof of the package's array)"),
}

SCALARS = {
    "char": "C.c_char", "signed char": "C.c_byte", "unsigned char": "C.c_ubyte",
    "short": "C.c_short", "unsigned short": "C.c_ushort", "int": "C.c_int", "unsigned": "C.c_uint",
    "unsigned int": "C.c_uint", "long": "C.c_long", "unsigned long": "C.c_ulong", "long long": "C.c_longlong",
    "unsigned long long": "C.c_ulonglong", "signed": "C.c_int", "signed int": "C.c_int", "float": "C.c_float", "double": "C.c_double", "_Bool": "C.c_bool",
    "bool": "C.c_bool", "size_t": "C.c_size_t", "ssize_t": "C.c_ssize_t",
    "int8_t": "C.c_int8", "int16_t": "C.c_int16", "int32_t": "C.c_int32", "int64_t": "C.c_int64",
    "uint8_t": "C.c_uint8", "uint16_t": "C.c_uint16", "uint32_t": "C.c_uint32", "uint64_t": "C.c_uint64",
    "intptr_t": "C.c_ssize_t", "uintptr_t": "C.c_size_t",
}
QUALIFIERS = {"const", "volatile", "restrict"}

_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|/\*.*?\*/|//[^\n]*|#[^\n]*(?:\\\n[^\n]*)*|\w+|\S', re.S)


class GenError(Exception):
    pass


def tokens(text: str) -> Tuple[List[str], Dict[str, int]]:
    """C tokens without comments and preprocessor lines; and the integer
    #defines, for array sizes."""
    toks: List[str] = []
    defines: Dict[str, int] = {}
    for m in _TOKEN.finditer(text):
        t = m.group(0)
        if t.startswith("/*") or t.startswith("//"):
            continue
        if t.startswith("#"):
            d = re.match(r"#\s*define\s+(\w+)\s+\(?\s*(0x[0-9a-fA-F]+|\d+)[uUlL]*\s*\)?\s*$", t)
            if d:
                defines[d.group(1)] = int(d.group(2), 0)
            continue
        toks.append(t)
    return toks, defines


def public_part(path: str) -> str:
    """kvx.h's declarations end at its include guard; the other headers are
    the implementation's rooms, read whole for a public struct put there."""
    with open(path) as f:
        text = f.read()
    if os.path.basename(path) == "kvx.h":
        end = text.find("#endif /* KVX_INCLUDED */")
        if end < 0:
            raise GenError("kvx.h: no '#endif /* KVX_INCLUDED */' to end the public declarations at")
        text = text[:end]
    return text


def matching(toks: List[str], i: int) -> int:
    """The index of the brace that closes the one at toks[i]."""
    depth = 0
    for j in range(i, len(toks)):
        if toks[j] == "{":
            depth += 1
        elif toks[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    raise GenError("unbalanced braces")


def is_public(name: str) -> bool:
    return name.startswith("kvx_") and not name.startswith("kvx__")


class Field:
    def __init__(self, name: str, ctype: str, pytype: str, note: str = "") -> None:
        self.name, self.ctype, self.pytype, self.note = name, ctype, pytype, note


class Struct:
    def __init__(self, cname: str, header: str) -> None:
        self.cname, self.header = cname, header
        self.fields: List[Field] = []


class Headers:
    """What the public headers declare: enums, typedefs, structs in order."""

    def __init__(self, root: str) -> None:
        self.enums = set()  # type: set
        self.typedefs: Dict[str, Tuple[List[str], int, bool]] = {}  # name -> (spec, pointer depth, function pointer)
        self.opaque = set()  # type: set
        self.defines: Dict[str, int] = {}
        self.structs: List[Struct] = []
        self.by_name: Dict[str, Struct] = {}
        paths = [os.path.join(root, "kvx.h")] + sorted(p for p in glob.glob(os.path.join(root, "kvx_*.h")))
        if not os.path.exists(paths[0]):
            raise GenError("%s: no kvx.h" % root)
        for p in paths:
            toks, defs = tokens(public_part(p))
            self.defines.update(defs)
            self._scan(toks, os.path.basename(p))

    def _scan(self, toks: List[str], header: str) -> None:
        i = 0
        while i < len(toks):
            if toks[i] != "typedef":
                i += 1
                continue
            j = i + 1
            if j < len(toks) and toks[j] in ("struct", "enum", "union"):
                kind = toks[j]
                tag = toks[j + 1] if toks[j + 1] != "{" else None
                k = j + (2 if tag else 1)
                if toks[k] == "{":
                    close = matching(toks, k)
                    name = toks[close + 1]
                    if kind == "enum":
                        self.enums.add(name)
                    elif is_public(name):
                        if kind == "union":
                            raise GenError("%s: union %s: the generator does not mirror unions" % (header, name))
                        self._struct(name, toks[k + 1:close], header)
                    i = close + 2
                    continue
                # typedef struct kvx_ctx kvx_ctx; and the like
                semi = toks.index(";", k)
                (self.enums if kind == "enum" else self.opaque).add(toks[semi - 1])
                i = semi + 1
                continue
            semi = toks.index(";", j)
            decl = toks[j:semi]
            if "(" in decl:  # typedef R (*name)(args); a function type itself is not a field's type
                k = decl.index("(")
                if decl[k + 1:k + 2] == ["*"] and len(decl) > k + 2:
                    self.typedefs[decl[k + 2]] = ([], 1, True)
            elif decl:
                name = decl[-1]
                pre = decl[:-1]
                self.typedefs[name] = ([t for t in pre if t != "*" and t not in QUALIFIERS], pre.count("*"), False)
            i = semi + 1

    def _struct(self, cname: str, body: List[str], header: str) -> None:
        s = Struct(cname, header)
        members = self._members(body)
        for m in members:
            if m[0] in ("struct", "union") and "{" in m[:3]:
                k = m.index("{")
                close = matching(m, k)
                if k == 2 and m[1] != "{":
                    raise GenError("%s: %s: a sub-struct with a tag (struct %s { ... }) is not mirrored; declare it "
                                   "on its own" % (header, cname, m[1]))
                if m[0] == "union":
                    raise GenError("%s: %s: a union member: the generator does not mirror unions" % (header, cname))
                rest = m[close + 1:]
                if len(rest) != 1:
                    raise GenError("%s: %s: an unnamed sub-struct needs exactly one member name, got %r" % (header, cname, rest))
                inner = "%s.%s" % (cname, rest[0])
                self._struct(inner, m[k + 1:close], header)
                s.fields.append(Field(rest[0], "struct { ... }", self._pyname(inner)))
                continue
            spec, decls = self._declarators(m, cname, header)
            for d in decls:
                s.fields.append(self._field(cname, spec, d, header))
        if cname in self.by_name:
            raise GenError("%s: struct %s declared twice" % (header, cname))
        self.structs.append(s)
        self.by_name[cname] = s

    @staticmethod
    def _members(body: List[str]) -> List[List[str]]:
        out: List[List[str]] = []
        cur: List[str] = []
        depth = 0
        for t in body:
            if t == "{":
                depth += 1
            elif t == "}":
                depth -= 1
            if t == ";" and depth == 0:
                if cur:
                    out.append(cur)
                cur = []
                continue
            cur.append(t)
        if cur:
            raise GenError("a member without ';': %s" % " ".join(cur))
        return out

    @staticmethod
    def _declarators(m: List[str], cname: str, header: str) -> Tuple[List[str], List[List[str]]]:
        """The type specifier and each declarator of one member declaration."""
        chunks: List[List[str]] = [[]]
        depth = 0
        for t in m:
            if t in "([":
                depth += 1
            elif t in ")]":
                depth -= 1
            if t == "," and depth == 0:
                chunks.append([])
                continue
            chunks[-1].append(t)
        first = chunks[0]
        cut = next((i for i, t in enumerate(first) if t in ("*", "(")), None)
        if cut is None:  # no pointer: the name is the last word before any [
            br = first.index("[") if "[" in first else len(first)
            cut = br - 1
        if cut <= 0:
            raise GenError("%s: %s: cannot read the member '%s'" % (header, cname, " ".join(m)))
        return first[:cut], [first[cut:]] + chunks[1:]

    def _pyname(self, cname: str) -> str:
        if cname not in PY_NAMES:
            raise GenError("public struct %s has no Python name: add it to PY_NAMES in tools/gen_pymirrors.py "
                           "(and its fields to kvx_abi_fields in kvx.h)" % cname)
        return PY_NAMES[cname]

    def _dim(self, toks: List[str], where: str) -> int:
        if len(toks) == 1 and re.match(r"^(0x[0-9a-fA-F]+|\d+)[uUlL]*$", toks[0]):
            return int(re.sub(r"[uUlL]+$", "", toks[0]), 0)
        if len(toks) == 1 and toks[0] in self.defines:
            return self.defines[toks[0]]
        raise GenError("%s: array size '%s' is not a number or a #define of one" % (where, " ".join(toks)))

    def _field(self, cname: str, spec: List[str], d: List[str], header: str) -> Field:
        where = "%s: %s" % (header, cname)
        base = [t for t in spec if t not in QUALIFIERS]
        if d and d[0] == "(":  # R (*name)(args): a function pointer member
            name = d[2] if len(d) > 2 and d[1] == "*" else ""
            if not re.match(r"^\w+$", name):
                raise GenError("%s: cannot read the member '%s'" % (where, " ".join(spec + d)))
            return self._with_override(cname, Field(name, "function pointer", "C.c_void_p"))
        names = [i for i, t in enumerate(d) if re.match(r"^\w+$", t) and t not in QUALIFIERS]
        if not names:
            raise GenError("%s: a member without a name: '%s'" % (where, " ".join(spec + d)))
        at = names[0]
        name, pre, post = d[at], d[:at], d[at + 1:]
        stars = pre.count("*")
        dims: List[int] = []
        while post:
            if post[0] != "[" or "]" not in post:
                raise GenError("%s: cannot read '%s' after %s" % (where, " ".join(post), name))
            e = post.index("]")
            dims.append(self._dim(post[1:e], "%s.%s" % (where, name)))
            post = post[e + 1:]
        ctext = " ".join(spec)
        for t in pre:
            if t == "*":
                ctext += "*" if ctext.endswith("*") else " *"
            else:
                ctext += t if ctext.endswith("*") else " " + t
        py = self._pytype(base, stars, "%s.%s" % (where, name))
        for n in reversed(dims):
            py = "(%s * %d)" % (py, n)
            ctext += "[%d]" % n
        return self._with_override(cname, Field(name, ctext, py))

    def _pytype(self, base: List[str], stars: int, where: str) -> str:
        if base and base[0] in ("struct", "enum", "union"):
            kw, base = base[0], base[1:]
            if kw == "enum":
                return "C.c_void_p" if stars else "C.c_int"
        key = " ".join(base)
        if key in self.typedefs:
            spec, depth, fn = self.typedefs[key]
            if fn:
                return "C.c_void_p"
            return self._pytype(spec, stars + depth, where)
        if stars:
            return "C.c_char_p" if key == "char" and stars == 1 else "C.c_void_p"
        if key in self.enums:
            return "C.c_int"  # an enum is an int in C on every ABI kvx builds for
        if key in SCALARS:
            return SCALARS[key]
        if key in self.by_name:
            return self._pyname(key)
        raise GenError("%s: no ctypes type for '%s'" % (where, key))

    @staticmethod
    def _with_override(cname: str, f: Field) -> Field:
        o = OVERRIDES.get((cname, f.name))
        if o:
            f.pytype, f.note = o
        return f


def generate(root: str) -> str:
    h = Headers(root)
    for (sname, fname) in OVERRIDES:
        if sname not in h.by_name or all(f.name != fname for f in h.by_name[sname].fields):
            raise GenError("OVERRIDES names %s.%s, which the headers do not declare" % (sname, fname))
    for s in h.structs:
        h._pyname(s.cname)  # every public struct is named here, or the generator stops
    for cname in PY_NAMES:
        if cname not in h.by_name:
            raise GenError("PY_NAMES names %s, which the headers do not declare" % cname)
    headers = sorted({s.header for s in h.structs})
    out = ["# Generated by tools/gen_pymirrors.py from %s: do not edit. After changing a public" % ", ".join(headers),
           "# struct run python3 tools/gen_pymirrors.py (tests/run.sh checks that it was run).",
           '"""ctypes mirrors of kvx\'s public structs, field for field in the headers\' order.',
           "kvx checks every field's offset and size against the library's kvx_abi_fields()",
           'when it loads the library, and refuses a difference."""',
           "import ctypes as C",
           "",
           "__all__ = ["]
    names = ", ".join('"%s"' % n for n in [PY_NAMES[s.cname] for s in h.structs] + ["MIRRORS"])
    out += textwrap.wrap(names, 100, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False)
    out[-1] += ","
    out.append("]")
    for s in h.structs:
        out += ["", "", "class %s(C.Structure):" % PY_NAMES[s.cname], '    """%s"""' % s.cname, "    _fields_ = ["]
        for f in s.fields:
            if f.note:
                out.append("        # %s: %s" % (f.ctype, f.note))
                out.append('        ("%s", %s),' % (f.name, f.pytype))
            else:
                out.append('        ("%s", %s),  # %s' % (f.name, f.pytype, f.ctype))
        out.append("    ]")
    out += ["", "", "# The C struct each class mirrors, by the names kvx_abi_fields() gives them.", "MIRRORS = {"]
    out += ['    "%s": %s,' % (s.cname, PY_NAMES[s.cname]) for s in h.structs]
    out += ["}", ""]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 with a diff where %s is not what this makes" % OUT)
    ap.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="the repository root (kvx.h and python/)")
    a = ap.parse_args()
    path = os.path.join(a.root, OUT)
    try:
        text = generate(a.root)
    except GenError as e:
        print("gen_pymirrors: %s" % e, file=sys.stderr)
        return 2
    try:
        with open(path) as f:
            old: Optional[str] = f.read()
    except FileNotFoundError:
        old = None
    n = text.count("\n    _fields_")
    if a.check:
        if old == text:
            print("%s matches the headers (%d structs)" % (OUT, n))
            return 0
        sys.stdout.writelines(difflib.unified_diff((old or "").splitlines(True), text.splitlines(True),
                                                   OUT + " (in the tree)", OUT + " (from the headers)"))
        print("%s is %s: run python3 tools/gen_pymirrors.py" % (OUT, "missing" if old is None else "stale"))
        return 1
    if old != text:
        with open(path, "w") as f:
            f.write(text)
        print("wrote %s (%d structs)" % (OUT, n))
    else:
        print("%s is up to date (%d structs)" % (OUT, n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
