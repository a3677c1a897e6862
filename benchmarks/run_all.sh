#!/usr/bin/env bash
# Run every benchmark in benchmarks/*.py and print one markdown table of their headline ratios.
#
#   benchmarks/run_all.sh                 # CPU: each benchmark with --quick (if it has one)
#   benchmarks/run_all.sh --device cuda   # GPU: full-size runs, --device cuda passed to each benchmark
#
# A benchmark's last output line is its headline, `<name>: <ratio>x`; other lines of that form are listed
# beside it. Each benchmark runs under a time limit (BENCH_TIMEOUT seconds, default 300 on a GPU, 900 on CPU);
# full logs go to $BENCH_LOGS (default: a fresh temporary folder). PYTHON picks the interpreter
# (default: .venv/bin/python if present, else python).
set -u
cd "$(dirname "$0")/.."

device=cpu
if [[ "${1:-}" == "--device" && -n "${2:-}" ]]; then
    device=$2
elif [[ -n "${1:-}" ]]; then
    echo "usage: benchmarks/run_all.sh [--device cuda]" >&2
    exit 2
fi
python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python)}
if [[ $device == cpu ]]; then limit=${BENCH_TIMEOUT:-900}; else limit=${BENCH_TIMEOUT:-300}; fi
logs=${BENCH_LOGS:-$(mktemp -d)}
mkdir -p "$logs"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

rows=()
failed=0
for script in benchmarks/*.py; do
    name=$(basename "$script" .py)
    [[ $name == common ]] && continue  # shared helpers, not a benchmark
    help=$("$python" "$script" --help 2>/dev/null)
    args=()
    [[ $help == *--device* ]] && args+=(--device "$device")
    [[ $device == cpu && $help == *--quick* ]] && args+=(--quick)
    start=$(date +%s)
    timeout "$limit" "$python" "$script" "${args[@]}" >"$logs/$name.log" 2>&1
    status=$?
    seconds=$(( $(date +%s) - start ))
    last=$(grep -v '^[[:space:]]*$' "$logs/$name.log" | tail -n 1)
    others=$(grep -E '^[^:]+: [0-9.]+x$' "$logs/$name.log" | grep -vxF "$last" | paste -sd ';' - | sed 's/;/; /g')
    if [[ $status -eq 124 ]]; then
        figure="timed out after ${limit} s"; failed=1
    elif [[ $status -ne 0 ]]; then
        figure="failed (exit $status): ${last:0:120}"; failed=1
    elif [[ $last =~ ^(.+):\ ([0-9.]+)x$ ]]; then
        figure="${BASH_REMATCH[1]}: **${BASH_REMATCH[2]}x**"
    else
        figure="no ratio line: ${last:0:120}"
    fi
    rows+=("| \`$name.py ${args[*]}\` | $figure | ${others:--} | $seconds |")
done

echo
machine="$(nproc --all) CPU cores"
if [[ $device == cuda* ]] && command -v nvidia-smi >/dev/null; then
    machine="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), $machine"
fi
echo "Benchmarks on $device ($machine), logs in $logs"
echo
echo "| benchmark | headline | other figures | wall s |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
exit $failed
