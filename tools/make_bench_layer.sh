#!/usr/bin/env bash
# Build a multi-GB real layer from this machine's /usr for benchmarks: OUT_DIR/usr.tar and usr.tar.gz.
# Idempotent: a finished file is skipped (files are written to *.part and renamed when complete).
# Compression is `pigz -6` (parallel, ~4x faster than gzip here). pigz writes one gzip member made of
# independent 128 KiB-input blocks joined by empty stored blocks (sync flush); the stream is standard
# deflate, so it is fine for index/read benchmarks, but its block layout differs from `gzip -6`.
# Set BENCH_GZIP=gzip to use `gzip -6` instead (single-threaded, several times slower).
set -euo pipefail

out_dir=${1:?usage: make_bench_layer.sh OUT_DIR}
compressor=${BENCH_GZIP:-pigz}
mkdir -p "$out_dir"
cd "$out_dir"

if [[ ! -f usr.tar ]]; then
    echo "building usr.tar from /usr (sorted names, fixed owner/mtime)" >&2
    # Deterministic tar: sorted names, numeric owner 0/0, fixed mtime; volatile trees excluded.
    # --ignore-failed-read: files that vanish or are unreadable while we run don't abort the build.
    tar -C / --sort=name --numeric-owner --owner=0 --group=0 \
        --mtime='2024-01-01 00:00:00Z' --format=pax \
        --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
        --exclude='usr/lib/python3*/__pycache__' --exclude='*/__pycache__' \
        --ignore-failed-read -cf usr.tar.part usr
    mv usr.tar.part usr.tar
else
    echo "usr.tar present, skipping" >&2
fi

if [[ ! -f usr.tar.gz ]]; then
    echo "compressing usr.tar with $compressor -6" >&2
    case "$compressor" in
        pigz) pigz -6 -n -c usr.tar >usr.tar.gz.part ;;
        gzip) gzip -6 -n -c usr.tar >usr.tar.gz.part ;;
        *) echo "BENCH_GZIP must be pigz or gzip (got $compressor)" >&2; exit 2 ;;
    esac
    mv usr.tar.gz.part usr.tar.gz
else
    echo "usr.tar.gz present, skipping" >&2
fi

ls -l usr.tar usr.tar.gz
