#!/usr/bin/env bash
# Distil the EDM CIFAR-10 teacher into a one-step generator with SiD (Zhou et al., ICML 2024),
# SiDA or SiD²A (Zhou et al., ICLR 2025), using the settings of the paper's official runs.
# One command takes a fresh GPU machine to a finished run: it downloads the teacher, CIFAR-10,
# the FID reference statistics and the Inception detector once into a cache, then launches
# sida.py under torchrun; sida.py measures FID-50k on the generator's EMA at every snapshot.
# `eval` scores the released generator of the same run instead: FID-50k and IS with fid.py.
#
#   ./train_cifar.sh sida uncond                     # all GPUs of this machine
#   ./train_cifar.sh sid cond --dry-run              # print every command, run nothing
#   NGPU=4 BATCH_GPU=32 ./train_cifar.sh sid2a cond --seed 1    # extra args go to sida.py
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./train_cifar.sh sida uncond   # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 ./train_cifar.sh sida uncond   # on node 1
#   ./train_cifar.sh eval sida uncond                # FID-50k + IS of the released SiDA generator
#   NETWORK=runs/cifar10-uncond-sida/generator-best.pt ./train_cifar.sh eval sida uncond
#
# Extra arguments are appended to sida.py's (eval: fid.py's) command line as they are; argparse
# keeps the last value of a repeated flag, so e.g. `--tick 10` overrides the value set here.
#
# Environment (all optional):
#   NGPU            GPUs per node (default: counted with nvidia-smi, else 1)
#   BATCH_GPU       per-GPU micro-batch, passed as --batch-gpu (default: sida.py's choice)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (default: one node)
#   SIDA_CACHE      download cache (default: ~/.cache/sida)
#   OUTDIR          run directory (default: runs/cifar10-<cond>-<method>)
#   DURATION        training length in Mimg (default: the paper's, see below)
#   INIT_GENERATOR  SiD generator that starts a sid2a run, local file or URL
#                   (default: the released SiD generator for the same teacher)
#   NETWORK         eval: the generator to score, local file or URL (default: the released one)
set -euo pipefail

usage() {
    cat >&2 <<EOF
usage: $(basename "$0") [eval] METHOD COND [--dry-run] [sida.py or fid.py arguments ...]
  eval    score the released generator (FID-50k and IS) instead of training
  METHOD  sid | sida | sid2a
  COND    uncond | cond
  --dry-run  print the download and torchrun commands, run nothing
EOF
    exit 2
}
die() { echo "error: $*" >&2; exit 1; }

# ---- Arguments ---------------------------------------------------------------------------------
mode=train
if [[ ${1:-} == eval ]]; then mode='eval'; shift; fi
dry_run=0
positional=()
extra=()
for arg in "$@"; do
    case $arg in
        --dry-run) dry_run=1 ;;
        -h|--help) usage ;;
        *) if ((${#positional[@]} < 2)); then positional+=("$arg"); else extra+=("$arg"); fi ;;
    esac
done
((${#positional[@]} == 2)) || usage
method=${positional[0]}
cond=${positional[1]}
[[ $method =~ ^(sid|sida|sid2a)$ ]] || usage
[[ $cond =~ ^(uncond|cond)$ ]] || usage

# ---- Settings of the official runs (upstream's launch scripts); SiDA's, with the method's changes below ---------
cache=${SIDA_CACHE:-$HOME/.cache/sida}
batch=256         # images per iteration, all GPUs together
lr=1e-5           # Adam learning rate of the fake score network and of the generator (lr = glr)
alpha=1.0         # weight of SiD's bias-correction term
tmax=800          # largest diffusion time (of 1000) the generator loss looks at
init_sigma=2.5    # noise level at which the one-step generator denoises pure noise
precision=fp32
dropout=0.13      # dropout of the trained networks (fake score network, generator)
augment=0.12      # EDM augmentation probability, fake-score side only
ema=0.5           # half-life of the generator's EMA, Mimg
p_mean=-1.2       # log-normal noise levels of the fake-score loss, EDM's training values
p_std=1.2
lsg=100           # SiD generator loss scale
lsd=1             # discriminator loss scale (SiDA, SiD²A)
lsg_gan=0.01      # adversarial generator loss scale (SiDA, SiD²A)
duration=300      # training length, Mimg
tick=50           # progress line every 50 kimg (195 iterations)
snap=20           # generator snapshot + FID-50k every 20 ticks = 1 Mimg
dump=20           # full training state for --resume every 20 ticks

edm=https://nvlabs-fi-cdn.nvidia.com/edm
teacher_url=$edm/pretrained/edm-cifar10-32x32-$cond-vp.pkl
ref_url=$edm/fid-refs/cifar10-32x32.npz
detector_url=https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt
data_url=https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
# Released generators, listed in the README of the official SiDA code (SiD: alpha 1.2; SiDA and
# SiD²A: alpha 1.0; `python fid.py names` also lists the SiD²A generators with alpha 1.2).
hub=https://huggingface.co/UT-Austin-PML/SiDA/resolve/main/EDM_distillation
declare -A released
case $cond in
    uncond) released=([sid]=https://huggingface.co/UT-Austin-PML/SiD/resolve/main/cifar10-uncond/alpha1.2/network-snapshot-1.200000-403968.pkl
                      [sida]=$hub/cifar10_uncond_sida_alpha1-217920.pkl
                      [sid2a]=$hub/cifar10_uncond_sid2a_alpha1-028160.pkl) ;;
    cond)   released=([sid]=https://huggingface.co/UT-Austin-PML/SiD/resolve/main/cifar10-cond/alpha1.2/network-snapshot-1.200000-713312.pkl
                      [sida]=$hub/cifar10_cond_sida_alpha1-293184.pkl
                      [sid2a]=$hub/cifar10_cond_sid2a_alpha1-038912.pkl) ;;
esac

case $method in
    sid)   alpha=1.2; duration=500 ;;   # SiD paper: alpha 1.2, no adversarial loss, 500 Mimg
    sida)  ;;
    sid2a) duration=100 ;;              # paper: 20-100 Mimg from the SiD generator; we take 100
esac
duration=${DURATION:-$duration}
name=cifar10-$cond-$method
outdir=${OUTDIR:-runs/$name}

# ---- Machines ----------------------------------------------------------------------------------
count_gpus() {
    local n
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [[ $n =~ ^[0-9]+$ ]] && ((n > 0)); then echo "$n"; else echo 1; fi
}
ngpu=${NGPU:-$(count_gpus)}
nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
master_port=${MASTER_PORT:-29500}
for v in ngpu nnodes; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "error: ${v^^} must be a positive integer" >&2; usage; }
done
[[ $node_rank =~ ^[0-9]+$ ]] || { echo "error: NODE_RANK must be an integer" >&2; usage; }
if ((nnodes > 1)) && [[ -z ${MASTER_ADDR:-} ]]; then
    echo "error: NNODES=$nnodes needs MASTER_ADDR (the address of node 0)" >&2; usage
fi

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

fetch_network() {  # fetch_network SOURCE NAME: sets $network; a URL is downloaded once as $cache/NAME-<file>
    network=$1
    if [[ $network =~ ^[a-z]+:// ]]; then
        network=$cache/$2-${1##*/}
        fetch "$1" "$network"
    fi
}

teacher=$cache/${teacher_url##*/}
ref=$cache/${ref_url##*/}
detector=$cache/${detector_url##*/}
data=$cache/${data_url##*/}     # sida.py reads the CIFAR-10 tarball directly
if [[ $mode == train ]]; then
    fetch "$teacher_url" "$teacher"
    fetch "$data_url" "$data"
fi
fetch "$ref_url" "$ref"
fetch "$detector_url" "$detector"
if [[ $mode == eval ]]; then
    fetch_network "${NETWORK:-${released[$method]}}" "$method-cifar10-$cond"
elif [[ $method == sid2a ]]; then
    fetch_network "${INIT_GENERATOR:-${released[sid]}}" "sid-cifar10-$cond"
    init_generator=$network
fi

# ---- Launch ------------------------------------------------------------------------------------
if ((nnodes == 1)) && [[ -z ${MASTER_ADDR:-} ]]; then
    launcher=(torchrun --standalone --nproc_per_node="$ngpu")
else
    launcher=(torchrun --nnodes="$nnodes" --node_rank="$node_rank" --nproc_per_node="$ngpu"
              --master_addr="$MASTER_ADDR" --master_port="$master_port")
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [[ $mode == eval ]]; then   # FID-50k and IS (the paper's CIFAR-10 tables report both), one step per image
    command=("${launcher[@]}" "$here/fid.py" gen --network "$network" --ref "$ref" --detector "$detector"
             --num-images 50000 --is --init-sigma "$init_sigma" "${extra[@]}")
    show "${command[@]}"
    ((dry_run)) || "${command[@]}"
    exit
fi
args=(--method "$method" --teacher "$teacher" --data "$data" --outdir "$outdir"
      --alpha "$alpha" --tmax "$tmax" --init-sigma "$init_sigma"
      --batch "$batch" --lr "$lr" --glr "$lr" --precision "$precision"
      --dropout "$dropout" --augment "$augment" --ema "$ema" --p-mean "$p_mean" --p-std "$p_std"
      --lsg "$lsg" --duration "$duration" --tick "$tick" --snap "$snap" --dump "$dump"
      --metrics fid50k --ref "$ref" --detector "$detector")
[[ $cond == cond ]] && args+=(--cond)
[[ $method != sid ]] && args+=(--lsd "$lsd" --lsg-gan "$lsg_gan")
[[ $method == sid2a ]] && args+=(--init-generator "$init_generator")
[[ -n ${BATCH_GPU:-} ]] && args+=(--batch-gpu "$BATCH_GPU")

command=("${launcher[@]}" "$here/sida.py" "${args[@]}" "${extra[@]}")
show "${command[@]}"
((dry_run)) || "${command[@]}"
