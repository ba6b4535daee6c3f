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
#   ./train_imagenet.sh eval sida 64 --trials 10  # the official protocol: 10 trials of 50k images
#
# Extra arguments are appended to sida.py's (eval: fid.py's) command line as they are; argparse
# keeps the last value of a repeated flag, so e.g. `--alpha 1.2` overrides the value set here.
#
# Environment (all optional):
#   DATA            dataset zip (default: datasets/imagenet-64x64.zip or datasets/img512-sd.zip)
#   NGPU            GPUs per node (default: counted with nvidia-smi, else 1)
#   BATCH_GPU       per-GPU micro-batch, passed as --batch-gpu (default: the official run's: 32 at 64x64;
#                   64 for EDM2 XS and S, 32 for M and L, 16 for XL, 2 for XXL)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (default: one node)
#   SIDA_CACHE      download cache (default: ~/.cache/sida)
#   OUTDIR          run directory (default: runs/imagenet64-<method> or runs/img512-<size>-<method>)
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

# ---- Arguments: [eval] METHOD RES -------------------------------------------------------------
setting_name=RES
setting_choices=(64 512-xs 512-s 512-m 512-l 512-xl 512-xxl)
scores='FID-50k'
parse_arguments "$@"    # sets mode (train or eval), method, setting, dry_run, extra
res=$setting

# ---- Settings of the official runs (upstream's launch scripts) --------------------------------
# SiDA's; SiD and SiD²A change what `case $method` below says. launch.sh says what each one means.
# Per resolution below: batch, batch_gpu, lr, dropout, p_mean, p_std, lsd, duration, tick, snap, dump.
precision=fp16 augment=0 ema=2         # no augmentation on ImageNet
alpha=1.0 tmax=800 init_sigma=2.5 lsg=100 lsg_gan=0.01
edm2_flags=()     # EDM2 only: log-variance weighting and forced weight normalisation
sid2a_duration=100  # SiD²A training length, Mimg (paper: 20-100 Mimg from the SiD generator)

edm=https://nvlabs-fi-cdn.nvidia.com/edm
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
    data_check=(png labels)   # what DATA must hold: PNG images and the class labels
    batch=8192 batch_gpu=32 lr=4e-6 dropout=0.1
    p_mean=-1.2 p_std=1.2 lsd=1          # p_mean, p_std: EDM's training values
    duration=300 tick=500 snap=10 dump=10   # Mimg; a line every 500 kimg (61 iterations), FID-50k every 5 Mimg
else
    size=${res#512-}
    name=img512-$size
    # EDM2's post-hoc EMA reconstructions with the best FID without guidance (EDM2 README), the
    # released SiD, SiDA and SiD²A generators, and the SiD²A duration of upstream's run scripts.
    case $size in
        xs)  teacher_file=edm2-img512-xs-2147483-0.135.pkl;  sid2a_duration=30 batch_gpu=64
             files=(sid_alpha1-249360 sida_alpha1-166410 sid2a_alpha1-028674) ;;
        s)   teacher_file=edm2-img512-s-2147483-0.130.pkl;   sid2a_duration=80 batch_gpu=64
             files=(sid_alpha1-192010 sida_alpha1-117764 sid2a_alpha1-075268) ;;
        m)   teacher_file=edm2-img512-m-2147483-0.100.pkl;   sid2a_duration=200 batch_gpu=32
             files=(sid_alpha1-226830 sida_alpha1-115716 sid2a_alpha1-044036) ;;
        l)   teacher_file=edm2-img512-l-1879048-0.085.pkl;   sid2a_duration=55 batch_gpu=32
             files=(sid_alpha1-203788 sida_alpha1-166918 sid2a_alpha1-050182) ;;
        # The official README lists XL's SiDA generator under a file name that says sid2a,
        xl)  teacher_file=edm2-img512-xl-1342177-0.085.pkl;  sid2a_duration=50 batch_gpu=16
             files=(sid_alpha1-234004 sid2a_alpha1-024578 sid2a_alpha1-079495) ;;
        # and XXL's SiD generator under one that says sida; it lists no XXL SiD²A generator.
        xxl) teacher_file=edm2-img512-xxl-0939524-0.070.pkl; sid2a_duration=30 batch_gpu=2
             files=(sida_alpha1-077932 sida_alpha1-089816 '') ;;
    esac
    teacher_url=https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/$teacher_file
    ref_url=https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl
    released=([sid]=$hub/EDM2_distillation/edm2_img512_${size}_${files[0]}.pkl
              [sida]=$hub/EDM2_distillation/edm2_img512_${size}_${files[1]}.pkl
              [sid2a]=${files[2]:+$hub/EDM2_distillation/edm2_img512_${size}_${files[2]}.pkl})
    data=${DATA:-datasets/img512-sd.zip}
    data_check=(npy labels)   # what DATA must hold: VAE latents (.npy) and the class labels
    batch=2048 lr=5e-5 dropout=0.1       # dropout: none for the small teachers XS and S
    if [[ $size == xs || $size == s ]]; then dropout=0; fi
    p_mean=-0.4 p_std=1.0 lsd=100        # p_mean, p_std: EDM2's training values
    duration=200 tick=100 snap=50 dump=50   # Mimg; a line every 100 kimg (49 iterations), FID-50k every 5 Mimg
    if [[ $size == xxl ]]; then duration=100; fi   # upstream's run scripts
    # Upstream's run scripts train S without log-variance weighting and forced weight normalisation,
    # every other size with both (SiD: the SiDA settings, so the same).
    if [[ $size == s ]]; then edm2_flags=(--no-logvar --no-force-norm); else edm2_flags=(--logvar --force-norm); fi
fi

case $method in
    # SiD: the SiDA settings without the adversarial loss, alpha as in the released SiD
    # generators: 1.2 at 64x64 (SiD paper), 1.0 for EDM2 (files named edm2_img512_*_sid_alpha1-*).
    sid)   if [[ $res == 64 ]]; then alpha=1.2; fi ;;
    sida)  ;;
    sid2a) duration=$sid2a_duration ;;
esac

# This run's own flags: data_flags follow --teacher in the sida.py command, run_flags follow the
# shared settings; fid_flags are eval's (fid.py gen).
data_flags=(--data "$data" --cond)
run_flags=("${edm2_flags[@]}")
fid_flags=(--init-sigma "$init_sigma")   # FID-50k only
if [[ $res != 64 ]]; then fid_flags+=(--batch 16); fi   # the VAE decodes 16 images per GPU at a time

# ---- Dataset (prepared by hand; launch.sh checks it before anything is downloaded) -----------
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
     python networks.py encode-latents datasets/img512.zip datasets/img512-sd.zip
4. Run again with DATA=datasets/img512-sd.zip (or wherever you put it).
EOF
    fi
    echo "SiD uses only the labels of this file (to condition the generator); SiDA and SiD²A also"
    echo "train on its images. The script asks for it for every method."
}

launch    # checks the machines and DATA, downloads what is missing, runs torchrun
