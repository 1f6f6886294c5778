#!/bin/sh
# build.sh: an example build script for build-as-user.sub and platform-matrix.sub.
# It runs inside the job's VM, in the working directory that holds the input files, as the
# image's unprivileged user. Usage: build.sh SOURCE_TARBALL [PLATFORM]
set -eu
tarball=$1
platform=${2:-$(uname -m)}
mkdir -p src
tar -xzf "$tarball" -C src
cd src
# CHANGE: your build. A top-level Makefile is assumed here.
make > ../build-report.txt 2>&1 || { cat ../build-report.txt >&2; exit 1; }
cd ..
echo "built on $platform: $(uname -sr)" >> build-report.txt
tar -czf artifacts.tar.gz -C src .
