#!/usr/bin/env bash
# Index every gzip layer of every platform of an image and attach the indexes to the image in
# its registry (OCI referrers, or the sha256-<hex> fallback tag), so that nodes can then run
# `hybrid-erofs mount-image REF /mnt` and find them. Installs nothing; see tools/ci/README.md.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: index-and-push.sh [OPTIONS] IMAGE [-- EXTRA-INDEX-ARGS...]

Index every gzip layer of every platform of IMAGE (registry reference, or oci:DIR:TAG with
--dry-run) with `hybrid-erofs index --all-layers --all-platforms` and push the outputs to
IMAGE's registry. The outputs go to a temporary directory, removed on exit.

Options:
  --dry-run               index only; do not push anything
  --jobs N                layers indexed at once (default: hybrid-erofs's)
  --min-layer-size SIZE   skip smaller layers, e.g. 10MiB (default: hybrid-erofs's)
  --output DIR            keep the outputs in DIR instead of a temporary directory
  -h, --help              show this help

Environment:
  REGISTRY_USER, REGISTRY_PASSWORD   registry credentials; the password is passed on stdin
                                     (--password-stdin), never on a command line. Without
                                     them hybrid-erofs uses auth.json / docker config.
  HYBRID_EROFS                       the command to run (default: hybrid-erofs)

Arguments after `--` go to `hybrid-erofs index` unchanged (e.g. -- --insecure).

Example:
  REGISTRY_USER=ci REGISTRY_PASSWORD="$TOKEN" tools/ci/index-and-push.sh ghcr.io/acme/app:1.2
EOF
}

die() {
    printf 'index-and-push.sh: %s\n' "$*" >&2
    exit 2
}

dry_run=0
jobs=""
min_layer_size=""
output=""
image=""
extra=()
while (($#)); do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --jobs) (($# >= 2)) || die "--jobs needs a value"; jobs="$2"; shift ;;
        --jobs=*) jobs="${1#*=}" ;;
        --min-layer-size) (($# >= 2)) || die "--min-layer-size needs a value"
                          min_layer_size="$2"; shift ;;
        --min-layer-size=*) min_layer_size="${1#*=}" ;;
        --output) (($# >= 2)) || die "--output needs a value"; output="$2"; shift ;;
        --output=*) output="${1#*=}" ;;
        -h | --help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        -*) die "unknown option: $1 (see --help)" ;;
        *) [[ -z "$image" ]] || die "one IMAGE only (got '$image' and '$1')"; image="$1" ;;
    esac
    shift
done
[[ -n "$image" ]] || { usage >&2; exit 2; }

read -r -a hybrid_erofs <<<"${HYBRID_EROFS:-hybrid-erofs}"
command -v "${hybrid_erofs[0]}" >/dev/null || die "${hybrid_erofs[0]}: not found (pip install hybrid-erofs)"

if [[ -n "$output" ]]; then
    mkdir -p -- "$output"
    outdir="$output"
else
    outdir="$(mktemp -d "${TMPDIR:-/tmp}/hybrid-erofs-index.XXXXXX")"
    trap 'rm -rf -- "$outdir"' EXIT
fi

args=(index "$image" --all-layers --all-platforms -o "$outdir" --no-progress)
[[ -n "$jobs" ]] && args+=(--jobs "$jobs")
[[ -n "$min_layer_size" ]] && args+=(--min-layer-size "$min_layer_size")
((dry_run)) || args+=(--push)
args+=("${extra[@]}")

started=$SECONDS
if [[ -n "${REGISTRY_PASSWORD:-}" ]]; then
    [[ -n "${REGISTRY_USER:-}" ]] || die "REGISTRY_PASSWORD is set but REGISTRY_USER is not"
    # printf is a shell builtin: the password reaches the pipe without appearing in any argv.
    summary=$(printf '%s' "$REGISTRY_PASSWORD" |
        "${hybrid_erofs[@]}" "${args[@]}" --username "$REGISTRY_USER" --password-stdin)
elif [[ -n "${REGISTRY_USER:-}" ]]; then
    die "REGISTRY_USER is set but REGISTRY_PASSWORD is not"
else
    summary=$("${hybrid_erofs[@]}" "${args[@]}")
fi
printf '%s\n' "$summary"
pull_ref=$(sed -n 's/^pull_ref: \([^ ]*\).*/\1/p' <<<"$summary")

files=$(find "$outdir" -type f | wc -l)
bytes=$(du -sb -- "$outdir" | cut -f1)
echo "image:    $image"
echo "outputs:  $files files, $bytes bytes in $outdir$([[ -n "$output" ]] || echo ' (removed on exit)')"
if ((dry_run)); then
    echo "pushed:   no (--dry-run)"
else
    # The image published again with its index bound in (docs/security.md): nodes mount it
    # by this digest reference; by the original one they need a signature they trust.
    echo "pushed:   yes; nodes can now run: hybrid-erofs mount-image ${pull_ref:-$image} /mnt"
fi
echo "elapsed:  $((SECONDS - started)) s"
