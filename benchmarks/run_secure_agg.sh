#!/usr/bin/env bash
# Secure-aggregation cost suite (masking vs CKKS vs plaintext); extra args go to the CLI, e.g. --quick.
exec securefed bench secure-agg --out "${OUT:-benchmarks/results/secure_agg}" "$@"
