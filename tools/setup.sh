#!/usr/bin/env bash
# The Debian packages that `make test` and `make demo` need, in one place: .ci/run and
# tools/demo.sh run this first. Each package is checked by the commands the tests and the demo
# run from it. Run as root, it installs what is missing with apt-get; otherwise (or with
# --check) it prints the one command that does and exits 1, before anything else happens.
set -euo pipefail

check_only=false
case "${1:-}" in
  "") ;;
  --check) check_only=true ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

# package        commands it must provide
NEED=(
  "libnbd-bin     nbdcopy nbdinfo"
  "python3-libnbd nbdsh"
  "nbdfuse        nbdfuse"
  "fio            fio"
  "qemu-utils     qemu-io qemu-img qemu-nbd"
  "e2fsprogs      mkfs.ext4 e2fsck"
  "fuse3          fusermount3"
  "mount          losetup"
  "util-linux     setpriv"
  "coreutils      sha256sum"
  "diffutils      cmp"
  "make           make"
  "iproute2       ip"
  "iperf3         iperf3"
  "iputils-ping   ping"
  "resource-agents ocf-tester"
  "libxml2-utils  xmllint"
)

# A user's PATH often lacks the sbin directories, where losetup and ip live.
export PATH="$PATH:/usr/sbin:/sbin"

# One "package command" line per package with a command missing.
missing() {
  local line pkg cmds cmd
  for line in "${NEED[@]}"; do
    read -r pkg cmds <<<"$line"
    for cmd in $cmds; do
      if ! command -v "$cmd" >/dev/null 2>&1; then
        echo "$pkg $cmd"
        break
      fi
    done
  done
  # The tests' python helpers import libnbd's bindings into Debian's own python.
  if ! /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1; then
    echo "python3-libnbd /usr/bin/python3:nbd"
  fi
  # tools/faultyfs.py (a journal disk that fails, for the tests) is a fusepy file system.
  if ! /usr/bin/python3 -c 'import fusepy' >/dev/null 2>&1; then
    echo "python3-fusepy /usr/bin/python3:fusepy"
  fi
}

# Sets `pkgs` (each once) and `what` ("command (package), ...") from the output of `missing`.
summarise() {
  local l pkg cmd
  pkgs=()
  what=""
  for l in "$@"; do
    read -r pkg cmd <<<"$l"
    what+="${what:+, }$cmd ($pkg)"
    [[ " ${pkgs[*]} " == *" $pkg "* ]] || pkgs+=("$pkg")
  done
}

mapfile -t lacking < <(missing)
[ ${#lacking[@]} -eq 0 ] && exit 0
summarise "${lacking[@]}"

if ! $check_only && [ "$(id -u)" -eq 0 ]; then
  echo "setup: installing ${pkgs[*]} (missing: $what)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${pkgs[@]}"
  mapfile -t lacking < <(missing)
  [ ${#lacking[@]} -eq 0 ] && exit 0
  summarise "${lacking[@]}"
  echo "setup: still missing after apt-get install: $what (not on PATH?)" >&2
  exit 1
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo "
{
  echo "setup: missing: $what"
  echo "install them with:"
  echo "  ${sudo}apt-get update && ${sudo}apt-get install -y ${pkgs[*]}"
} >&2
exit 1
