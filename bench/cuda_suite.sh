#!/usr/bin/env bash
# The step-time benchmarks on a CUDA GPU, each one's JSON (and its log) under OUT_DIR.
#   bash bench/cuda_suite.sh OUT_DIR [PYTHON]
# The federated benchmarks (dp_quality, sites_scaling, federation_overhead) need Flower's
# simulation engine and run with `make bench` / `make bench-dp-quality` on any machine.
set -u
out=${1:?usage: bench/cuda_suite.sh OUT_DIR [PYTHON]}
py=${2:-python3}
mkdir -p "$out"
"$py" - <<'EOF' || { echo "no CUDA device visible to $py" >&2; exit 2; }
import torch, sys
ok = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device {torch.cuda.get_device_name(0) if ok else None}")
sys.exit(0 if ok else 1)
EOF
status=0
for bench in dp_overhead unet_speed sampler_speed ldm_vs_pixel; do
    start=$(date +%s)
    if PYTHONUNBUFFERED=1 "$py" "bench/$bench.py" --device cuda >"$out/$bench.json" 2>"$out/$bench.log"; then
        echo "$bench: ok in $(( $(date +%s) - start )) s"
    else
        echo "$bench: FAILED after $(( $(date +%s) - start )) s (see $out/$bench.log)"; tail -5 "$out/$bench.log"; status=1
    fi
done
exit $status
