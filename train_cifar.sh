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
#   ./train_cifar.sh eval sida uncond --trials 10    # the official protocol: 10 trials of 50k images
#   NETWORK=runs/cifar10-uncond-sida/generator-best.pt ./train_cifar.sh eval sida uncond
#
# Extra arguments are appended to sida.py's (eval: fid.py's) command line as they are; argparse
# keeps the last value of a repeated flag, so e.g. `--tick 10` overrides the value set here.
#
# Environment (all optional):
#   NGPU            GPUs per node (default: counted with nvidia-smi, else 1)
#   BATCH_GPU       per-GPU micro-batch, passed as --batch-gpu (default: the official run's, 32)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node rendezvous (default: one node)
#   SIDA_CACHE      download cache (default: ~/.cache/sida)
#   OUTDIR          run directory (default: runs/cifar10-<cond>-<method>)
#   DURATION        training length in Mimg (default: the paper's run)
#   INIT_GENERATOR  SiD generator that starts a sid2a run, local file or URL
#                   (default: the released SiD generator for the same teacher)
#   NETWORK         eval: the generator to score, local file or URL (default: the released one)
#   PYTHON          interpreter that checks the extra arguments (default: python3)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun gives the workers to save and stop after it passes
#                   on a SIGTERM (default here: 600; torch's: 30)
#   OMP_NUM_THREADS CPU threads per worker when there are several (default: 1, torchrun's)

# shellcheck source-path=SCRIPTDIR source=launch.sh
. "$(dirname "$0")/launch.sh"   # first: refuses bash < 4.4, sets -euo pipefail, brings the mechanics

# ---- Arguments: [eval] METHOD COND ------------------------------------------------------------
setting_name=COND
setting_choices=(uncond cond)
scores='FID-50k and IS'
parse_arguments "$@"    # sets mode (train or eval), method, setting, dry_run, extra
cond=$setting

# ---- Settings of the official runs (upstream's launch scripts) --------------------------------
# SiDA's; SiD and SiD²A change what `case $method` below says. launch.sh says what each one means.
batch=256 batch_gpu=32 lr=1e-5 precision=fp32 dropout=0.13 augment=0.12 ema=0.5
alpha=1.0 tmax=800 init_sigma=2.5 p_mean=-1.2 p_std=1.2    # p_mean, p_std: EDM's training values
lsg=100 lsd=1 lsg_gan=0.01
duration=300 tick=50 snap=20 dump=20   # Mimg; a line every 50 kimg (195 iterations), FID-50k every 1 Mimg

edm=https://nvlabs-fi-cdn.nvidia.com/edm
name=cifar10-$cond
teacher_url=$edm/pretrained/edm-cifar10-32x32-$cond-vp.pkl
ref_url=$edm/fid-refs/cifar10-32x32.npz
data_url=https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz
data=$cache/${data_url##*/}     # sida.py reads the CIFAR-10 tarball directly
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

# This run's own flags: data_flags follow --teacher in the sida.py command, run_flags follow the
# shared settings; fid_flags are eval's (fid.py gen).
data_flags=(--data "$data")
if [[ $cond == cond ]]; then run_flags=(--cond); fi
fid_flags=(--is --init-sigma "$init_sigma")   # the paper's CIFAR-10 tables report FID and IS

launch    # checks the machines and DATA, downloads what is missing, runs torchrun
