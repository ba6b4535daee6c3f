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
#   ./train_ffhq_afhq.sh eval sida ffhq --trials 10   # the official protocol: 10 trials of 50k images
#
# Extra arguments are appended to sida.py's (eval: fid.py's) command line as they are; argparse
# keeps the last value of a repeated flag, so e.g. `--tick 10` overrides the value set here.
#
# Environment (all optional):
#   DATA            dataset zip, SiDA and SiD²A (default: datasets/ffhq-64x64.zip or datasets/afhqv2-64x64.zip)
#   NGPU            GPUs per node (default: counted with nvidia-smi, else 1)
#   BATCH_GPU       per-GPU micro-batch, passed as --batch-gpu (default: the official run's, 64)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (default: one node)
#   SIDA_CACHE      download cache (default: ~/.cache/sida)
#   OUTDIR          run directory (default: runs/ffhq64-<method> or runs/afhq64-<method>)
#   DURATION        training length in Mimg (default: the paper's run)
#   INIT_GENERATOR  SiD generator that starts a sid2a run, local file or URL
#                   (default: the released SiD generator for the same teacher)
#   NETWORK         eval: the generator to score, local file or URL (default: the released one)
#   PYTHON          interpreter that checks DATA and the extra arguments (default: python3)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun gives the workers to save and stop after it passes
#                   on a SIGTERM (default here: 600; torch's: 30)
#   OMP_NUM_THREADS CPU threads per worker when there are several (default: 1, torchrun's)

# shellcheck source-path=SCRIPTDIR source=launch.sh
. "$(dirname "$0")/launch.sh"   # first: refuses bash < 4.4, sets -euo pipefail, brings the mechanics

# ---- Arguments: [eval] METHOD DATA ------------------------------------------------------------
setting_name=DATA
setting_choices=(ffhq afhq)
setting_note='(FFHQ 64x64, AFHQv2 64x64)'
scores='FID-50k'
parse_arguments "$@"    # sets mode (train or eval), method, setting, dry_run, extra
dataset=$setting

# ---- Settings of the official runs ------------------------------------------------------------
# SiDA's; SiD and SiD²A change what `case $method` below says. launch.sh says what each one means.
batch=512 batch_gpu=64 lr=1e-5 precision=fp16 dropout=0.05 augment=0.15 ema=0.5    # AFHQv2: lr 5e-6 (below)
alpha=1.0 tmax=800 init_sigma=2.5 p_mean=-1.2 p_std=1.2    # p_mean, p_std: EDM's training values
lsg=100 lsd=1 lsg_gan=0.01
duration=200 tick=100 snap=50 dump=50   # Mimg; a line every 100 kimg (195 iterations), FID-50k every 5 Mimg

edm=https://nvlabs-fi-cdn.nvidia.com/edm
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
data_check=(png)   # what DATA must hold: PNG images (no labels: the teachers are unconditional)

case $method in
    # SiD: the SiDA settings without the adversarial loss, alpha 1.2 (SiD paper); it trains on
    # generated images alone, so it needs no dataset.
    sid)   alpha=1.2; data_check=() ;;
    sida)  ;;
    sid2a) duration=100 ;;   # paper: 20-100 Mimg from the SiD generator; we take 100
esac

# This run's own flags: run_flags follow the shared settings in the sida.py command (SiD: none, it
# takes no --data); fid_flags are eval's (fid.py gen).
if [[ $method != sid ]]; then run_flags=(--data "$data"); fi
fid_flags=(--init-sigma "$init_sigma")   # FID-50k only

# ---- Dataset (prepared by hand; launch.sh checks it before anything is downloaded) -----------
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

launch    # checks the machines and DATA, downloads what is missing, runs torchrun
