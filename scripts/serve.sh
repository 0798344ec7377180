#!/usr/bin/env bash
# Quick start: set up a virtualenv in .venv and run `avr-llm-proxy serve` on its embedded defaults
# (SQLite store in the working directory, built-in demo business API, http://127.0.0.1:6017).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e .
exec .venv/bin/avr-llm-proxy serve "$@"
