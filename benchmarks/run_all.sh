#!/usr/bin/env bash
# Run every benchmark in benchmarks/*.py and print one markdown table of their headline ratios.
#
#   benchmarks/run_all.sh                          # CPU: each benchmark with --quick (a smoke run of every script)
#   benchmarks/run_all.sh --device cuda            # GPU: each benchmark at its GPU default sizes, under 10 minutes
#   benchmarks/run_all.sh --device cuda --logs DIR --bundle FILE.tar.gz
#
# Options (or the environment variable beside each):
#   --device D     cpu (default) or cuda[:i], passed to every benchmark
#   --quick        pass --quick to the benchmarks that have one (always on CPU)
#   --logs DIR     BENCH_LOGS: where each benchmark's whole output goes (DIR/<name>.log), with DIR/table.md (the
#                  table, rewritten after every benchmark) and DIR/env.txt (versions, nvidia-smi); default: a new
#                  temporary folder
#   --bundle FILE  BENCH_BUNDLE: also pack DIR into FILE (.tar.gz), refreshed after every benchmark, so that a run
#                  stopped part-way still leaves the finished logs in one file
#   BENCH_BUDGET   seconds for the whole run: 540 on a GPU (9 minutes, leaving a 10-minute device call time to
#                  install wheels), 3600 on CPU. Each benchmark runs under its own limit (LIMITS below, 900 s each on
#                  CPU), cut to what is left of the budget.
#   BENCH_TIMEOUT  one limit for every benchmark instead
#   PYTHON         the interpreter (default: .venv/bin/python if present, else python3)
#
# A benchmark's last output line is its headline, `<name>: <ratio>x`; its other lines of that form are listed
# beside it. A benchmark that fails or runs out of time gets `failed: <reason>` or `timed out after N s` in its
# row, and the others still run. Exit status: 0 when every benchmark gave its headline, else 1.
set -u
cd "$(dirname "$0")/.."

device=cpu quick=0 logs=${BENCH_LOGS:-} bundle=${BENCH_BUNDLE:-}
while [[ $# -gt 0 ]]; do
    case $1 in
        --device) device=${2:?--device needs a value}; shift 2 ;;
        --quick) quick=1; shift ;;
        --logs) logs=${2:?--logs needs a folder}; shift 2 ;;
        --bundle) bundle=${2:?--bundle needs a file name}; shift 2 ;;
        *) echo "usage: benchmarks/run_all.sh [--device cpu|cuda] [--quick] [--logs DIR] [--bundle FILE.tar.gz]" >&2
           exit 2 ;;
    esac
done
[[ $device == cpu ]] && quick=1
python=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
logs=${logs:-$(mktemp -d)}
mkdir -p "$logs"
logs=$(cd "$logs" && pwd)
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} PYTHONUNBUFFERED=1  # unbuffered: a killed benchmark's log keeps its lines

# Seconds per benchmark on a GPU (the sum, 525, fits the budget even if every one ran out); each benchmark picks
# its own GPU sizes.
declare -A LIMITS=([adapter]=50 [detr_heads]=50 [feature_cache]=75 [m2f_head]=70 [m2f_vs_hf]=85 [slide]=65
                   [smp_decoders]=45 [sweep]=60 [upsampled_ce]=25)
if [[ $device == cpu ]]; then budget=${BENCH_BUDGET:-3600}; else budget=${BENCH_BUDGET:-540}; fi

# The device in words, from torch itself (the GPU's name), and the versions that the figures depend on.
where=$("$python" - "$device" 2>&1 <<'EOF'
import sys
import torch
device = torch.device(sys.argv[1])
if device.type == "cuda":
    print(f"{device.type}: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
else:
    print(f"{device.type}: {torch.get_num_threads()} threads, torch {torch.__version__}")
EOF
)
[[ $? -eq 0 ]] || where="$device: unknown ($(tail -n 1 <<<"$where"))"
where=$(tail -n 1 <<<"$where")
{
    echo "$where"
    date -u
    echo "python: $python ($("$python" --version 2>&1))"
    echo "CPU cores: $(nproc --all), load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
    command -v nvidia-smi >/dev/null && nvidia-smi
} >"$logs/env.txt" 2>&1

cell() { tr '\n' ' ' <<<"${1:0:${2:-160}}" | sed 's/|/\\|/g; s/[[:space:]]*$//'; }  # text fit for a table cell

header="Benchmarks on $where ($(nproc --all) CPU cores)"
device_cell=$(cell "${where%%,*}" 60)  # e.g. "cuda: NVIDIA H200"
rows=()
write_table() {
    {
        echo "$header"
        echo
        echo "| benchmark | device | headline | other figures | wall s |"
        echo "|---|---|---|---|---|"
        printf '%s\n' "${rows[@]}"
    } >"$logs/table.md"
    if [[ -n $bundle ]]; then
        mkdir -p "$(dirname "$bundle")"
        tar -czf "$bundle" -C "$(dirname "$logs")" "$(basename "$logs")"
    fi
}

scripts=(benchmarks/*.py)
failed=0 started=$SECONDS count=0 total=0
for script in "${scripts[@]}"; do [[ $(basename "$script") != common.py ]] && total=$((total + 1)); done
for script in "${scripts[@]}"; do
    name=$(basename "$script" .py)
    [[ $name == common ]] && continue  # shared helpers, not a benchmark
    count=$((count + 1))
    args=()
    grep -q -- '"--device"' "$script" && args+=(--device "$device")
    [[ $quick == 1 ]] && grep -q -- '"--quick"' "$script" && args+=(--quick)
    if [[ $device == cpu ]]; then own=${BENCH_TIMEOUT:-900}; else own=${BENCH_TIMEOUT:-${LIMITS[$name]:-60}}; fi
    left=$((budget - (SECONDS - started)))
    limit=$((own < left ? own : left))
    command="\`$name.py ${args[*]}\`"
    if [[ $limit -lt 15 ]]; then
        rows+=("| $command | $device_cell | skipped: the ${budget} s budget is spent | - | 0 |")
        failed=1
        write_table
        echo "[$count/$total] $name: skipped, the ${budget} s budget is spent" >&2
        continue
    fi
    start=$SECONDS
    timeout --kill-after=10 "$limit" "$python" "$script" "${args[@]}" >"$logs/$name.log" 2>&1
    status=$?
    seconds=$((SECONDS - start))
    last=$(grep -v '^[[:space:]]*$' "$logs/$name.log" | tail -n 1)
    others=$(grep -E '^[^:]+: [0-9.]+x$' "$logs/$name.log" | grep -vxF "$last" | paste -sd ';' - | sed 's/;/; /g')
    if [[ $status -eq 124 || $status -eq 137 ]]; then
        figure="timed out after ${limit} s: $(cell "$last")"; failed=1
    elif [[ $status -ne 0 ]]; then
        reason=$(grep -E '(Error|Exception|error)([:(]|$)' "$logs/$name.log" | tail -n 1)
        figure="failed: $(cell "${reason:-exit status $status: $last}")"; failed=1
    elif [[ $last =~ ^(.+):\ ([0-9.]+)x$ ]]; then
        figure="$(cell "${BASH_REMATCH[1]}"): **${BASH_REMATCH[2]}x**"
    else
        figure="no ratio line: $(cell "$last")"; failed=1
    fi
    rows+=("| $command | $device_cell | $figure | $(cell "${others:--}" 1000) | $seconds |")
    write_table
    echo "[$count/$total] $name: ${seconds} s, $figure" >&2
done

echo
echo "$header, logs in $logs"
echo
tail -n +3 "$logs/table.md"
exit $failed
