#!/usr/bin/env bash
# The RDMA user-space libraries Mooncake's non-CUDA wheel links (libibverbs, librdmacm
# and their libnl dependencies), from Debian's packages, unpacked into DIR: nothing is
# installed system-wide. SGLang's PD test servers add DIR/lib to LD_LIBRARY_PATH
# (sglang_dflash.testing.local_server.mooncake_env).
#   bash requirements/pd-libs.sh .venv/pd-sysroot
set -euo pipefail
dir=$1
packages="libibverbs1 librdmacm1 libnl-3-200 libnl-route-3-200"
mkdir -p "$dir"
cd "$dir"
if ! apt-get download $packages >/dev/null 2>&1; then
  apt-get update -qq  # a fresh machine may have no package lists yet
  apt-get download $packages
fi
rm -rf root lib
for deb in *.deb; do dpkg -x "$deb" root; done
rm -f ./*.deb
mkdir -p lib
find root -name "*.so.*" -path "*x86_64-linux-gnu*" -not -path "*rsocket*" -exec cp -a {} lib/ \;
ldconfig -n lib  # the soname links a system install would have made
rm -rf root
