# shellcheck shell=bash
# The mechanics shared by train_cifar.sh, train_imagenet.sh and train_ffhq_afhq.sh: the command line,
# the machine variables, the downloads into the cache, the dataset check and the torchrun command.
# Not a program: each script sources it first thing, `. "$(dirname "$0")/launch.sh"`, and keeps
# its own part, the official runs' settings, in plain sight.
#
# The sourcing script, after that line:
#   1. sets setting_name (the word after METHOD: COND, RES, DATA), setting_choices, setting_note
#      (optional, shown after the choices) and scores (what eval reports), then calls
#      `parse_arguments "$@"`, which sets mode (train or eval), method, setting, dry_run, extra;
#   2. sets the run's settings, each one the sida.py flag of the same name:
#        batch          images per iteration, all GPUs together
#        batch_gpu      images per GPU and accumulation round (upstream's; BATCH_GPU overrides it, and
#                       it shrinks to the batch's share of a GPU on more GPUs than the batch needs)
#        lr             Adam learning rate of the fake score network and of the generator (lr = glr)
#        precision      arithmetic of the networks (fp32, tf32, bf16, fp16)
#        dropout        dropout of the trained networks (fake score network, generator)
#        augment        EDM augmentation probability, fake-score side only
#        ema            half-life of the generator's EMA, Mimg
#        alpha          weight of SiD's bias-correction term
#        tmax           largest diffusion time (of 1000) the generator loss looks at
#        init_sigma     noise level at which the one-step generator denoises pure noise
#        p_mean, p_std  log-normal noise levels of the fake-score loss
#        lsg            SiD generator loss scale
#        lsd, lsg_gan   discriminator and adversarial generator loss scales (SiDA, SiD²A only)
#        duration       training length, Mimg (DURATION overrides it)
#        tick           kimg per progress line
#        snap, dump     ticks per generator snapshot + FID-50k, per full training state for --resume
#      and the run's files: name (runs/NAME-METHOD, the cache's prefix), teacher_url, ref_url,
#      released[METHOD] (URL of the released generator, empty if none), data; and where it differs
#      from the others:
#        data_flags  sida.py flags right after --teacher
#        run_flags   sida.py flags after the shared settings
#        fid_flags   fid.py gen flags after --num-images 50000 (eval)
#        data_url    the dataset's download (CIFAR-10); without it DATA is prepared by hand, and
#        data_check  (EXT [labels]): what DATA must hold, checked before any download; on failure
#                    the script's how_to_prepare prints the steps
#   3. calls `launch`.
# The settings are read here but assigned there: `shellcheck -x train_*.sh` checks both together.
# shellcheck disable=SC2154

# bash 3.2 (macOS's /bin/bash) lacks associative arrays and ${v^^}; bash 4.0-4.3 stop at "${a[@]}"
# of an empty array under set -u. Refuse them in one line, in POSIX syntax, before any of that is read.
case ${BASH_VERSION-} in
    4.[4-9]* | [5-9].* | [1-9][0-9].*) ;;
    *) echo "error: this script needs bash >= 4.4 (this is ${BASH_VERSION:+bash }${BASH_VERSION:-not bash}); on macOS: brew install bash" >&2
       exit 1 ;;
esac
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    echo "error: launch.sh is sourced by the train_*.sh scripts; run one of them" >&2
    exit 2
fi
set -euo pipefail

methods=(sid sida sid2a)
setting_note=
data_url=
data_check=()
data_flags=()
run_flags=()
fid_flags=()
cache=${SIDA_CACHE:-$HOME/.cache/sida}
detector_url=https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "error: $*" >&2; exit 1; }

# ---- Arguments ---------------------------------------------------------------------------------
usage() {  # usage [STATUS]: --help (0) prints to stdout; a usage error (2, the default) to stderr
    local status=${1:-2} methods_="${methods[*]}" choices="${setting_choices[*]}"
    ((status == 0)) || exec >&2
    cat <<EOF
usage: $(basename "$0") [eval] METHOD $setting_name [--dry-run] [sida.py or fid.py arguments ...]
  eval    score the released generator ($scores) instead of training;
          the official protocol adds --trials 10 (10 trials of 50k images, different seeds)
  METHOD  ${methods_// / | }
$(printf '  %-8s%s' "$setting_name" "${choices// / | }")${setting_note:+       $setting_note}
  --dry-run  print the download and torchrun commands, run nothing
EOF
    if ((status == 0)); then   # --help: also the environment variables, from the script's header
        echo
        sed -n '/^# Environment/,/^$/{/^$/d; s/^# \{0,1\}//; p}' "$0"
    fi
    exit "$status"
}
usage_error() { echo "error: $*" >&2; usage 2; }

one_of() {  # one_of WORD CHOICE...: true when WORD is one of the choices
    local word=$1 choice
    shift
    for choice; do [[ $word == "$choice" ]] && return 0; done
    return 1
}

parse_arguments() {  # [eval] METHOD SETTING [--dry-run] [extra ...]; --dry-run and --help anywhere
    mode=train
    if [[ ${1:-} == eval ]]; then mode='eval'; shift; fi
    dry_run=0
    extra=()
    local arg positional=()
    for arg in "$@"; do
        case $arg in
            --dry-run) dry_run=1 ;;
            -h|--help) usage 0 ;;
            *) if ((${#positional[@]} < 2)); then positional+=("$arg"); else extra+=("$arg"); fi ;;
        esac
    done
    ((${#positional[@]} == 2)) || usage_error "expected METHOD and $setting_name"
    method=${positional[0]}
    setting=${positional[1]}
    one_of "$method" "${methods[@]}" || usage_error "METHOD '$method' is not one of: ${methods[*]}"
    one_of "$setting" "${setting_choices[@]}" ||
        usage_error "$setting_name '$setting' is not one of: ${setting_choices[*]}"
}

# ---- Machines ----------------------------------------------------------------------------------
count_gpus() {
    local n
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [[ $n =~ ^[0-9]+$ ]] && ((n > 0)); then echo "$n"; else echo 1; fi
}

check_machines() {  # NGPU, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT -> ngpu, nnodes, node_rank, master_port;
                    # BATCH_GPU and DURATION are checked here too
    ngpu=${NGPU:-$(count_gpus)}
    nnodes=${NNODES:-1}
    node_rank=${NODE_RANK:-0}
    master_port=${MASTER_PORT:-29500}
    local v
    for v in ngpu nnodes master_port; do
        [[ ${!v} =~ ^[1-9][0-9]*$ ]] || usage_error "${v^^} must be a positive integer"
    done
    [[ ${BATCH_GPU:-1} =~ ^[1-9][0-9]*$ ]] || usage_error "BATCH_GPU must be a positive integer"
    if ! [[ $node_rank =~ ^[0-9]+$ ]] || ((node_rank >= nnodes)); then
        usage_error "NODE_RANK must be in 0..$((nnodes - 1))"
    fi
    if ! [[ ${DURATION:-1} =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ ]] || [[ ${DURATION:-1} =~ ^[0.]+$ ]]; then
        usage_error "DURATION must be a positive number of Mimg"
    fi
    if ((nnodes > 1)) && [[ -z ${MASTER_ADDR:-} ]]; then
        usage_error "NNODES=$nnodes needs MASTER_ADDR (the address of node 0)"
    fi
}

# ---- Dataset (prepared by hand; checked before anything is downloaded) ------------------------
data_problem() {  # prints what is wrong with $data, nothing when it looks right
    [[ -d $data ]] && { echo "a folder: pass the zip made by dataset_tool.py"; return; }
    [[ -f $data ]] || { echo "no such file"; return; }
    "${PYTHON:-python3}" - "$data" "${data_check[@]}" <<'EOF' 2>&1 || true
import json, sys, zipfile
path, ext, *wanted = sys.argv[1:]
try:
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        if 'labels' in wanted:
            if 'dataset.json' not in names:
                sys.exit('the zip has no dataset.json')
            meta = json.loads(z.read('dataset.json'))
            if not isinstance(meta, dict) or not meta.get('labels'):
                sys.exit('dataset.json has no class labels')
        if not any(n.endswith('.' + ext) for n in names):
            sys.exit(f'the zip holds no .{ext} files')
except zipfile.BadZipFile:
    sys.exit('not a zip file')
except ValueError:
    sys.exit('dataset.json is not valid JSON')
EOF
}

check_data() {  # training only (scoring a generator needs no dataset), when the script asks for it
    [[ $mode == train ]] && ((${#data_check[@]})) || return 0
    local problem
    problem=$(data_problem)
    [[ -n $problem ]] || return 0
    if ((dry_run)); then
        echo "warning: DATA=$data: $problem; a real run would stop here and say how to prepare it" >&2
    else
        { echo "error: DATA=$data: $problem"; how_to_prepare; } >&2
        exit 1
    fi
}

# ---- Downloads (once, into the cache) ----------------------------------------------------------
show() { local line; printf -v line '%q ' "$@"; echo "${line% }"; }
if command -v curl >/dev/null; then downloader=(curl -fL --retry 3 -o)
else downloader=(wget -O); fi
made_cache=0

fetch() {  # fetch URL DEST: skipped when DEST exists; else a temp name, then an atomic mv
    local url=$1 dest=$2 tmp="$2.part.$$"
    if [[ -f $dest ]]; then echo "# cached: $dest"; return; fi
    if ((dry_run)); then
        ((made_cache)) || show mkdir -p "$cache"
        made_cache=1
        show "${downloader[@]}" "$tmp" "$url"
        show mv "$tmp" "$dest"
        return
    fi
    mkdir -p "$cache"
    echo "downloading $url" >&2
    if ! "${downloader[@]}" "$tmp" "$url"; then
        rm -f "$tmp"
        die "could not download $url; download it by hand into $cache"
    fi
    mv -f "$tmp" "$dest"
}

# The script fetches the networks itself (rather than letting each torchrun rank resolve a name)
# so that a multi-GB EDM2 pickle is downloaded once per node.
fetch_network() {  # fetch_network SOURCE NAME: sets $network; a URL is downloaded once as $cache/NAME-<file>
    network=$1
    if [[ $network =~ ^[a-z]+:// ]]; then
        network=$cache/$2-${1##*/}
        fetch "$1" "$network"
    fi
}

download() {  # -> teacher, ref, detector, data (CIFAR-10), network (eval), init_generator (sid2a)
    teacher=$cache/${teacher_url##*/}
    ref=$cache/${ref_url##*/}
    detector=$cache/${detector_url##*/}
    if [[ $mode == eval && -z ${NETWORK:-} && -z ${released[$method]} ]]; then
        die "no released $method generator for $setting (the official README lists none); set NETWORK"
    fi
    if [[ $mode == train ]]; then
        fetch "$teacher_url" "$teacher"
        [[ -z $data_url ]] || fetch "$data_url" "$data"
    fi
    fetch "$ref_url" "$ref"
    fetch "$detector_url" "$detector"
    if [[ $mode == eval ]]; then
        fetch_network "${NETWORK:-${released[$method]}}" "$method-$name"
    elif [[ $method == sid2a ]]; then
        fetch_network "${INIT_GENERATOR:-${released[sid]}}" "sid-$name"
        init_generator=$network
    fi
}

# ---- Launch ------------------------------------------------------------------------------------
# torchrun, but when a worker fails, one line says which rank and how (the worker has printed why) instead of
# torchrun's traceback of its own; the exit status is the worker's (128 + N for a signal N), so that a scheduler
# sees a stop by SIGTERM as 143. Run as `PYTHON -c "$quiet_torchrun" TORCHRUN ARGS...` with TORCHRUN's Python.
read -r -d '' quiet_torchrun <<'EOF' || true        # (read stops at the end with status 1)
import logging, os, runpy, signal, sys
path, sys.argv = sys.argv[1], sys.argv[1:]
logging.getLogger('torch.distributed.elastic.multiprocessing.api').addFilter(   # the line said below instead
    lambda record: not str(record.msg).startswith('failed (exitcode'))


def how(status):
    if status < 0:
        return f'was killed by signal {-status} ({signal.Signals(-status).name})', 128 - status
    return f'exited with status {status}', status


try:
    runpy.run_path(path, run_name='__main__')
except KeyboardInterrupt:
    sys.exit(128 + signal.SIGINT)
except Exception as e:
    if hasattr(e, 'get_first_failure'):              # ChildFailedError: a worker failed
        rank, failure = e.get_first_failure()
        what, status = how(failure.exitcode)
        others = f' ({len(e.failures)} ranks failed)' if len(e.failures) > 1 else ''
        print(f'torchrun: {os.path.basename(e.name)} {what} on rank {rank}{others}', file=sys.stderr)
    elif hasattr(e, 'sigval'):                       # SignalException: torchrun itself got a signal
        status = 128 + int(e.sigval)
        print(f'torchrun: stopped by signal {int(e.sigval)} ({signal.Signals(e.sigval).name})', file=sys.stderr)
    else:
        raise
    sys.exit(status if 0 < status < 256 else 1)
EOF

run() {  # run COMMAND...: shown, then run unless --dry-run; torchrun (a Python script, as pip makes it) quietly
    show "$@"
    ((dry_run)) && return
    local path first python=()
    if [[ $1 == torchrun ]]; then
        path=$(command -v torchrun) || die "torchrun is not on PATH: install PyTorch (pip install -r requirements.txt)"
        if read -r first < "$path" && [[ $first == '#!'*python* ]]; then
            read -ra python <<< "${first#\#!}"
            "${python[@]}" -c "$quiet_torchrun" "$path" "${@:2}"
            return
        fi
    fi
    "$@"
}

per_gpu_batch() {  # BATCH_GPU, else upstream's per-GPU batch or the largest divisor of a GPU's share below it
    local b=$batch prev='' arg           # (the batch: the last --batch among the extra arguments, else the run's)
    for arg in "${extra[@]}"; do
        if [[ $prev == --batch ]]; then b=$arg; elif [[ $arg == --batch=* ]]; then b=${arg#--batch=}; fi
        prev=$arg
    done
    [[ $b =~ ^[1-9][0-9]*$ ]] || b=$batch          # not a number: sida.py's check says so
    local share=$((b / (ngpu * nnodes))) per=$batch_gpu
    while ((per > 1 && share % per)); do per=$((per - 1)); done
    echo "${BATCH_GPU:-$per}"
}

check_extra() {  # a real launch: the extra arguments through sida.py's (eval: fid.py's) checks, before downloads
    ((dry_run)) && return 0
    local given=()
    [[ $mode == train ]] && given=(--batch "$batch" --batch-gpu "$per_gpu")
    "${PYTHON:-python3}" - "$here" "$mode" "$outdir" "${given[@]}" "${extra[@]}" <<'EOF' || exit 1
import sys
here, mode, outdir, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
sys.path.insert(0, here)
sys.argv[0] = 'fid.py' if mode == 'eval' else 'sida.py'     # the program argparse names
try:
    import fid, sida
except ImportError:          # no torch here: torchrun's Python checks them instead
    sys.exit(0)
if mode == 'eval':
    fid.parse_args(['gen', '--network', '-', '--ref', '-', *extra])     # exits 1 with one line
else:
    try:
        sida.parse_args(['--outdir', outdir, *extra])
    except sida.UserError as e:
        sys.exit(f'error: {e}')
EOF
}

launch() {  # after the script's settings: environment, checks, downloads, then torchrun
    duration=${DURATION:-$duration}
    outdir=${OUTDIR:-runs/$name-$method}
    check_machines
    [[ $mode == train ]] && per_gpu=$(per_gpu_batch)
    check_data
    check_extra
    download
    local launcher args
    # torchrun passes a SIGTERM on to the workers and kills them 30 s later (torch's default), before a large
    # run has finished its iteration and saved its state: give them 10 minutes (torch 2.13 reads this variable).
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
    # One CPU thread per worker, torchrun's own default for several workers, said here so that it does not
    # print a four-line warning at every launch.
    if ((ngpu > 1)); then export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
    if ((nnodes == 1)) && [[ -z ${MASTER_ADDR:-} ]]; then
        launcher=(torchrun --standalone --nproc_per_node="$ngpu")
    else
        launcher=(torchrun --nnodes="$nnodes" --node_rank="$node_rank" --nproc_per_node="$ngpu"
                  --master_addr="$MASTER_ADDR" --master_port="$master_port")
    fi
    if [[ $mode == eval ]]; then   # FID-50k (one step per image) and what the script's fid_flags add
        args=(gen --network "$network" --ref "$ref" --detector "$detector" --num-images 50000 "${fid_flags[@]}")
        run "${launcher[@]}" "$here/fid.py" "${args[@]}" "${extra[@]}"
        return
    fi
    args=(--method "$method" --teacher "$teacher" "${data_flags[@]}" --outdir "$outdir"
          --alpha "$alpha" --tmax "$tmax" --init-sigma "$init_sigma"
          --batch "$batch" --lr "$lr" --glr "$lr" --precision "$precision"
          --dropout "$dropout" --augment "$augment" --ema "$ema" --p-mean "$p_mean" --p-std "$p_std"
          --lsg "$lsg" --duration "$duration" --tick "$tick" --snap "$snap" --dump "$dump"
          --metrics fid50k --ref "$ref" --detector "$detector" "${run_flags[@]}")
    [[ $method != sid ]] && args+=(--lsd "$lsd" --lsg-gan "$lsg_gan")
    [[ $method == sid2a ]] && args+=(--init-generator "$init_generator")
    args+=(--batch-gpu "$per_gpu")
    run "${launcher[@]}" "$here/sida.py" "${args[@]}" "${extra[@]}"
}
