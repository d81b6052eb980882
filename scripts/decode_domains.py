#!/usr/bin/env python3
"""Turn the packaged sources of the broader text domains into plain UTF-8 documents (standard library
only), each domain split into training and held-out documents.

Usage (scripts/setup.sh runs these; OUT_DIR must not exist yet):
  decode_domains.py man MAN_DIR OUT_DIR           # man pages (troff, *.gz) rendered to text
  decode_domains.py dictd DICT_DZ INDEX OUT_DIR   # a dictd dictionary, one document per initial
  decode_domains.py wheel WHEEL PREFIX OUT_DIR    # the .py files of a wheel under PREFIX
  decode_domains.py bible BIBLE_TXT OUT_DIR       # data/text/kjv/bible.txt, one document per book

Each writes OUT_DIR/train/*.txt and OUT_DIR/heldout/*.txt (flat folders, names in C order).

The held-out split, the same rule for every domain: sort the documents by the SHA-256 of
"<domain>/<document name>" and hold out the first ceil(n / 8) (at least 2). It depends on the names
only, so it is stable when a document's text changes, and setup.sh's manifest hashes fix the result.
"""

import gzip
import hashlib
import math
import os
import re
import sys
import zipfile

HELDOUT_EVERY = 8  # one document in eight is held out


def split_heldout(domain, names):
    """The set of names held out for evaluation (see the module docstring)."""
    k = max(2, math.ceil(len(names) / HELDOUT_EVERY))
    if len(names) <= k:
        sys.exit(f"decode_domains.py: {domain} has {len(names)} documents, too few to hold {k} out")
    key = lambda n: hashlib.sha256(f"{domain}/{n}".encode()).hexdigest()
    return set(sorted(names, key=key)[:k])


def write_split(domain, docs, out_dir):
    """docs: {file name: text}. Writes OUT_DIR/{train,heldout}/name (UTF-8, LF line ends)."""
    if os.path.exists(out_dir):
        sys.exit(f"decode_domains.py: {out_dir} already exists")
    held = split_heldout(domain, sorted(docs))
    for part in ("train", "heldout"):
        os.makedirs(os.path.join(out_dir, part))
    for name, text in docs.items():
        if "/" in name or not name.endswith(".txt"):
            sys.exit(f"decode_domains.py: bad document name {name!r} in {domain}")
        part = "heldout" if name in held else "train"
        with open(os.path.join(out_dir, part, name), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    print(f"{domain}: {len(docs) - len(held)} training and {len(held)} held-out documents, "
          f"{sum(len(t.encode()) for t in docs.values())} bytes")


# --- man pages: a renderer for the man(7) macros the Linux man-pages project uses ----------------
# What a reader of `man` sees, as plain text: section headings on lines of their own, paragraphs
# joined into one line each, example and no-fill blocks kept line by line, fonts dropped. Tables
# (.TS/.TE, tbl input) are dropped: in this package they are mostly character-set code charts,
# which would dominate the text with hex numbers. Unknown requests are dropped too.

# \(xx and \[xx] glyph names seen in the package, after groff_char(7).
GLYPHS = {
    "em": "\u2014", "en": "\u2013", "hy": "-", "aq": "'", "dq": '"', "bu": "\u2022",
    "lq": "\u201c", "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "co": "\u00a9",
    "rg": "\u00ae", "tm": "\u2122", "rs": "\\", "ti": "~", "ha": "^", "mu": "\u00d7",
    "di": "\u00f7", "de": "\u00b0", "+-": "\u00b1", ">=": "\u2265", "<=": "\u2264",
    "!=": "\u2260", "->": "\u2192", "<-": "\u2190", "ga": "`", "ul": "_", "sl": "/",
    "ba": "|", "or": "|", "at": "@", "sh": "#", "Do": "$", "ct": "\u00a2", "Po": "\u00a3",
    "Eu": "\u20ac", "Ye": "\u00a5", "sc": "\u00a7", "ps": "\u00b6", "dg": "\u2020",
    "aa": "\u00b4", "a-": "\u00af", "ff": "ff", "fi": "fi", "fl": "fl", "pc": "\u00b7",
    "*a": "\u03b1", "*b": "\u03b2", "*m": "\u03bc", "*p": "\u03c0", "12": "\u00bd",
    "14": "\u00bc", "34": "\u00be", "ss": "\u00df", "'e": "\u00e9", ":u": "\u00fc",
    ":o": "\u00f6", ":a": "\u00e4", "oa": "\u00e5", "-D": "\u00d0", "TP": "\u00de",
    "Fo": "\u00ab", "Fc": "\u00bb", "fo": "\u2039", "fc": "\u203a", "tno": "~",
    "lB": "[", "rB": "]", "lC": "{", "rC": "}", "la": "\u27e8", "ra": "\u27e9",
}
# \*x and \*(xx strings: man(7) predefines these.
STRINGS = {"R": "\u00ae", "(Tm": "\u2122", "(lq": "\u201c", "(rq": "\u201d", "S": ""}

ESCAPE = re.compile(
    r"""\\(?:
        \((?P<g2>..)                     # \(xx glyph
      | \[(?P<gb>[^\]]*)\]               # \[name] glyph
      | \*(?:\((?P<s2>..)|\[(?P<sb>[^\]]*)\]|(?P<s1>.))  # \*x \*(xx \*[name] string
      | f(?:\(..|\[[^\]]*\]|.)           # \fB \f(CW \f[B]: font change
      | s[-+]?(?:\d\d?|\(\d\d|\[\d+\])   # \s-1: size change
      | [hvwlLNbDoXxZRk]'[^']*'          # escapes with a quoted argument: dropped
      | (?P<ch>.)                        # one-character escapes
    )""",
    re.VERBOSE,
)
ONE_CHAR = {"-": "-", "e": "\\", "\\": "\\", ".": ".", "'": "'", "`": "`", " ": " ", "~": " ",
            "0": " ", "t": "\t", "&": "", "%": "", "|": "", "^": "", ":": "", "c": "", "/": "",
            ",": "", "!": "", "}": "", "{": "", "a": "", "d": "", "u": "", "p": "", "r": "",
            "z": ""}


def unescape(s):
    def sub(m):
        if m.group("g2") is not None:
            return GLYPHS.get(m.group("g2"), "")
        if m.group("gb") is not None:
            g = m.group("gb")
            if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", g):
                return chr(int(g[1:], 16))
            return GLYPHS.get(g, "")
        for k in ("s2", "sb", "s1"):
            if m.group(k) is not None:
                return STRINGS.get(("(" if k == "s2" else "") + m.group(k), "")
        ch = m.group("ch")
        if ch is not None:
            return ONE_CHAR.get(ch, ch)
        return ""  # font, size and quoted-argument escapes

    return ESCAPE.sub(sub, s)


def macro_args(rest):
    """Arguments of a request line: blank-separated, "double quotes" group words."""
    args, cur, quoted, i = [], "", False, 0
    while i < len(rest):
        c = rest[i]
        if c == "\\" and i + 1 < len(rest):
            cur += rest[i : i + 2]
            i += 2
            continue
        if c == '"':
            if quoted and rest[i + 1 : i + 2] == '"':
                cur += '"'
                i += 2
                continue
            quoted = not quoted
        elif c in " \t" and not quoted:
            if cur:
                args.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    if cur:
        args.append(cur)
    return args


def strip_comment(line):
    """Drops a \\" comment (but not an escaped backslash followed by a quote)."""
    i = 0
    while i < len(line):
        if line[i] == "\\":
            if line[i + 1 : i + 2] == '"':
                return line[:i]
            i += 2
            continue
        i += 1
    return line


BREAKS = {"PP", "LP", "P", "sp", "br", "TP", "TQ", "HP", "IP", "RS", "RE", "in", "ti",
          "INDENT", "UNINDENT", "SY", "YS", "ne"}
TEXT_MACROS = {"B", "I", "SM", "SB"}
ALTERNATING = {"BR", "IR", "RB", "RI", "BI", "IB"}


def render_man(src, name):
    """Plain text of one man page; None for a page that only points at another (.so)."""
    out, para = [], []
    nofill = table = False
    skip_def = False
    url = None
    trap_next = False  # .TP: the next text line is the tag, a line of its own

    def flush():
        if para:
            out.append(" ".join(para))
            para.clear()

    def blank():
        flush()
        if out and out[-1] != "":
            out.append("")

    def text(t):
        nonlocal trap_next
        if nofill:
            out.append(t.rstrip())
        elif trap_next:
            flush()
            out.append(t.strip())
            trap_next = False
        elif t.strip():
            para.append(t.strip())
        else:
            blank()

    for raw in src.splitlines():
        if skip_def:
            if raw.startswith(".."):
                skip_def = False
            continue
        if table:
            if raw.startswith(".TE"):
                table = False
            continue
        if raw[:1] in (".", "'"):
            line = strip_comment(raw[1:]).strip()
            if not line:
                continue
            req, _, rest = line.partition(" ")
            if req in ("\\\"", ""):
                continue
            args = macro_args(rest)
            if req == "so":
                return None
            if req in ("de", "de1", "am"):
                skip_def = True
            elif req == "TS":
                table = True
            elif req in ("SH", "SS"):
                blank()
                out.append(unescape(" ".join(args)))
                trap_next = False
            elif req in ("nf", "EX"):
                flush()
                nofill = True
            elif req in ("fi", "EE"):
                nofill = False
            elif req in TEXT_MACROS:
                if args:
                    text(unescape(" ".join(args)))
            elif req in ALTERNATING:
                text(unescape("".join(args)))
            elif req == "UR":
                url = unescape(args[0]) if args else None
            elif req == "UE":
                if url:
                    para.append(f"<{url}>" + unescape("".join(args)))
                url = None
            elif req in BREAKS:
                if req in ("PP", "LP", "P", "sp", "HP"):
                    blank()
                else:
                    flush()
                if req in ("TP", "TQ"):
                    trap_next = True
                elif req == "IP" and args:
                    out.append(unescape(args[0]))
            # everything else (TH, PD, ft, ad, nh, hy, if, ie, el, nr, ds, ta, q...) is dropped
            continue
        text(unescape(strip_comment(raw)))
    flush()
    while out and out[-1] == "":
        out.pop()
    while out and out[0] == "":
        out.pop(0)
    if not out:
        sys.exit(f"decode_domains.py: man page {name} rendered to nothing")
    return "\n".join(out) + "\n"


def cmd_man(man_dir, out_dir):
    docs = {}
    for section in sorted(os.listdir(man_dir)):
        sdir = os.path.join(man_dir, section)
        if not (section.startswith("man") and os.path.isdir(sdir)):
            continue
        for f in sorted(os.listdir(sdir)):
            path = os.path.join(sdir, f)
            if os.path.islink(path) or not f.endswith(".gz"):
                continue  # links are other names of a page already read
            with gzip.open(path, "rb") as g:
                src = g.read().decode("utf-8")
            text = render_man(src, path)
            if text is not None:
                docs[f[: -len(".gz")] + ".txt"] = text
    write_split("man_pages", docs, out_dir)


# --- dictd dictionaries -----------------------------------------------------------------------
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_number(s):
    """dictd's index numbers: base 64, most significant digit first."""
    n = 0
    for c in s:
        n = n * 64 + B64.index(c)
    return n


def cmd_dictd(dict_dz, index, out_dir):
    # A .dict.dz is gzip with a random-access table in an extra field; plain gzip reads it whole.
    with gzip.open(dict_dz, "rb") as g:
        data = g.read()
    entries = {}  # offset -> body; several headwords (aliases) can share one entry
    with open(index, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                sys.exit(f"decode_domains.py: {index}:{ln}: expected headword, offset, length")
            if parts[0].startswith("00-database") or parts[0].startswith("00database"):
                continue
            off, length = dictd_number(parts[1]), dictd_number(parts[2])
            if off + length > len(data):
                sys.exit(f"decode_domains.py: {index}:{ln}: entry {parts[0]!r} ends at "
                         f"{off + length}, past the {len(data)} bytes of {dict_dz}")
            entries[off] = data[off : off + length].decode("utf-8")
    # One document per two-letter start of the entry's first line (its headword; "ab", "ac",
    # ..., a single letter when the second character is not one, digits and symbols together),
    # entries in dictionary order, separated by a blank line. Letters alone would make 27
    # documents of very different sizes, so the held-out share would hang on a few of them.
    groups = {}
    for off in sorted(entries):
        body = entries[off].strip("\n")
        lines = body.split("\n")
        head = lines[0].strip()
        # The body is indented by the dictd formatter; {braces} mark cross-references.
        rest = [ln[3:] if ln.startswith("   ") else ln.strip() for ln in lines[1:]]
        entry = "\n".join([head] + rest).replace("{", "").replace("}", "").strip()
        c = head[:2].lower()
        if not "a" <= c[:1] <= "z":
            key = "0_symbols"
        elif len(c) == 2 and "a" <= c[1] <= "z":
            key = c
        else:
            key = c[:1]
        groups.setdefault(key, []).append(entry)
    docs = {f"{k}.txt": "\n\n".join(v) + "\n" for k, v in groups.items()}
    write_split("foldoc", docs, out_dir)


# --- source code from a wheel -----------------------------------------------------------------
def cmd_wheel(wheel, prefix, out_dir):
    docs = {}
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            n = info.filename
            if not (n.startswith(prefix) and n.endswith(".py")) or info.file_size == 0:
                continue
            text = z.read(n).decode("utf-8").replace("\r\n", "\n")
            docs[n.replace("/", ".") + ".txt"] = text  # a/b/c.py -> a.b.c.py.txt
    if not docs:
        sys.exit(f"decode_domains.py: no .py files under {prefix} in {wheel}")
    write_split(os.path.basename(prefix.rstrip("/")), docs, out_dir)


# --- the King James Bible, one document per book -----------------------------------------------
def cmd_bible(bible_txt, out_dir):
    # bible.txt has a "Book N" heading per chapter ("Song of Solomon 3", "1 Kings 12") and
    # indented verses; a book starts where the heading's name changes.
    heading = re.compile(r"^(\S.*) (\d+)$")
    books, order = {}, []
    current = None
    with open(bible_txt, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for ln, line in enumerate(lines, 1):
        m = heading.match(line)
        if m:
            if m.group(1) != current:
                current = m.group(1)
                if current in books:
                    sys.exit(f"decode_domains.py: {bible_txt}:{ln}: book {current!r} starts twice")
                books[current] = []
                order.append(current)
        elif current is None:
            if line.strip():
                sys.exit(f"decode_domains.py: {bible_txt}:{ln}: text before the first heading")
            continue
        books[current].append(line)
    if len(order) != 66:
        sys.exit(f"decode_domains.py: {bible_txt} has {len(order)} books, expected 66")
    docs = {}
    for i, b in enumerate(order, 1):
        slug = re.sub(r"[^a-z0-9]+", "_", b.lower()).strip("_")
        docs[f"{i:02d}_{slug}.txt"] = "\n".join(books[b]).strip("\n") + "\n"
    write_split("kjv_books", docs, out_dir)


def main(argv):
    cmds = {"man": (cmd_man, 2), "dictd": (cmd_dictd, 3), "wheel": (cmd_wheel, 3),
            "bible": (cmd_bible, 2)}
    if len(argv) < 2 or argv[1] not in cmds or len(argv) - 2 != cmds[argv[1]][1]:
        sys.exit(__doc__)
    fn, _ = cmds[argv[1]]
    fn(*argv[2:])


if __name__ == "__main__":
    main(sys.argv)
