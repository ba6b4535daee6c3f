#!/usr/bin/env bash
# Distil EDM's unconditional FFHQ 64x64 or AFHQv2 64x64 teacher into a one-step generator with SiD
# (Zhou et al., ICML 2024), SiDA or SiD²A (Zhou et al., ICLR 2025), using the settings of the paper's
# official runs. The datasets cannot be downloaded by a script: prepare the 64x64 zip once (the
# script says how when DATA is missing); everything else (teacher, FID reference statistics,
# Inception detector, SiD generator for sid2a) is downloaded once into a cache. sida.py measures
# FID-50k on the generator's EMA at every snapshot. SiD trains on generated images alone and needs
# no dataset. `eval` scores the released generator of the same run instead (FID-50k with fid.py).
#
#   DATA=datasets/ffhq-64x64.zip ./train_ffhq_afhq.sh sida ffhq
#   DATA=datasets/afhqv2-64x64.zip ./train_ffhq_afhq.sh sid2a afhq --dry-run
#   ./train_ffhq_afhq.sh eval sida ffhq           # FID-50k of the released SiDA FFHQ generator
#
# Extra arguments are appended to sida.py's (eval: fid.py's) command line as they are; argparse
# keeps the last value of a repeated flag, so e.g. `--tick 10` overrides the value set here.
#
# Environment (all optional):
#   DATA            dataset zip, SiDA and SiD²A (default: datasets/ffhq-64x64.zip or datasets/afhqv2-64x64.zip)
#   NGPU            GPUs per node (default: counted with nvidia-smi, else 1)
#   BATCH_GPU       per-GPU micro-batch, passed as --batch-gpu (default: sida.py's choice)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (default: one node)
#   SIDA_CACHE      download cache (default: ~/.cache/sida)
#   OUTDIR          run directory (default: runs/ffhq64-<method> or runs/afhq64-<method>)
#   DURATION        training length in Mimg (default: the paper's, see below)
#   INIT_GENERATOR  SiD generator that starts a sid2a run, local file or URL
#                   (default: the released SiD generator for the same teacher)
#   NETWORK         eval: the generator to score, local file or URL (default: the released one)
#   PYTHON          interpreter used to check DATA (default: python3)
set -euo pipefail

usage() {
    cat >&2 <<EOF
usage: $(basename "$0") [eval] METHOD DATA [--dry-run] [sida.py or fid.py arguments ...]
  eval    score the released generator (FID-50k) instead of training
  METHOD  sid | sida | sid2a
  DATA    ffhq | afhq       (FFHQ 64x64, AFHQv2 64x64)
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
dataset=${positional[1]}
[[ $method =~ ^(sid|sida|sid2a)$ ]] || usage
[[ $dataset =~ ^(ffhq|afhq)$ ]] || usage

# ---- Settings of the official runs; SiDA's, with the method's changes below --------------------
cache=${SIDA_CACHE:-$HOME/.cache/sida}
batch=512         # images per iteration, all GPUs together
lr=1e-5           # Adam learning rate of the fake score network and of the generator (lr = glr); AFHQv2 5e-6
alpha=1.0         # weight of SiD's bias-correction term
tmax=800          # largest diffusion time (of 1000) the generator loss looks at
init_sigma=2.5    # noise level at which the one-step generator denoises pure noise
precision=fp16
dropout=0.05      # dropout of the trained networks (fake score network, generator)
augment=0.15      # EDM augmentation probability, fake-score side only
ema=0.5           # half-life of the generator's EMA, Mimg
p_mean=-1.2       # log-normal noise levels of the fake-score loss, EDM's training values
p_std=1.2
lsg=100           # SiD generator loss scale
lsd=1             # discriminator loss scale (SiDA, SiD²A)
lsg_gan=0.01      # adversarial generator loss scale (SiDA, SiD²A)
duration=200      # training length, Mimg
tick=100          # progress line every 100 kimg (195 iterations)
snap=50           # generator snapshot + FID-50k every 50 ticks = 5 Mimg
dump=50           # full training state for --resume every 50 ticks

edm=https://nvlabs-fi-cdn.nvidia.com/edm
detector_url=https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt
sid_hub=https://huggingface.co/UT-Austin-PML/SiD/resolve/main
hub=https://huggingface.co/UT-Austin-PML/SiDA/resolve/main/EDM_distillation
# Released generators, listed in the README of the official SiDA code (`python fid.py names`;
# SiD: alpha 1.2, SiDA and SiD²A: alpha 1.0).
declare -A released
case $dataset in
    ffhq) name=ffhq64; edm_name=ffhq-64x64
          released=([sid]=$sid_hub/ffhq64/alpha1.2/network-snapshot-1.200000-498176.pkl
                    [sida]=$hub/ffhq64_sida_alpha1-185856.pkl
                    [sid2a]=$hub/ffhq64_sid2a_alpha1-168960.pkl) ;;
    afhq) name=afhq64; edm_name=afhqv2-64x64; lr=5e-6
          # The release table gives this SiD generator alpha 1.2; its path says alpha1.
          released=([sid]=$sid_hub/afhq64/alpha1/network-snapshot-1.000000-371712.pkl
                    [sida]=$hub/afhq64-v2_sida_alpha1-127488.pkl
                    [sid2a]=$hub/afhq64-v2_sid2a_alpha1-175104.pkl) ;;
esac
teacher_url=$edm/pretrained/edm-$edm_name-uncond-vp.pkl
ref_url=$edm/fid-refs/$edm_name.npz
data=${DATA:-datasets/$edm_name.zip}

case $method in
    # SiD: the SiDA settings without the adversarial loss, alpha 1.2 (SiD paper).
    sid)   alpha=1.2 ;;
    sida)  ;;
    sid2a) duration=100 ;;   # paper: 20-100 Mimg from the SiD generator; we take 100
esac
duration=${DURATION:-$duration}
outdir=${OUTDIR:-runs/$name-$method}

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

# ---- Dataset (prepared by hand; checked before anything is downloaded) ------------------------
data_problem() {  # prints what is wrong with $data, nothing when it looks right
    [[ -f $data ]] || { echo "no such file"; return; }
    "${PYTHON:-python3}" - "$data" <<'EOF' 2>&1 || true
import sys, zipfile
try:
    with zipfile.ZipFile(sys.argv[1]) as z:
        if not any(n.endswith('.png') for n in z.namelist()):
            sys.exit('the zip holds no .png files')
except zipfile.BadZipFile:
    sys.exit('not a zip file')
EOF
}
how_to_prepare() {
    if [[ $dataset == ffhq ]]; then cat <<EOF
FFHQ cannot be downloaded automatically; prepare it once, then point DATA at the zip.
1. Download the FFHQ images at 1024x1024 (https://github.com/NVlabs/ffhq-dataset) into
   downloads/ffhq/images1024x1024.
2. Convert them into an EDM-style zip of 64x64 PNGs with dataset_tool.py from
   https://github.com/NVlabs/edm:
     python dataset_tool.py --source=downloads/ffhq/images1024x1024 \\
         --dest=datasets/ffhq-64x64.zip --resolution=64x64
3. Run again with DATA=datasets/ffhq-64x64.zip (or wherever you put it).
EOF
    else cat <<EOF
AFHQv2 cannot be downloaded automatically; prepare it once, then point DATA at the zip.
1. Download AFHQv2 (https://github.com/clovaai/stargan-v2, afhq-v2-dataset) and unpack it into
   downloads/afhqv2.
2. Convert it into an EDM-style zip of 64x64 PNGs with dataset_tool.py from
   https://github.com/NVlabs/edm:
     python dataset_tool.py --source=downloads/afhqv2 \\
         --dest=datasets/afhqv2-64x64.zip --resolution=64x64
3. Run again with DATA=datasets/afhqv2-64x64.zip (or wherever you put it).
EOF
    fi
    echo "SiDA and SiD²A train on its images; SiD needs no dataset."
}
problem=
[[ $mode == eval || $method == sid ]] || problem=$(data_problem)
if [[ -n $problem ]]; then
    if ((dry_run)); then
        echo "warning: DATA=$data: $problem; a real run would stop here and say how to prepare it" >&2
    else
        { echo "error: DATA=$data: $problem"; how_to_prepare; } >&2
        exit 1
    fi
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
[[ $mode == eval ]] || fetch "$teacher_url" "$teacher"
fetch "$ref_url" "$ref"
fetch "$detector_url" "$detector"
if [[ $mode == eval ]]; then
    fetch_network "${NETWORK:-${released[$method]}}" "$method-$name"
elif [[ $method == sid2a ]]; then
    fetch_network "${INIT_GENERATOR:-${released[sid]}}" "sid-$name"
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
if [[ $mode == eval ]]; then   # FID-50k, one step per image
    command=("${launcher[@]}" "$here/fid.py" gen --network "$network" --ref "$ref" --detector "$detector"
             --num-images 50000 --init-sigma "$init_sigma" "${extra[@]}")
    show "${command[@]}"
    ((dry_run)) || "${command[@]}"
    exit
fi
args=(--method "$method" --teacher "$teacher" --outdir "$outdir"
      --alpha "$alpha" --tmax "$tmax" --init-sigma "$init_sigma"
      --batch "$batch" --lr "$lr" --glr "$lr" --precision "$precision"
      --dropout "$dropout" --augment "$augment" --ema "$ema" --p-mean "$p_mean" --p-std "$p_std"
      --lsg "$lsg" --duration "$duration" --tick "$tick" --snap "$snap" --dump "$dump"
      --metrics fid50k --ref "$ref" --detector "$detector")
[[ $method != sid ]] && args+=(--data "$data" --lsd "$lsd" --lsg-gan "$lsg_gan")
[[ $method == sid2a ]] && args+=(--init-generator "$init_generator")
[[ -n ${BATCH_GPU:-} ]] && args+=(--batch-gpu "$BATCH_GPU")

command=("${launcher[@]}" "$here/sida.py" "${args[@]}" "${extra[@]}")
show "${command[@]}"
((dry_run)) || "${command[@]}"
