#!/usr/bin/env bash
# Distil a class-conditional ImageNet teacher into a one-step generator with SiD (Zhou et al.,
# ICML 2024), SiDA or SiD²A (Zhou et al., ICLR 2025), using the settings of the paper's runs:
# ImageNet 64x64 from EDM's ADM teacher, ImageNet 512x512 from the EDM2 teachers XS ... XXL
# (in the latent space of Stability's VAE). ImageNet itself cannot be downloaded automatically:
# prepare it once (the script says how when DATA is missing); everything else (teacher, FID
# reference statistics, Inception detector, SiD generator for sid2a) is downloaded once into a
# cache. sida.py measures FID-50k on the generator's EMA at every snapshot. `eval` scores the
# released generator of the same run instead (FID-50k with fid.py; no dataset needed; EDM2
# generators are decoded by the Stable Diffusion VAE, which needs diffusers).
#
#   DATA=datasets/imagenet-64x64.zip ./train_imagenet.sh sida 64
#   DATA=datasets/img512-sd.zip ./train_imagenet.sh sid2a 512-xs --dry-run
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=10.0.0.1 ./train_imagenet.sh sida 512-xxl   # on each node
#   ./train_imagenet.sh eval sida 512-xs          # FID-50k of the released SiDA EDM2-XS generator
#
# Extra arguments are appended to sida.py's (eval: fid.py's) command line as they are; argparse
# keeps the last value of a repeated flag, so e.g. `--alpha 1.2` overrides the value set here.
#
# Environment (all optional):
#   DATA            dataset zip (default: datasets/imagenet-64x64.zip or datasets/img512-sd.zip)
#   NGPU            GPUs per node (default: counted with nvidia-smi, else 1)
#   BATCH_GPU       per-GPU micro-batch, passed as --batch-gpu (default: sida.py's choice)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (default: one node)
#   SIDA_CACHE      download cache (default: ~/.cache/sida)
#   OUTDIR          run directory (default: runs/imagenet64-<method> or runs/img512-<size>-<method>)
#   DURATION        training length in Mimg (default: the paper's, see below)
#   INIT_GENERATOR  SiD generator that starts a sid2a run, local file or URL
#                   (default: the released SiD generator for the same teacher)
#   NETWORK         eval: the generator to score, local file or URL (default: the released one)
#   PYTHON          interpreter used to check DATA (default: python3)
set -euo pipefail

usage() {
    cat >&2 <<EOF
usage: $(basename "$0") [eval] METHOD RES [--dry-run] [sida.py or fid.py arguments ...]
  eval    score the released generator (FID-50k) instead of training
  METHOD  sid | sida | sid2a
  RES     64 | 512-xs | 512-s | 512-m | 512-l | 512-xl | 512-xxl
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
res=${positional[1]}
[[ $method =~ ^(sid|sida|sid2a)$ ]] || usage
[[ $res =~ ^(64|512-(xs|s|m|l|xl|xxl))$ ]] || usage

# ---- Settings of the official runs (upstream's launch scripts); SiDA's, with the method's changes below ---------
cache=${SIDA_CACHE:-$HOME/.cache/sida}
edm=https://nvlabs-fi-cdn.nvidia.com/edm
detector_url=https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt
alpha=1.0         # weight of SiD's bias-correction term
tmax=800          # largest diffusion time (of 1000) the generator loss looks at
init_sigma=2.5    # noise level at which the one-step generator denoises pure noise
precision=fp16
augment=0         # no augmentation on ImageNet
ema=2             # half-life of the generator's EMA, Mimg
lsg=100           # SiD generator loss scale
lsg_gan=0.01      # adversarial generator loss scale (SiDA, SiD²A)
edm2_flags=()     # EDM2 only: log-variance weighting and forced weight normalisation
sid2a_duration=100  # SiD²A training length, Mimg (paper: 20-100 Mimg from the SiD generator)
# Released generators, listed in the README of the official SiDA code (`python fid.py names`).
hub=https://huggingface.co/UT-Austin-PML/SiDA/resolve/main
declare -A released
if [[ $res == 64 ]]; then
    name=imagenet64
    teacher_url=$edm/pretrained/edm-imagenet-64x64-cond-adm.pkl
    ref_url=$edm/fid-refs/imagenet-64x64.npz
    released=([sid]=https://huggingface.co/UT-Austin-PML/SiD/resolve/main/imagenet64/alpha1.2/network-snapshot-1.200000-939176.pkl
              [sida]=$hub/EDM_distillation/imgnet64_sida_alpha1-249167.pkl
              [sid2a]=$hub/EDM_distillation/imgnet64_sid2a_alpha1-029499.pkl)
    data=${DATA:-datasets/imagenet-64x64.zip}
    data_kind=png
    batch=8192    # images per iteration, all GPUs together
    lr=4e-6       # Adam learning rate of the fake score network and of the generator (lr = glr)
    dropout=0.1   # dropout of the trained networks (fake score network, generator)
    p_mean=-1.2   # log-normal noise levels of the fake-score loss, EDM's training values
    p_std=1.2
    lsd=1         # discriminator loss scale (SiDA, SiD²A)
    duration=300  # training length, Mimg
    tick=500      # progress line every 500 kimg (61 iterations)
    snap=10       # generator snapshot + FID-50k every 10 ticks = 5 Mimg
    dump=10       # full training state for --resume every 10 ticks
else
    size=${res#512-}
    name=img512-$size
    # EDM2's post-hoc EMA reconstructions with the best FID without guidance (EDM2 README), the
    # released SiD, SiDA and SiD²A generators, and the SiD²A duration of upstream's run scripts.
    case $size in
        xs)  teacher_file=edm2-img512-xs-2147483-0.135.pkl;  sid2a_duration=30
             files=(sid_alpha1-249360 sida_alpha1-166410 sid2a_alpha1-028674) ;;
        s)   teacher_file=edm2-img512-s-2147483-0.130.pkl;   sid2a_duration=80
             files=(sid_alpha1-192010 sida_alpha1-117764 sid2a_alpha1-075268) ;;
        m)   teacher_file=edm2-img512-m-2147483-0.100.pkl;   sid2a_duration=200
             files=(sid_alpha1-226830 sida_alpha1-115716 sid2a_alpha1-044036) ;;
        l)   teacher_file=edm2-img512-l-1879048-0.085.pkl;   sid2a_duration=55
             files=(sid_alpha1-203788 sida_alpha1-166918 sid2a_alpha1-050182) ;;
        # The official README lists XL's SiDA generator under a file name that says sid2a,
        xl)  teacher_file=edm2-img512-xl-1342177-0.085.pkl;  sid2a_duration=50
             files=(sid_alpha1-234004 sid2a_alpha1-024578 sid2a_alpha1-079495) ;;
        # and XXL's SiD generator under one that says sida; it lists no XXL SiD²A generator.
        xxl) teacher_file=edm2-img512-xxl-0939524-0.070.pkl; sid2a_duration=30
             files=(sida_alpha1-077932 sida_alpha1-089816 '') ;;
    esac
    teacher_url=https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/$teacher_file
    ref_url=https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl
    released=([sid]=$hub/EDM2_distillation/edm2_img512_${size}_${files[0]}.pkl
              [sida]=$hub/EDM2_distillation/edm2_img512_${size}_${files[1]}.pkl
              [sid2a]=${files[2]:+$hub/EDM2_distillation/edm2_img512_${size}_${files[2]}.pkl})
    data=${DATA:-datasets/img512-sd.zip}
    data_kind=npy
    batch=2048    # images per iteration, all GPUs together
    lr=5e-5       # Adam learning rate of the fake score network and of the generator (lr = glr)
    dropout=0.1   # dropout of the trained networks; none for the small teachers XS and S
    if [[ $size == xs || $size == s ]]; then dropout=0; fi
    p_mean=-0.4   # log-normal noise levels of the fake-score loss, EDM2's training values
    p_std=1.0
    lsd=100       # discriminator loss scale (SiDA, SiD²A)
    duration=200  # training length, Mimg; XXL 100 (upstream's run scripts)
    if [[ $size == xxl ]]; then duration=100; fi
    # Upstream's run scripts train S without log-variance weighting and forced weight normalisation,
    # every other size with both (SiD: the SiDA settings, so the same).
    if [[ $size == s ]]; then edm2_flags=(--no-logvar --no-force-norm); else edm2_flags=(--logvar --force-norm); fi
    tick=100      # progress line every 100 kimg (49 iterations)
    snap=50       # generator snapshot + FID-50k every 50 ticks = 5 Mimg
    dump=50       # full training state for --resume every 50 ticks
fi

case $method in
    # SiD: the SiDA settings without the adversarial loss, alpha as in the released SiD
    # generators: 1.2 at 64x64 (SiD paper), 1.0 for EDM2 (files named edm2_img512_*_sid_alpha1-*).
    sid)   if [[ $res == 64 ]]; then alpha=1.2; fi ;;
    sida)  ;;
    sid2a) duration=$sid2a_duration ;;
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
    "${PYTHON:-python3}" - "$data" "$data_kind" <<'EOF' 2>&1 || true
import json, sys, zipfile
path, ext = sys.argv[1:]
try:
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
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
how_to_prepare() {
    cat <<EOF
ImageNet cannot be downloaded automatically; prepare it once, then point DATA at the zip.
1. Download the ImageNet training set (ILSVRC2012), e.g. Kaggle's "ImageNet Object Localization
   Challenge", and unpack it into downloads/imagenet.
EOF
    if [[ $res == 64 ]]; then cat <<EOF
2. Convert it into an EDM-style zip of 64x64 PNGs with the class labels in dataset.json, using
   dataset_tool.py from https://github.com/NVlabs/edm:
     python dataset_tool.py --source=downloads/imagenet/ILSVRC/Data/CLS-LOC/train \\
         --dest=datasets/imagenet-64x64.zip --resolution=64x64 --transform=center-crop
3. Run again with DATA=datasets/imagenet-64x64.zip (or wherever you put it).
EOF
    else cat <<EOF
2. Convert it into an EDM-style zip of 512x512 PNGs (ADM's centre crop) with the class labels in
   dataset.json, using dataset_tool.py from https://github.com/NVlabs/edm2:
     python dataset_tool.py convert --source=downloads/imagenet/ILSVRC/Data/CLS-LOC/train \\
         --dest=datasets/img512.zip --resolution=512x512 --transform=center-crop-dhariwal
3. Encode that zip into an EDM2 latent zip: one .npy per image holding the mean and std of
   Stability's VAE (stabilityai/sd-vae-ft-mse), 8x64x64, and the labels in dataset.json. Either
   with the same dataset_tool.py:
     python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
   or with this project's tool (pip install diffusers), which reads the same 512x512 zip:
     python sida.py --prepare-latents datasets/img512.zip datasets/img512-sd.zip
4. Run again with DATA=datasets/img512-sd.zip (or wherever you put it).
EOF
    fi
    echo "SiD uses only the labels of this file (to condition the generator); SiDA and SiD²A also"
    echo "train on its images. The script asks for it for every method."
}
problem=
[[ $mode == eval ]] || problem=$(data_problem)     # scoring a generator needs no dataset
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

# The script fetches the teacher itself (rather than letting each torchrun rank resolve a name)
# so that a multi-GB EDM2 pickle is downloaded once per node.
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
if [[ $mode == eval && -z ${NETWORK:-} && -z ${released[$method]} ]]; then
    die "no released $method generator for $res (the official README lists none); set NETWORK"
fi
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
if [[ $mode == eval ]]; then   # FID-50k, one step per image (EDM2: decoded by the VAE, 16 per GPU at a time)
    command=("${launcher[@]}" "$here/fid.py" gen --network "$network" --ref "$ref" --detector "$detector"
             --num-images 50000 --init-sigma "$init_sigma")
    [[ $res == 64 ]] || command+=(--batch 16)
    command+=("${extra[@]}")
    show "${command[@]}"
    ((dry_run)) || "${command[@]}"
    exit
fi
args=(--method "$method" --teacher "$teacher" --data "$data" --cond --outdir "$outdir"
      --alpha "$alpha" --tmax "$tmax" --init-sigma "$init_sigma"
      --batch "$batch" --lr "$lr" --glr "$lr" --precision "$precision"
      --dropout "$dropout" --augment "$augment" --ema "$ema" --p-mean "$p_mean" --p-std "$p_std"
      --lsg "$lsg" --duration "$duration" --tick "$tick" --snap "$snap" --dump "$dump"
      --metrics fid50k --ref "$ref" --detector "$detector")
args+=("${edm2_flags[@]}")
[[ $method != sid ]] && args+=(--lsd "$lsd" --lsg-gan "$lsg_gan")
[[ $method == sid2a ]] && args+=(--init-generator "$init_generator")
[[ -n ${BATCH_GPU:-} ]] && args+=(--batch-gpu "$BATCH_GPU")

command=("${launcher[@]}" "$here/sida.py" "${args[@]}" "${extra[@]}")
show "${command[@]}"
((dry_run)) || "${command[@]}"
