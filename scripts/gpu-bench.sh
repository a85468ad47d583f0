#!/usr/bin/env bash
# Every GPU figure of the README's "Decoding on a GPU" in one run, most important first, each stage
# bounded so the whole run ends inside one device call (about 9 minutes).
#
#   scripts/gpu-bench.sh prep       here: put the default tokenizer (no weights) in .gpu/, to carry
#   scripts/gpu-bench.sh run DIR    on the GPU machine: tests compiled, then the benches, into DIR
#   scripts/gpu-bench.sh smoke DIR  on a CPU: the same commands on tiny sizes (checks they still run)
#   DRY_RUN=1 scripts/gpu-bench.sh run DIR   print each stage's command, run nothing
#   BUDGET=S (default 520) bounds the whole run in seconds; FROM=NAME starts at that stage (a second call)
#
# The GPU machine has torch, triton and transformers but not this project's other packages and no
# network: the project runs from src/ (PYTHONPATH), the random-weight models need only the default
# model's tokenizer (prep), and nothing is installed there. Each stage writes its table and JSON to
# DIR as it finishes; a stage past its time limit is stopped and the next one starts.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
out=${2:-results/gpu}
tokenizer_files="config.json tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json"

if [[ $mode == prep ]]; then
    # A checkpoint directory with config.json and the tokenizer is all `random:<shape>` reads.
    src=$(.venv/bin/python -c "from kvforge.models import default_checkpoint; print(default_checkpoint())") || exit 1
    dst=.gpu/cache/models/$(basename "$src")
    mkdir -p "$dst"
    for f in $tokenizer_files; do [[ -f $src/$f ]] && cp "$src/$f" "$dst/"; done
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
    du -sh .gpu
    exit 0
fi

case $mode in
run)
    py=python3
    export KVFORGE_CACHE=$PWD/.gpu/cache
    device=(--device cuda --dtype bfloat16)
    big=llama-3.1-8b
    aim_len=32768 aim_batch=8 long_lens=8192,32768,131072 batches=1,8,32 model_lens=8192,32768
    memory=120GiB limits=(90 60 150 150 120 150) steps=20 decode=16 extra=()
    ;;
smoke)
    py=.venv/bin/python
    device=(--device cpu --dtype float32)
    big=default
    aim_len=256 aim_batch=2 long_lens=128,256 batches=1,2 model_lens=128
    memory=8GiB limits=(120 120 120 120 120 120) steps=2 decode=2
    extra=(--quant-group 16 --max-batch 4)  # the tiny model's head_dim is 16; a few tries
    ;;
*)
    sed -n 2,12p "$0"
    exit 2
    ;;
esac
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
[[ -n ${DRY_RUN:-} ]] || mkdir -p "$out"
model=random:$([[ $mode == run ]] && echo llama-3.1-8b || echo tiny)
kvforge=("$py" -m kvforge.cli)

budget=${BUDGET:-520}
from=${FROM:-}
stage() {  # stage NAME SECONDS COMMAND...: run it bounded (by its limit and what is left of BUDGET), output in DIR/NAME.txt
    local name=$1 limit=$2
    shift 2
    if [[ -n $from && $name != "$from" ]]; then
        echo "== $name: skipped (FROM=$from)"
        return 0
    fi
    from=
    local left=$((budget - SECONDS))
    ((limit > left)) && limit=$left
    if ((limit < 30)); then
        echo "== $name: skipped, ${left}s of BUDGET left (run it with FROM=$name)"
        return 0
    fi
    echo "== $name (at most ${limit}s): $*"
    [[ -n ${DRY_RUN:-} ]] && return 0
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.txt" 2>"$out/$name.err"
    local rc=$?
    echo "   rc=$rc in $((SECONDS - start))s"
    tail -n 40 "$out/$name.txt"
}

if [[ -z ${DRY_RUN:-} ]]; then
    {
        date -u
        nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
        $py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
        $py -c "import triton; print('triton', triton.__version__)" || echo "triton missing"
    } >"$out/env.txt" 2>&1
    cat "$out/env.txt"
fi

# 1. The kernels compiled on this GPU against the torch reference (smoke: only collected, since the
#    smoke runs inside the test suite).
collect=$([[ $mode == smoke ]] && echo --collect-only)
stage tests "${limits[0]}" $py -m pytest -q -x -p no:cacheprovider $collect tests/test_kernels.py tests/test_received_kernel.py tests/test_syncs.py
# 2. The aim's point: one layer's decode attention, int4, eviction and the paged layout's kernel against bf16 SDPA,
#    beside the copy-bandwidth bound.
stage attention-aim "${limits[1]}" "${kvforge[@]}" bench --attention-only "${device[@]}" --shape "$big" --lengths "$aim_len" \
    --batches "$aim_batch" --quant none,int8,int4,int2,fp8 --ratios 0,0.5 --layout paged --steps "$steps" --json "$out/attention-aim.json"
# 3. The whole model at the aim's point: DynamicCache, full, knorm 0.5 with and without int4; compression vs prefill time.
stage model-aim "${limits[2]}" "${kvforge[@]}" bench --model "$model" "${device[@]}" --lengths "$aim_len" --batches 1,"$aim_batch" \
    --policies full,knorm,snapkv,h2o --ratio 0.5 --quant none,int4 --baselines dynamic,fp8 --decode-tokens "$decode" \
    "${extra[@]}" --json "$out/model-aim.json"
# 4. The largest batch that fits the memory limit: full, int4, ratio 0.5 + int4.
stage fit "${limits[3]}" "${kvforge[@]}" bench --model "$model" "${device[@]}" --lengths "$aim_len" --fit-memory "$memory" \
    --policies full,knorm --ratio 0.5 --quant none,int4 "${extra[@]}" --json "$out/fit.json"
# 5. The attention sweep: 8k / 32k / 128k tokens x batch 1 / 8 / 32.
stage attention-sweep "${limits[4]}" "${kvforge[@]}" bench --attention-only "${device[@]}" --shape "$big" --lengths "$long_lens" \
    --batches "$batches" --quant none,int4 --ratios 0,0.5 --steps "$steps" --json "$out/attention-sweep.json"
# 6. The whole model over lengths and batches.
stage model-sweep "${limits[5]}" "${kvforge[@]}" bench --model "$model" "${device[@]}" --lengths "$model_lens" --batches "$batches" \
    --policies full,knorm --ratio 0.5 --quant none,int4 --decode-tokens "$decode" "${extra[@]}" --json "$out/model-sweep.json"
echo "done: $out"
