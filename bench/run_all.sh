#!/usr/bin/env bash
# The whole benchmark suite on this CPU (fp32, 2 threads, random weights); results in bench/results/*.json.
# About 45-55 minutes on the project's 2-core machine -- keep the machine otherwise idle: other work on the two
# cores slows 2-thread torch badly (every result file records the load average).
#
#     bash bench/run_all.sh            # everything
#     bash bench/run_all.sh --smoke    # every script on its smallest setting, results to a temporary folder
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's masqclip_cli, installed or not

if [[ "${1:-}" == "--smoke" ]]; then
    out=$(mktemp -d)
    export MASQCLIP_CACHE_DIR="$out/cache"
    for script in masq_overhead model_stages crop_classify vocab_scale streaming_memory segment_e2e train_step video_tracking ray_overhead gpu; do
        echo "== $script (smoke)"
        python "bench/$script.py" --smoke --out "$out/$script.json"
    done
    echo "smoke results in $out"
    exit 0
fi

step() { echo; echo "== $* ($(date +%H:%M:%S))"; "$@"; }

step python bench/masq_overhead.py --models ViT-B-16 ViT-L-14-336-quickgelu                # ~2 min
step python bench/model_stages.py --model full-random                                      # ~2 min
step python bench/crop_classify.py --clip ViT-B-16 ViT-L-14-336-quickgelu --repeats 3      # ~10 min
step python bench/vocab_scale.py --sizes 10,150,1000,10000                                 # ~6 min
step python bench/streaming_memory.py --counts 200,2000                                    # ~3 min
step python bench/video_tracking.py                                                        # ~4 min
step python bench/segment_e2e.py --models tiny-random,full-random,demo                     # ~4 min
step python bench/train_step.py --geometries tiny,full --iterations 3                      # ~10 min
step python bench/ray_overhead.py --models tiny-random,demo --counts 24,48                  # ~8 min (needs masqclip[ray])
# bench/gpu.py needs a CUDA device: not part of this CPU suite (its docstring has the command for a GPU machine)
echo; echo "done ($(date +%H:%M:%S)): bench/results/*.json"
