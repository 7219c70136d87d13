#!/usr/bin/env bash
# Fetch what `llmc compile --target rocm` needs on a Debian 12 machine without ROCm:
# the AMDGPU device-library bitcode (rocm-device-libs) and an lld new enough to link the
# code objects TVM's LLVM 22 emits (lld 14, Debian's default, cannot: "unknown abi version").
#
# Nothing is installed system-wide: the packages are fetched with `apt-get download` and
# unpacked with `dpkg -x` into a cache folder (about 32 MB downloaded, 160 MB unpacked):
#     ${LLMC_ROCM_TOOLCHAIN:-${XDG_CACHE_HOME:-$HOME/.cache}/llmc/rocm}
# llmc finds that folder by itself; the printed exports are for using it by hand (TVM).
# Running it again is cheap: an existing, working toolchain is only checked and printed.
#
#   bash tools/setup_rocm_toolchain.sh           # set up (or check) and print the exports
#   bash tools/setup_rocm_toolchain.sh --force   # download and unpack again
set -euo pipefail

MAJOR="${LLMC_ROCM_LLVM_MAJOR:-22}"  # must be >= the LLVM inside the TVM wheel (22 for 0.27)
DIR="${LLMC_ROCM_TOOLCHAIN:-${XDG_CACHE_HOME:-$HOME/.cache}/llmc/rocm}"
FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

say() { echo "setup_rocm_toolchain: $*" >&2; }
die() { say "error: $*"; exit 1; }

print_env() {
  # shellcheck disable=SC1091
  . "$DIR/toolchain.env"
  echo "# ROCm toolchain for llmc/TVM in $DIR (llmc finds it without these exports)"
  echo "export ROCM_PATH=$ROCM_PATH"
  echo "export PATH=$DIR/bin:\$PATH"
  echo "# LD_LIBRARY_PATH is not needed: $DIR/bin/ld.lld-$MAJOR sets it for lld alone"
}

works() {  # the toolchain in $1 links: its lld runs, and the bitcode TVM links is there
  local d="$1"
  [ -f "$d/toolchain.env" ] || return 1
  (
    set +u
    # shellcheck disable=SC1091
    . "$d/toolchain.env"
    [ -f "$ROCM_PATH/amdgcn/bitcode/ocml.bc" ] && [ -f "$ROCM_PATH/amdgcn/bitcode/ockl.bc" ] || exit 1
    [[ "$("$LLD" --version 2>/dev/null)" == *"LLD $MAJOR."* ]] || exit 1
  )
}

if [ "$FORCE" = 0 ] && works "$DIR"; then
  say "toolchain already set up in $DIR"
  print_env
  exit 0
fi

command -v apt-get >/dev/null && command -v dpkg >/dev/null \
  || die "needs apt-get and dpkg (Debian 12). Elsewhere install ROCm, set ROCM_PATH, and put an ld.lld-$MAJOR (LLVM >= $MAJOR) on PATH"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

PKGS=(rocm-device-libs "lld-$MAJOR" "libllvm$MAJOR")
have_candidates() {
  local p
  for p in "${PKGS[@]}"; do
    # (no `cmd | grep -q` under pipefail: grep's early exit makes the writer fail with SIGPIPE)
    [[ "$(apt-cache policy "$p" 2>/dev/null)" == *"Candidate: "[0-9]* ]] || return 1
  done
}
if ! have_candidates; then
  say "package lists lack ${PKGS[*]}: running apt-get update"
  as_root apt-get update -qq || die "apt-get update failed (run it as root)"
  have_candidates || die "apt cannot find ${PKGS[*]}; lld-$MAJOR and libllvm$MAJOR come from bookworm-security (deb.debian.org/debian-security), rocm-device-libs from bookworm main"
fi

# Shared libraries lld and libLLVM need that this machine lacks are fetched as well.
missing=()
for dep in $(apt-cache depends "lld-$MAJOR" "libllvm$MAJOR" 2>/dev/null | awk '$1 == "Depends:" && $2 !~ /^</ {print $2}' | sort -u); do
  case "$dep" in libllvm*) continue ;; esac
  [ "$(dpkg-query -W -f='${Status}' "$dep" 2>/dev/null || true)" = "install ok installed" ] || missing+=("$dep")
done

mkdir -p "$(dirname "$DIR")"
TMP="$(mktemp -d "$DIR.tmp.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/debs" "$TMP/pkgroot" "$TMP/bin"
chmod 755 "$TMP"
APT_OPTS=(-q)
# as root, apt drops to its _apt user to download, which cannot write under /root
[ "$(id -u)" = 0 ] && APT_OPTS+=(-o APT::Sandbox::User=root)
say "downloading ${PKGS[*]} ${missing[*]:-}"
if ! (cd "$TMP/debs" && apt-get download "${APT_OPTS[@]}" "${PKGS[@]}" "${missing[@]}" >/dev/null); then
  say "download failed (stale package lists?): apt-get update and retry"
  as_root apt-get update -qq || die "apt-get update failed"
  (cd "$TMP/debs" && apt-get download "${APT_OPTS[@]}" "${PKGS[@]}" "${missing[@]}" >/dev/null) || die "apt-get download ${PKGS[*]} failed"
fi
for deb in "$TMP"/debs/*.deb; do
  dpkg -x "$deb" "$TMP/pkgroot"
done

LIBDIR="$TMP/pkgroot/usr/lib/x86_64-linux-gnu"
REAL_LLD="$TMP/pkgroot/usr/lib/llvm-$MAJOR/bin/ld.lld"
[ -x "$REAL_LLD" ] || die "lld-$MAJOR did not unpack $REAL_LLD"
[ -f "$LIBDIR/amdgcn/bitcode/ocml.bc" ] || die "rocm-device-libs did not unpack $LIBDIR/amdgcn/bitcode"

# The wrapper lets lld find the unpacked libLLVM (and any unpacked dependency) without
# putting them on anyone else's LD_LIBRARY_PATH. Paths are those of the final folder.
FINAL_LIBDIR="$DIR/pkgroot/usr/lib/x86_64-linux-gnu"
cat >"$TMP/bin/ld.lld-$MAJOR" <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$FINAL_LIBDIR\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$DIR/pkgroot/usr/lib/llvm-$MAJOR/bin/ld.lld" "\$@"
EOF
chmod 755 "$TMP/bin/ld.lld-$MAJOR"
{
  echo "ROCM_PATH=$FINAL_LIBDIR"
  echo "LLD=$DIR/bin/ld.lld-$MAJOR"
  echo "LLVM_MAJOR=$MAJOR"
  echo "PACKAGES=\"$(cd "$TMP/debs" && ls -- *.deb | tr '\n' ' ' | sed 's/ $//')\""
} >"$TMP/toolchain.env"
rm -rf "$TMP/debs"

# swap into place (the wrapper and toolchain.env already name the final folder)
if [ -e "$DIR" ]; then
  rm -rf "$DIR.old"
  mv "$DIR" "$DIR.old"
fi
mv "$TMP" "$DIR"
trap - EXIT
rm -rf "$DIR.old"

works "$DIR" || die "unpacked toolchain in $DIR does not work: $("$DIR/bin/ld.lld-$MAJOR" --version 2>&1 | head -3)"
say "ROCm toolchain ready in $DIR ($(du -sh "$DIR" | cut -f1))"
print_env
