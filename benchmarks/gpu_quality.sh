#!/usr/bin/env bash
# The quality runs of notes/RESULTS.md on a 2 x H200 host: the whole pipeline twice side by side, one GPU
# each, 3 MLA layers (4.2% KV) on GPU 0 and 2 MLA layers (2.8%) on GPU 1, detached from a copy of the
# tree (the host replaces the uploaded tree on every call); on a host of one GPU only the 3-MLA run
# (RUNS="mla2" or RUNS="mla3 mla2" chooses; RUNS=2gpu runs jobs/examples/smollm2-prose-2gpu.yaml, one job
# on every GPU of the host, SPEC_SET_2GPU its fields). After the stage bundle (`source /tmp/zebra-stage/env.sh`):
#   bash benchmarks/gpu_quality.sh start     # returns at once; logs in /tmp/quality/*.log
#                                            # (SPEC_SET="kd.tokens=N ..." changes fields of both runs' specs;
#                                            # SPEC_SET_MLA3 / SPEC_SET_MLA2: one run's spec only; give the
#                                            # same sets again to resume, or the stages rerun)
#   bash benchmarks/gpu_quality.sh stop      # stop the runs and their Ray (SIGINT, then SIGKILL); `start` with
#                                            # new SPEC_SET values then reruns only the stages whose sections
#                                            # changed (e.g. stop at "stage kd: start", restart with kd.tokens)
#   bash benchmarks/gpu_quality.sh poll [S]  # sleep S seconds, then each run's stage lines and last report
#   bash benchmarks/gpu_quality.sh wait [S]  # until every started run has exited (or S seconds, default 540), then poll
#   bash benchmarks/gpu_quality.sh collect   # copy reports, metrics and logs to $OUT
#   bash benchmarks/gpu_quality.sh bench [serve kd tests decode evalspeed]   # after the runs, same host, into $OUT:
#       serving (the mla3 export against the default teacher), the KD step's profile, GPU tests, decode at 16k;
#       also `kernels` (the kernels' GPU parity tests), `jobs` (tests/jobs' GPU tests, 200 s a test) and `host`
#       (the compiled KD and ILD steps at HOST_BATCH=8 sequences with the transformer row, profiled: the host floor)
# A run that died resumes where it stopped (stored stage outputs, checkpoints): `start` again.
set -uo pipefail
Q=/tmp/quality
case "${1:-}" in
start)
    # a fresh copy of the uploaded tree, keeping the runs' stored stages so that `start` resumes them
    mkdir -p $Q/tree/runs && mv $Q/tree/runs $Q/runs.keep && rm -rf $Q/tree && cp -r . $Q/tree \
        && rm -rf $Q/tree/runs && mv $Q/runs.keep $Q/tree/runs && cd $Q/tree || exit 1
    export PYTHONPATH=$Q/tree${PYTHONPATH:+:$PYTHONPATH}  # the Ray tasks (tokenisation, SMART) import the tree
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU")
    runs=${RUNS:-$([ "$gpus" -ge 2 ] && echo "mla3 mla2" || echo mla3)}
    sed -e 's/num_mla_layers: 3 .*/num_mla_layers: 2            # 320 of 11,520: 2.8%/' \
        -e 's/^name: .*/name: smollm2-prose-mla2/' -e 's#uri: runs/.*#uri: runs/smollm2-prose-mla2#' \
        jobs/examples/smollm2-prose-1gpu.yaml > $Q/mla2.yaml
    grep -q "num_mla_layers: 2" $Q/mla2.yaml || { echo "mla2 spec not written"; exit 1; }
    # SPEC_SET="kd.tokens=36700160 ild.tokens=6291456": fields of both specs changed for this run (no edit needed);
    # SPEC_SET_MLA3 / SPEC_SET_MLA2: fields of one run's spec only (after SPEC_SET), e.g. SPEC_SET_MLA2="kd.lr=6e-4"
    set_fields() {
        local f=$1; shift; [ $# -gt 0 ] || return 0
        python - "$f" "$@" <<'PY'
import sys, yaml
path, sets = sys.argv[1], sys.argv[2:]
spec = yaml.safe_load(open(path))
for item in sets:
    key, value = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = spec
    for name in parents:
        node = node.setdefault(name, {})
    parsed = yaml.safe_load(value)
    try:  # YAML 1.1 reads 1e-4 as a string
        parsed = float(parsed) if isinstance(parsed, str) else parsed
    except ValueError:
        pass
    node[leaf] = parsed
    print(f"{path}: {key} = {node[leaf]!r}")
yaml.safe_dump(spec, open(path, "w"), sort_keys=False)
PY
    }
    set_fields jobs/examples/smollm2-prose-1gpu.yaml ${SPEC_SET:-} ${SPEC_SET_MLA3:-} || exit 1
    set_fields $Q/mla2.yaml ${SPEC_SET:-} ${SPEC_SET_MLA2:-} || exit 1
    set_fields jobs/examples/smollm2-prose-2gpu.yaml ${SPEC_SET:-} ${SPEC_SET_2GPU:-} || exit 1
    gpu=0
    for name in $runs; do
        case $name in
        mla3) spec=jobs/examples/smollm2-prose-1gpu.yaml; devices=$gpu ;;
        mla2) spec=$Q/mla2.yaml; devices=$gpu ;;
        2gpu) spec=jobs/examples/smollm2-prose-2gpu.yaml; devices=$(seq -s, 0 $((gpus - 1))) ;;
        *) echo "start: unknown run $name (mla3, mla2, 2gpu)"; exit 2 ;;
        esac
        # each start its own log (poll and wait read the newest); the earlier ones stay beside it for collect
        [ -s $Q/$name.log ] && mv $Q/$name.log $Q/$name.$(date +%Y%m%d-%H%M%S).log
        CUDA_VISIBLE_DEVICES=$devices PYTHONUNBUFFERED=1 setsid nohup python -m jobs.run "$spec" > $Q/$name.log 2>&1 < /dev/null &
        echo $! > $Q/$name.pid; echo "$name on GPU $devices: pid $!"; gpu=$((gpu + 1))
    done ;;
stop)
    # each run is the leader of its own session (setsid): signal the group, then Ray's daemons on this node
    for f in $Q/*.pid; do [ -e "$f" ] || continue; pid=$(cat "$f"); kill -INT -- -$pid 2>/dev/null && echo "stopping $(basename $f .pid) ($pid)"; done
    for _ in $(seq 20); do alive=0; for f in $Q/*.pid; do [ -e "$f" ] && kill -0 $(cat "$f") 2>/dev/null && alive=1; done
        [ $alive = 0 ] && break; sleep 1; done
    for f in $Q/*.pid; do [ -e "$f" ] && kill -9 -- -$(cat "$f") 2>/dev/null; rm -f "$f"; done
    python -m ray.scripts.scripts stop --force > /dev/null 2>&1
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader ;;
wait)
    # the runs started last (their pid files), polled every 5 s; a call of the GPU host lasts 10 minutes at most
    end=$((SECONDS + ${2:-540}))
    while :; do alive=0
        for f in $Q/*.pid; do [ -e "$f" ] && kill -0 $(cat "$f") 2>/dev/null && alive=1; done
        { [ $alive = 0 ] || [ $SECONDS -ge $end ]; } && break; sleep 5; done
    [ $alive = 0 ] && echo "wait: no run is running" || echo "wait: runs still running after ${2:-540} s"
    exec bash "$0" poll 0 ;;
poll)
    sleep "${2:-0}"
    for r in mla3 mla2 2gpu; do
        [ -e $Q/$r.log ] || continue; echo "== $r"; grep -E "stage [a-z]+: |Error|error:|Traceback|tok/s|held-out|retention|FAILED" $Q/$r.log \
            | grep -v "^\s*$" | tail -${LINES_PER_RUN:-12}
    done
    nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader ;;
collect)
    OUT=${OUT:-runs/quality}; mkdir -p "$OUT"
    cp $Q/*.log "$OUT/" 2>/dev/null
    for d in $Q/tree/runs/*/; do n=$(basename "$d"); mkdir -p "$OUT/$n"
        cp -r "$d"report "$OUT/$n/" 2>/dev/null; cp "$d"eval/*.md "$d"eval/*.json "$OUT/$n/" 2>/dev/null; done ;;
bench)
    # parts in the order given (default: serve kd tests decode): the KD-loss and norm kernels' GPU tests, serving against the
    # default teacher, the KD step's profile (benchmarks.train_step), the GPU tests of the engine and decoder,
    # decode at 16k with engine rows
    OUT=${OUT:-runs/quality}; mkdir -p "$OUT"; export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    # mamba_ssm's Triton SSD for the scan row and its parity test, where its source was carried (benchmarks/mamba_ssm_ssd.py)
    [ -d .mamba_ssm_src ] && export MAMBA_SSM_SRC=$PWD/.mamba_ssm_src
    shift; for part in ${@:-serve kd tests decode}; do case $part in
    serve) timeout ${T_SERVE:-200} python -m benchmarks.serve_load --hybrid $Q/tree/runs/smollm2-prose-1gpu/export \
        --clients 64 --requests ${SERVE_REQUESTS:-4} --prompt-len 1024 --gen 128 --out "$OUT/serve_load.json" 2>&1 \
        | grep -v -i "warn\|INFO" | tail -10 ;;
    evalspeed) timeout ${T_EVALSPEED:-300} python -m benchmarks.eval_speed --model $Q/tree/runs/smollm2-prose-1gpu/export \
        --num-gpus 1 --limit ${EVAL_LIMIT:-500} --settings ${EVAL_SETTINGS:-8x4 64x8} --out "$OUT/eval_speed.json" 2>&1 \
        | grep -v -i "warn\|INFO" | tail -8 ;;  # the eval stage's scoring speed by batching (after a run)
    kd) timeout ${T_KD:-170} python -m benchmarks.train_step --models transformer hybrid_triton kd_hybrid kd_deepspeed \
        ild_deepspeed --profile --steps 6 --warmup 2 --out "$OUT/train_step.json" 2>&1 | grep -v -i "warn" \
        | tail -${KD_LINES:-150} > "$OUT/train_step.txt"; tail -40 "$OUT/train_step.txt" ;;
    host) timeout ${T_HOST:-300} python -m benchmarks.train_step --models transformer kd_deepspeed ild_deepspeed \
        --batch ${HOST_BATCH:-8} --compile --profile --profile-steps 2 --steps 6 --warmup 3 --out "$OUT/train_step_host.json" \
        2>&1 | grep -v -i "warn" > "$OUT/train_step_host.txt"; grep -E "^(transformer|kd_deepspeed|ild_deepspeed) " \
        "$OUT/train_step_host.txt"; grep -A12 "top python" "$OUT/train_step_host.txt" | cut -c1-90 ;;  # the host floor (TEAM.md)
    graphs) timeout ${T_GRAPHS:-540} python -m benchmarks.train_step --models ${GRAPH_MODELS:-kd_deepspeed \
        kd_deepspeed_graphed ild_deepspeed ild_deepspeed_graphed} --batch ${HOST_BATCH:-8} --compile --steps 6 --warmup 3 ${GRAPH_ARGS:-} \
        --out "$OUT/train_step_graphs_${HOST_BATCH:-8}.json" 2>&1 | grep -v -i "warn" > "$OUT/train_step_graphs_${HOST_BATCH:-8}.txt"
        grep -E "^(transformer|kd_deepspeed|ild_deepspeed)[a-z_]* |CUDA graph|Error|error" "$OUT/train_step_graphs_${HOST_BATCH:-8}.txt" \
        | cut -c1-200 | tail -20 ;;  # compiled layers replayed from CUDA graphs (TrainSettings.cuda_graphs)
    probe) timeout ${T_PROBE:-240} python -m benchmarks.graph_capture_probe 2>&1 | grep -E "^[a-z_]+: (OK|FAIL|ERROR)" ;;  # which captures work
    gtests) timeout ${T_GTESTS:-300} python -m pytest -q -s -m gpu -p no:cacheprovider -rf --tb=short \
        tests/zebra/test_cuda_graphs.py tests/jobs/test_cuda_graphs_train.py tests/kernels/test_norm.py 2>&1 \
        | grep -v -E "Warning:|warnings\.warn\(" | tail -40 ;;  # the CUDA-graph path's GPU tests
    kernels) timeout ${T_KERNELS:-240} python -m pytest -q -s -m gpu -p no:cacheprovider tests/kernels/test_kd_loss.py \
        tests/kernels/test_norm.py tests/zebra/test_zebra_rms_norm.py tests/zebra/test_mamba2.py \
        tests/kernels/test_ssd_scan.py tests/kernels/test_token_l2.py tests/kernels/test_mla_rope.py 2>&1 | tail -14 ;;
    jobs) timeout ${T_JOBS:-450} python -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short --timeout 200 tests/jobs \
        2>&1 | grep -v -E "Warning:|warnings\.warn\(" | tail -${JOBS_LINES:-60} ;;  # the GPU tests of the stages (pytest-timeout: the image's); the filter keeps pytest's "N passed, M warnings" line
    tests) timeout ${T_TESTS:-150} python -m pytest -q -m gpu -p no:cacheprovider tests/serve/test_engine.py \
        tests/zebra/test_varlen_prefill.py tests/zebra/test_decode.py tests/test_benchmarks_train_step.py 2>&1 | tail -8 ;;
    decode) timeout ${T_DECODE:-240} python -m benchmarks.decode --random smollm2 --contexts 16384 --batch 16 --gen 64 \
        --repeats 2 --kernel-batch 64 --max-batch-cap ${DECODE_CAP:-1024} --out "$OUT/decode.json" 2>&1 \
        | grep "^|\|GB/s" | tail -8 ;;
    *) echo "bench: unknown part $part (kernels, jobs, serve, kd, host, graphs, gtests, probe, tests, decode, evalspeed)"; exit 2 ;;
    esac; done ;;
*) echo "usage: $0 start|stop|poll [seconds]|wait [seconds]|collect|bench [kernels jobs serve kd tests decode]"; exit 2 ;;
esac
