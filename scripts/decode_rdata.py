#!/usr/bin/env python3
"""Decode R serialized data (standard library only) and export Jane Austen's novels as text.

R stores package data in three containers, all built on the same serialization stream:
  * .rds  - one serialized object, usually gzip/bzip2/xz compressed;
  * .rda  - "RDX2\\n"/"RDX3\\n" magic, then a serialized pairlist name -> object (compressed as a whole);
  * lazy-load databases (name.rdx + name.rdb) - the .rdx is an .rds holding
    list(variables = list(name = c(offset, length)), references = ..., compressed = ...), and each
    record of the .rdb is a 4-byte big-endian uncompressed length followed by the compressed stream
    (zlib when compressed is TRUE; for 2/3 a type byte '2' bzip2, 'X' xz, 'Z' zlib, '0' none follows).

The serialization stream (format "X\\n", XDR = big-endian; versions 2 and 3) is a pre-order walk:
every item starts with a 32-bit flags word
    bits 0-7  SEXP type, bit 8 is-object, bit 9 has-attributes, bit 10 has-tag, bits 12-27 "levels"
followed by type-specific payload. Pairlist-like items (LISTSXP, LANGSXP, ...) carry attributes, tag,
CAR, CDR in that order; vectors carry a length and the elements, then attributes. Symbols and
environments enter a reference table that later REFSXP items index (1-based).

Decoded values (see `RVector` etc. below) keep attributes, so data frames and factors can be rebuilt.

Usage:
  decode_rdata.py list PATH                     # summary of the objects in .rds / .rda / .rdx
  decode_rdata.py text PATH NAME OUT.txt        # write character vector NAME, one element per line
  decode_rdata.py austen PKG_DIR OUT_DIR        # the six novels of r-cran-janeaustenr
"""

import bz2
import gzip
import lzma
import os
import struct
import sys
import zlib

# --- SEXP types (R internals, Rinternals.h / serialize.c) -------------------------------------
NILSXP, SYMSXP, LISTSXP, CLOSXP, ENVSXP, PROMSXP, LANGSXP = 0, 1, 2, 3, 4, 5, 6
SPECIALSXP, BUILTINSXP, CHARSXP, LGLSXP = 7, 8, 9, 10
INTSXP, REALSXP, CPLXSXP, STRSXP, DOTSXP = 13, 14, 15, 16, 17
VECSXP, EXPRSXP, BCODESXP, EXTPTRSXP, WEAKREFSXP, RAWSXP, S4SXP = 19, 20, 21, 22, 23, 24, 25
# pseudo-types that only occur in the stream
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP = 255, 254, 253, 252
MISSINGARG_SXP, BASENAMESPACE_SXP, NAMESPACESXP, PACKAGESXP = 251, 250, 249, 248
PERSISTSXP, CLASSREFSXP, GENERICREFSXP, BCREPDEF = 247, 246, 245, 244
EMPTYENV_SXP, BASEENV_SXP, ATTRLANGSXP, ATTRLISTSXP, ALTREP_SXP = 242, 241, 240, 239, 238

NA_INTEGER = -(2**31)
# CHARSXP encoding bits in "levels"
LATIN1_MASK, UTF8_MASK, BYTES_MASK, ASCII_MASK = 1 << 2, 1 << 3, 1 << 1, 1 << 6

TYPE_NAMES = {
    NILSXP: "NULL", SYMSXP: "symbol", LISTSXP: "pairlist", CLOSXP: "closure", ENVSXP: "environment",
    PROMSXP: "promise", LANGSXP: "language", CHARSXP: "char", LGLSXP: "logical", INTSXP: "integer",
    REALSXP: "double", CPLXSXP: "complex", STRSXP: "character", VECSXP: "list", EXPRSXP: "expression",
    RAWSXP: "raw", S4SXP: "S4", EXTPTRSXP: "externalptr", WEAKREFSXP: "weakref",
    SPECIALSXP: "special", BUILTINSXP: "builtin", BCODESXP: "bytecode",
}


class RDecodeError(Exception):
    pass


# --- decoded value types --------------------------------------------------------------------------
class RVector:
    """An atomic vector or a list. `values` is a Python list (NA is None); `attributes` a dict."""

    def __init__(self, sexptype, values, attributes=None):
        self.sexptype = sexptype
        self.values = values
        self.attributes = attributes or {}

    @property
    def type_name(self):
        return TYPE_NAMES.get(self.sexptype, str(self.sexptype))

    def attr(self, name, default=None):
        return self.attributes.get(name, default)

    def r_class(self):
        cls = self.attr("class")
        return list(cls.values) if isinstance(cls, RVector) else []

    def names(self):
        n = self.attr("names")
        return list(n.values) if isinstance(n, RVector) else None

    def __len__(self):
        return len(self.values)

    def __repr__(self):
        return f"RVector({self.type_name}, len={len(self.values)}, attrs={list(self.attributes)})"


class RSymbol:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"RSymbol({self.name!r})"


class RPairList:
    """A pairlist / language object: list of (tag or None, value)."""

    def __init__(self, sexptype, items, attributes=None):
        self.sexptype = sexptype
        self.items = items
        self.attributes = attributes or {}

    def as_dict(self):
        return {tag: value for tag, value in self.items}

    def __repr__(self):
        return f"RPairList({TYPE_NAMES.get(self.sexptype)}, {[t for t, _ in self.items]})"


class ROpaque:
    """Something we parse past but do not model (environments, closures, external pointers...)."""

    def __init__(self, kind, detail=None, attributes=None):
        self.kind = kind
        self.detail = detail
        self.attributes = attributes or {}

    def __repr__(self):
        return f"ROpaque({self.kind})"


# --- the stream reader ----------------------------------------------------------------------------
class Unserializer:
    def __init__(self, data):
        self.data = data
        self.pos = 0
        self.refs = []
        self.version = None

    # primitive readers (XDR = big-endian)
    def _take(self, n):
        if self.pos + n > len(self.data):
            raise RDecodeError(f"truncated stream: need {n} bytes at offset {self.pos}, have {len(self.data) - self.pos}")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def read_int(self):
        return struct.unpack(">i", self._take(4))[0]

    def read_length(self):
        n = self.read_int()
        if n == -1:  # long vector: two ints, upper and lower 32 bits
            hi, lo = struct.unpack(">II", self._take(8))
            return (hi << 32) + lo
        if n < 0:
            raise RDecodeError(f"negative vector length {n} at offset {self.pos - 4}")
        return n

    def read_header(self):
        fmt = self._take(2)
        if fmt != b"X\n":
            raise RDecodeError(f"unsupported serialization format {fmt!r} (only XDR 'X\\n' is implemented)")
        self.version = self.read_int()
        _writer_version = self.read_int()
        _min_reader = self.read_int()
        if self.version == 3:
            nelen = self.read_int()
            self.native_encoding = self._take(nelen).decode("ascii", "replace")
        elif self.version != 2:
            raise RDecodeError(f"unsupported serialization version {self.version}")

    def read_item(self):
        flags = self.read_int()
        t = flags & 0xFF
        levels = flags >> 12
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        # --- pseudo-types / singletons
        if t == NILVALUE_SXP:
            return None
        if t == REFSXP:
            idx = flags >> 8
            if idx == 0:
                idx = self.read_int()
            if not 1 <= idx <= len(self.refs):
                raise RDecodeError(f"reference {idx} out of range (table has {len(self.refs)})")
            return self.refs[idx - 1]
        if t in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP, BASENAMESPACE_SXP):
            return ROpaque({EMPTYENV_SXP: "emptyenv", BASEENV_SXP: "baseenv", GLOBALENV_SXP: "globalenv",
                            UNBOUNDVALUE_SXP: "unbound", MISSINGARG_SXP: "missingarg",
                            BASENAMESPACE_SXP: "basenamespace"}[t])
        if t in (PERSISTSXP, NAMESPACESXP, PACKAGESXP):
            strings = self._read_string_vec()
            obj = ROpaque({PERSISTSXP: "persist", NAMESPACESXP: "namespace", PACKAGESXP: "package"}[t], strings)
            self.refs.append(obj)
            return obj
        if t == SYMSXP:
            name = self.read_item()  # a CHARSXP
            obj = RSymbol(name)
            self.refs.append(obj)
            return obj
        if t == ENVSXP:
            locked = self.read_int()
            obj = ROpaque("environment", {"locked": locked})
            self.refs.append(obj)  # registered before the contents: they may refer back to it
            obj.detail["enclos"] = self.read_item()
            obj.detail["frame"] = self.read_item()
            obj.detail["hashtab"] = self.read_item()
            attrs = self.read_item()
            obj.attributes = self._attr_dict(attrs)
            return obj
        if t in (LISTSXP, LANGSXP, CLOSXP, PROMSXP, DOTSXP, ATTRLANGSXP, ATTRLISTSXP):
            return self._read_pairlist(t, has_attr, has_tag)
        if t == ALTREP_SXP:
            return self._read_altrep()
        if t in (EXTPTRSXP, WEAKREFSXP):
            obj = ROpaque(TYPE_NAMES[t])
            self.refs.append(obj)
            if t == EXTPTRSXP:
                obj.detail = (self.read_item(), self.read_item())  # prot, tag
            if has_attr:
                obj.attributes = self._attr_dict(self.read_item())
            return obj
        if t in (SPECIALSXP, BUILTINSXP):
            n = self.read_int()
            obj = ROpaque(TYPE_NAMES[t], self._take(n).decode("latin-1"))
            if has_attr:
                obj.attributes = self._attr_dict(self.read_item())
            return obj
        if t == CHARSXP:
            return self._read_charsxp(levels)
        if t == BCODESXP:
            raise RDecodeError("byte code (BCODESXP) is not supported by this decoder")

        # --- vectors: payload, then attributes
        if t in (LGLSXP, INTSXP):
            n = self.read_length()
            vals = list(struct.unpack(f">{n}i", self._take(4 * n)))
            vals = [None if v == NA_INTEGER else v for v in vals]
            if t == LGLSXP:
                vals = [None if v is None else bool(v) for v in vals]
            obj = RVector(t, vals)
        elif t == REALSXP:
            n = self.read_length()
            obj = RVector(t, list(struct.unpack(f">{n}d", self._take(8 * n))))
        elif t == CPLXSXP:
            n = self.read_length()
            raw = struct.unpack(f">{2 * n}d", self._take(16 * n))
            obj = RVector(t, [complex(raw[2 * i], raw[2 * i + 1]) for i in range(n)])
        elif t == STRSXP:
            n = self.read_length()
            obj = RVector(t, [self.read_item() for _ in range(n)])
        elif t in (VECSXP, EXPRSXP):
            n = self.read_length()
            obj = RVector(t, [self.read_item() for _ in range(n)])
        elif t == RAWSXP:
            n = self.read_length()
            obj = RVector(t, self._take(n))
        elif t == S4SXP:
            obj = ROpaque("S4")
        else:
            raise RDecodeError(f"unknown SEXP type {t} (flags 0x{flags:08x}) at offset {self.pos - 4}")
        if has_attr:
            obj.attributes = self._attr_dict(self.read_item())
        return obj

    def _read_charsxp(self, levels):
        n = self.read_int()
        if n == -1:
            return None  # NA_character_
        raw = self._take(n)
        if levels & LATIN1_MASK:
            return raw.decode("latin-1")
        if levels & BYTES_MASK:
            return raw.decode("latin-1")  # no declared encoding; keep every byte
        try:
            return raw.decode("utf-8")  # UTF8_MASK, ASCII_MASK or native (UTF-8 on Debian)
        except UnicodeDecodeError:
            return raw.decode("latin-1")

    def _read_string_vec(self):
        if self.read_int() != 0:
            raise RDecodeError("malformed persistent string vector")
        n = self.read_int()
        return [self.read_item() for _ in range(n)]

    def _read_pairlist(self, t, has_attr, has_tag):
        # Iterative over the CDR chain (long pairlists would overflow Python's recursion limit).
        items = []
        attributes = {}
        first = True
        while True:
            if has_attr:
                a = self._attr_dict(self.read_item())
                if first:
                    attributes = a
            tag = self.read_item() if has_tag else None
            if isinstance(tag, RSymbol):
                tag = tag.name
            car = self.read_item()
            items.append((tag, car))
            first = False
            # peek at the CDR: continue the loop while it is another cell of the same kind
            flags = self.read_int()
            nt = flags & 0xFF
            if nt == LISTSXP or (nt == t and t in (LANGSXP, DOTSXP)):
                has_attr = bool(flags & (1 << 9))
                has_tag = bool(flags & (1 << 10))
                continue
            self.pos -= 4
            tail = self.read_item()
            if tail is not None:
                items.append(("<cdr>", tail))
            break
        if t in (CLOSXP, PROMSXP):
            return ROpaque(TYPE_NAMES[t], items, attributes)
        return RPairList(t, items, attributes)

    def _read_altrep(self):
        info = self.read_item()
        state = self.read_item()
        attr = self.read_item()
        cls = info.items[0][1].name if isinstance(info, RPairList) and isinstance(info.items[0][1], RSymbol) else "?"
        if cls == "compact_intseq":  # state: double c(n, start, step)
            n, start, step = (int(v) for v in state.values)
            obj = RVector(INTSXP, [start + i * step for i in range(n)])
        elif cls == "compact_realseq":
            n, start, step = state.values
            obj = RVector(REALSXP, [start + i * step for i in range(int(n))])
        elif cls.startswith("wrap_"):  # state: list(x, metadata)
            inner = state.values[0]
            obj = RVector(inner.sexptype, inner.values, dict(inner.attributes))
        elif cls == "deferred_string":  # state: pairlist(arg, ...) where arg is int/real to coerce
            arg = state.items[0][1] if isinstance(state, RPairList) else state
            vals = [None if v is None else (str(v) if isinstance(v, int) else repr(v)) for v in arg.values]
            obj = RVector(STRSXP, vals)
        else:
            raise RDecodeError(f"unsupported ALTREP class {cls!r}")
        obj.attributes.update(self._attr_dict(attr))
        return obj

    def _attr_dict(self, attrs):
        if attrs is None:
            return {}
        if not isinstance(attrs, RPairList):
            raise RDecodeError(f"attributes are not a pairlist: {attrs!r}")
        return {tag: value for tag, value in attrs.items}


def unserialize(data):
    u = Unserializer(data)
    u.read_header()
    return u.read_item()


# --- containers ------------------------------------------------------------------------------------
def decompress_auto(data):
    """Decompress a whole-file stream by its magic bytes (gzip, bzip2, xz) or return it as is."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:3] == b"BZh":
        return bz2.decompress(data)
    if data[:6] == b"\xfd7zXZ\x00":
        return lzma.decompress(data)
    return data


def read_rds(path):
    with open(path, "rb") as f:
        return unserialize(decompress_auto(f.read()))


def read_rda(path):
    """An .rda/.RData file: returns {name: object}."""
    with open(path, "rb") as f:
        data = decompress_auto(f.read())
    if data[:5] not in (b"RDX2\n", b"RDX3\n"):
        raise RDecodeError(f"{path}: not an RDX2/RDX3 file (starts with {data[:5]!r})")
    obj = unserialize(data[5:])
    if not isinstance(obj, RPairList):
        raise RDecodeError(f"{path}: top-level object is not a pairlist")
    return obj.as_dict()


def _lazyload_record(blob, compressed):
    """One .rdb record: 4-byte big-endian uncompressed length, then the compressed stream."""
    (outlen,) = struct.unpack(">I", blob[:4])
    if compressed in (2, 3):
        kind, body = blob[4:5], blob[5:]
        if kind == b"Z":
            out = zlib.decompress(body)
        elif kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"X":
            out = lzma.decompress(body)
        elif kind == b"0":
            out = body
        else:
            raise RDecodeError(f"unknown lazy-load compression type {kind!r}")
    elif compressed:
        out = zlib.decompress(blob[4:])
    else:
        out = blob[4:]
    if len(out) != outlen:
        raise RDecodeError(f"lazy-load record decompressed to {len(out)} bytes, header says {outlen}")
    return out


def read_lazyload(rdx_path):
    """A lazy-load database (X.rdx + X.rdb): returns {name: object}."""
    rdb_path = rdx_path[:-4] + ".rdb"
    index = read_rds(rdx_path)
    if not isinstance(index, RVector) or index.names() is None:
        raise RDecodeError(f"{rdx_path}: index is not a named list")
    idx = dict(zip(index.names(), index.values))
    comp = idx.get("compressed")
    compressed = comp.values[0] if isinstance(comp, RVector) and comp.values else True
    compressed = int(compressed) if not isinstance(compressed, bool) else (1 if compressed else 0)
    variables = idx["variables"]
    with open(rdb_path, "rb") as f:
        rdb = f.read()
    out = {}
    for name, loc in zip(variables.names() or [], variables.values):
        offset, length = (int(v) for v in loc.values)
        if offset + length > len(rdb):
            raise RDecodeError(f"{rdb_path}: record {name!r} at {offset}+{length} beyond end ({len(rdb)})")
        out[name] = unserialize(_lazyload_record(rdb[offset:offset + length], compressed))
    return out


def read_any(path):
    """Dispatch on the file name: .rdx (lazy-load db), .rda/.RData, otherwise .rds."""
    low = path.lower()
    if low.endswith(".rdx") or low.endswith(".rdb"):
        return read_lazyload(path[:-4] + ".rdx")
    if low.endswith(".rda") or low.endswith(".rdata"):
        return read_rda(path)
    return {"<rds>": read_rds(path)}


def as_strings(obj):
    """A character vector, or a factor (integer codes + levels), as a list of str / None."""
    if isinstance(obj, RVector) and obj.sexptype == STRSXP:
        return list(obj.values)
    if isinstance(obj, RVector) and obj.sexptype == INTSXP and "factor" in obj.r_class():
        levels = obj.attr("levels").values
        return [None if c is None else levels[c - 1] for c in obj.values]
    raise RDecodeError(f"not a character vector or factor: {obj!r}")


def describe(obj):
    if isinstance(obj, RVector):
        cls = obj.r_class()
        s = f"{obj.type_name}[{len(obj)}]"
        if cls:
            s += f" class={cls}"
        if obj.sexptype == STRSXP and obj.values:
            s += f" first={obj.values[0]!r}"
        return s
    return repr(obj)


# --- the janeaustenr export ----------------------------------------------------------------------
# janeaustenr object name -> output file stem
AUSTEN_NOVELS = {
    "sensesensibility": "sense_and_sensibility",
    "prideprejudice": "pride_and_prejudice",
    "mansfieldpark": "mansfield_park",
    "emma": "emma",
    "northangerabbey": "northanger_abbey",
    "persuasion": "persuasion",
}


def write_lines(lines, out_path):
    """Lines joined with '\\n' plus a final newline; NA elements become empty lines."""
    text = "\n".join("" if s is None else s for s in lines) + "\n"
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    os.replace(tmp, out_path)
    return len(lines)


def find_austen_objects(pkg_dir):
    """Collect the novels from whatever container the package ships its data in."""
    data_dir = os.path.join(pkg_dir, "data")
    if not os.path.isdir(data_dir):
        raise RDecodeError(f"{pkg_dir}: no data/ folder")
    objects = {}
    for fn in sorted(os.listdir(data_dir)):
        p = os.path.join(data_dir, fn)
        low = fn.lower()
        if low.endswith(".rdx"):
            objects.update(read_lazyload(p))
        elif low.endswith(".rda") or low.endswith(".rdata"):
            objects.update(read_rda(p))
        elif low.endswith(".rds") and fn[:-4] in AUSTEN_NOVELS:
            objects[fn[:-4]] = read_rds(p)
    return objects


def export_austen(pkg_dir, out_dir):
    objects = find_austen_objects(pkg_dir)
    missing = [k for k in AUSTEN_NOVELS if k not in objects]
    if missing:
        raise RDecodeError(f"{pkg_dir}: objects not found: {missing} (found {sorted(objects)})")
    os.makedirs(out_dir, exist_ok=True)
    for name, stem in AUSTEN_NOVELS.items():
        lines = as_strings(objects[name])
        n_na = sum(1 for s in lines if s is None)
        path = os.path.join(out_dir, stem + ".txt")
        write_lines(lines, path)
        note = f" ({n_na} NA lines written empty)" if n_na else ""
        print(f"  {name:18s} -> {path}: {len(lines)} lines{note}")


def main(argv):
    if len(argv) >= 2 and argv[0] == "list":
        for name, obj in read_any(argv[1]).items():
            print(f"{name}: {describe(obj)}")
        return 0
    if len(argv) == 4 and argv[0] == "text":
        objects = read_any(argv[1])
        if argv[2] not in objects:
            raise RDecodeError(f"{argv[1]}: no object {argv[2]!r} (have {sorted(objects)})")
        n = write_lines(as_strings(objects[argv[2]]), argv[3])
        print(f"{argv[3]}: {n} lines")
        return 0
    if len(argv) == 3 and argv[0] == "austen":
        export_austen(argv[1], argv[2])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (RDecodeError, OSError, zlib.error, lzma.LZMAError, EOFError) as e:
        print(f"decode_rdata: error: {e}", file=sys.stderr)
        sys.exit(1)
