#!/bin/sh
# Runs install.py (beside this file) with the first Python that is 3.9 or newer.
# Usage: sh install.sh [--root DIR] [--uninstall [--purge]] [--no-start]
# Set PYTHON=/path/to/python3 to choose the interpreter.
for py in ${PYTHON:+"$PYTHON"} python3 python3.13 python3.12 python3.11 python3.10 python3.9 \
    /usr/libexec/platform-python; do
    if command -v "$py" >/dev/null 2>&1 &&
        "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>/dev/null; then
        exec "$py" "$(dirname "$0")/install.py" "$@"
    fi
done
echo "guestbus install: error: the agent needs Python 3.9 or newer (python3), and none was" \
    "found; install python3 (and python3-venv on Debian/Ubuntu) and run this again" >&2
exit 1
