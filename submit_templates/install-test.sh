#!/bin/sh
# install-test.sh: an example install test for test-as-root.sub. It runs inside the job's VM
# as root, in the working directory that holds the input files. Usage: install-test.sh PACKAGE
set -eu
package=$1
echo "running as uid $(id -u) on $(uname -sr)"
# CHANGE: install and test your package. A Debian package is assumed here.
dpkg -i "./$package" || apt-get install -f -y
dpkg -s "$(dpkg-deb -f "./$package" Package)" > install-report.txt
