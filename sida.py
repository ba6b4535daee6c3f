#!/usr/bin/env python3
"""SiDA: Score identity Distillation with an Adversarial loss (Zhou et al., ICLR 2025).

The whole distillation loop in one file: a pretrained EDM/EDM2 denoiser (the teacher) becomes a one-step
generator. It reads top to bottom as the paper does: settings (flags, the toy preset, their checks); the
method (noise levels and the losses); data; networks; one iteration (the fake score update, then the
generator update); the training state; evaluation and the console; the loop; main. Elsewhere: the
networks and EDM's augmentation in networks.py, FID/IS in fid.py, the toy run's world in toy/, speed in
bench.py.

One process (CPU or one GPU):
    python sida.py --preset toy                     # offline toy run on the CPU (no downloads, ~3 min)
    python sida.py --teacher edm-cifar10-32x32-uncond-vp --data cifar-10-python.tar.gz \
        --ref cifar10-32x32 --outdir runs/c10
One node with 8 GPUs:
    torchrun --standalone --nproc_per_node=8 sida.py --teacher edm-cifar10-32x32-uncond-vp --data ...
Two nodes (run on both, NODE_RANK=0 and 1):
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --master_addr=$MASTER_ADDR \
        --master_port=29500 sida.py --teacher ... --data ...
Continue a run (run flags come from its saved state):
    python sida.py --resume runs/c10
The paper's runs, with every setting: train_cifar.sh, train_imagenet.sh, train_ffhq_afhq.sh.
"""

import argparse
import contextlib
import copy
import fcntl
import io
import json
import math
import os
import random
import re
import signal
import sys
import time
import warnings
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fid
import networks
import toy
from networks import UserError

# ----------------------------------------------------------------------------------------------------
# Settings. Defaults are the paper's CIFAR-10 unconditional SiDA run. Flags come in groups: the run's
# (saved with its state and kept on resume), the session's (may change on resume) and the tools'.

class HelpFormatter(argparse.HelpFormatter):
    """--help on one screen: a flag and its help on one line where they fit, the default named unless it is
    None or False (or the help says it), values shown by kind (N an integer, X a number)."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32, width=120)

    def _get_help_string(self, action):
        shown = action.default not in (None, argparse.SUPPRESS) and action.default is not False and 'default' not in action.help
        return action.help + (' (default: %(default)s)' if shown else '')

    def _get_default_metavar_for_optional(self, action):
        return {int: 'N', float: 'X'}.get(action.type, 'PATH')


class Parser(argparse.ArgumentParser):
    def error(self, message):         # an unknown or malformed flag: one line and status 1, as any bad input
        raise UserError(message)


def build_parser():
    p = Parser(description='SiD / SiDA / SiD²A distillation of EDM and EDM2 teachers. '
                                'Quick start: python sida.py --preset toy', usage='%(prog)s [flags]',
                                allow_abbrev=False, formatter_class=HelpFormatter)
    a = p.add_argument_group('run', 'fixed for a run: --resume keeps them (given again, they must agree)').add_argument
    a('--method',         default='sida', choices=['sid', 'sida', 'sid2a'], help='SiD, SiDA, or SiDA from a SiD generator')
    a('--cond',           action='store_true', help='class-conditional distillation (teacher must be conditional)')
    a('--alpha',          type=float, default=1.0,  help='weight of the bias-correction term of the SiD loss')
    a('--tmax',           type=int,   default=800,  help='largest noise step of the generator loss, out of 1000')
    a('--init-sigma',     type=float, default=2.5,  help='noise level at which the generator denoises z')
    a('--batch',          type=int,   default=256,  help='total batch over all GPUs and accumulation rounds')
    a('--lr',             type=float, default=1e-5, help='fake score network learning rate')
    a('--glr',            type=float, default=1e-5, help='generator learning rate')
    a('--ls',             type=float, default=1.0,  help='fake score loss scale')
    a('--lsg',            type=float, default=100., help='SiD generator loss scale')
    a('--lsd',            type=float, default=1.0,  help='discriminator loss scale')
    a('--lsg-gan',        type=float, default=0.01, help='adversarial generator loss scale')
    a('--ema',            type=float, default=0.5,  help='EMA half-life of the generator, Mimg')
    a('--ema-rampup',     type=float, default=0.05, help='EMA half-life at most this fraction of the images seen (EDM)')
    a('--dropout',        type=float, default=0.13, help='dropout of the trained networks')
    a('--augment',        type=float, default=0.12, help='augmentation probability on the fake-score side')
    a('--p-mean',         type=float, default=None, help="log-normal mean of the fake-score noise (default: the teacher's, EDM -1.2, EDM2 -0.4)")
    a('--p-std',          type=float, default=None, help="log-normal std of the fake-score noise (default: the teacher's, EDM 1.2, EDM2 1.0)")
    a('--logvar',         action=argparse.BooleanOptionalAction, default=True, help='EDM2: log-variance weighting of the losses')
    a('--force-norm',     action=argparse.BooleanOptionalAction, default=True, help="EDM2: forced weight normalisation of the generator's stored weights")
    a('--gen-start-kimg', type=float, default=100., help='generator steps start after this many kimg (SiDA)')
    a('--adv-start-kimg', type=float, default=200., help='adversarial generator term starts after this many kimg')
    a('--precision',      default='fp32', choices=['fp32', 'tf32', 'bf16', 'fp16'], help='arithmetic of the networks')
    a('--seed',           type=int,   default=0,    help='random seed')
    a = p.add_argument_group('session', 'may change when a run is resumed (restored when not given again)').add_argument
    a('--teacher',        default='edm-cifar10-32x32-uncond-vp', help='teacher: path, URL or official name')
    a('--init-generator', default=None,   help='SiD²A: generator to start from (path, URL or release name)')
    a('--data',           default=None,   help='real images: zip, folder, CIFAR-10 tarball or "toy" (SiD needs none)')
    a('--duration',       type=float, default=300., help='training length, Mimg')
    a('--batch-gpu',      type=int,   default=None, help='per-GPU batch of one accumulation round (default: all of it)')
    a('--tick',           type=float, default=50.,  help='one status line every this many kimg')
    a('--snap',           type=int,   default=50,   help='samples, generator snapshot and metrics every N ticks')
    a('--dump',           type=int,   default=50,   help='training state every N ticks')
    a('--metrics',        default='fid50k', metavar='LIST', help='comma list of fidNk, isNk, fd, fdNk, or none')
    a('--ref',            default=None,  help='reference statistics for FID (npz/pkl path, URL or name)')
    a('--detector',       default=None,  help='Inception detector (path or URL; default: the official URL)')
    a('--vae',            default=networks.VAE_NAME, help='EDM2: the Stable Diffusion VAE, hub name or folder')
    a('--compile',        action='store_true', help='torch.compile the networks')
    a('--max-nonfinite',  type=int,   default=100, help='stop after this many iterations in a row with no finite sample')
    a = p.add_argument_group('where and how', 'not saved with the run').add_argument
    a('--outdir',         default='runs/sida', help='where logs, samples and checkpoints go')
    a('--resume',         default=None,  help='continue the run in this folder from its training-state.pt')
    a('--device',         default=None,  metavar='DEV', help='cuda or cpu (default: cuda when available)')
    a('--preset',         default=None, choices=['toy'], help='toy: offline run on procedurally generated images')
    a('--arch',           default='ddpmpp', choices=['ddpmpp', 'edm2'], help="toy: the teacher's architecture (the shipped ones)")
    return p


def flag_groups(parser):
    """{group title: [flag dests]} for the run, session and tool groups."""
    return {g.title: [act.dest for act in g._group_actions] for g in parser._action_groups if g._group_actions}


RUN_FLAGS, SESSION_FLAGS = (tuple(flag_groups(build_parser())[g]) for g in ('run', 'session'))
# The toy run: SiD²A, the paper's fast path, from the shipped toy SiD generator (toy/ddpmpp/sid-generator.pt):
# 10 kimg of warm-up, in which the fake score network (initialised from the teacher) and the discriminator
# learn the SiD generator's distribution before it moves, then 2 kimg of SiD²A. Against the paper's CIFAR-10
# runs: 10x (fake score) and 3x (generator) the learning rate at 1/4 the batch, 100x the adversarial weight
# lsg_gan, an EMA averaging the last quarter of the run (toy/README.md has the runs behind each choice).
TOY_PRESET = dict(data='toy', cond=True, outdir='runs/toy', method='sid2a', batch=64, lr=1e-4, glr=3e-5, lsg_gan=1.0,
                  ema=0.02, ema_rampup=0.25, duration=0.012, dropout=0.0, augment=0.0, gen_start_kimg=10.,
                  adv_start_kimg=10., tick=1., snap=1, dump=2, metrics='fd')
# The EDM2 toy: SiDA from the teacher (no EDM2 toy SiD generator is shipped), with the short warm-up of a run
# from the teacher; EDM2's unit-norm weights take a 10x larger learning rate (as its toy teacher's training
# does), and the paper's EDM2 runs weight lsd 100, lsg_gan 0.01.
TOY_PRESET_BY_ARCH = {'edm2': dict(method='sida', gen_start_kimg=0.5, adv_start_kimg=1., lr=1e-3, glr=1e-3, lsd=100.,
                                   lsg_gan=0.01, duration=0.05, tick=2., snap=2)}


def parse_args(argv=None):
    p = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    # The flags given on the command line: a resumed run takes every other run flag from its state,
    # and a preset changes only flags that were not given.
    given = {a.split('=')[0] for a in argv if a.startswith('--')}
    args.explicit = sorted({act.dest for act in p._actions if given & set(act.option_strings)})
    if args.preset == 'toy':        # the shipped teacher of --arch, and for SiD²A its shipped SiD generator
        for k, v in dict(TOY_PRESET, **TOY_PRESET_BY_ARCH.get(args.arch, {}), teacher=toy.shipped('teacher', args.arch)).items():
            if k not in args.explicit:
                setattr(args, k, v)
        if args.method == 'sid2a' and 'init_generator' not in args.explicit:
            args.init_generator = toy.shipped('sid-generator', args.arch)
        if 'arch' in args.explicit:           # --arch names the teacher: a resumed run checks it against its state's
            args.explicit = sorted({*args.explicit, 'teacher'})
    check_args(args)
    # Flags that contradict each other, or say nothing.
    if args.resume == '' or args.outdir == '':
        raise UserError(f'--{"resume" if args.resume == "" else "outdir"}: an empty folder name')
    if args.resume and os.path.isfile(args.resume):
        raise UserError(f'--resume {args.resume}: a file; --resume takes the run\'s folder '
                        f'({os.path.dirname(args.resume) or "."})')
    if args.resume and 'outdir' in args.explicit and os.path.abspath(args.outdir) != os.path.abspath(args.resume):
        raise UserError(f'--resume {args.resume} and --outdir {args.outdir} name different folders '
                        f'(a run continues in its own)')
    if 'arch' in args.explicit and args.preset != 'toy':
        raise UserError('--arch chooses the toy teacher: it needs --preset toy')
    return args


# The range of every numeric flag (None: not given), checked before anything loads. A forker's new numeric
# flag needs an entry here (a test checks that every one has).
POSITIVE, AT_LEAST_0, PROBABILITY = (lambda v: v > 0, '> 0'), (lambda v: v >= 0, '>= 0'), (lambda v: 0 <= v <= 1, 'in [0, 1]')
ANY = (lambda v: True, 'a finite number')
COUNT = (lambda v: 0 < v <= 2**31, 'in 1..2**31')
FLAG_RANGES = dict(
    alpha=ANY, tmax=(lambda v: 0 < v <= 1000, 'in 1..1000'), init_sigma=POSITIVE, batch=COUNT, lr=AT_LEAST_0,
    glr=AT_LEAST_0, ls=AT_LEAST_0, lsg=AT_LEAST_0, lsd=AT_LEAST_0, lsg_gan=AT_LEAST_0, ema=AT_LEAST_0,
    ema_rampup=AT_LEAST_0, dropout=PROBABILITY, augment=PROBABILITY, p_mean=ANY, p_std=POSITIVE,
    gen_start_kimg=AT_LEAST_0, adv_start_kimg=AT_LEAST_0, seed=(lambda v: 0 <= v < 2**40, 'in 0..2**40-1'),
    duration=(lambda v: 1e-6 <= v <= 1e6, 'in 1e-6..1e6 (one image to 10^12)'), batch_gpu=COUNT,
    tick=POSITIVE, snap=COUNT, dump=COUNT, max_nonfinite=COUNT)


def check_args(args):
    """Every flag's value on its own, before anything loads: one line naming the first flag out of range."""
    for k, (ok, what) in FLAG_RANGES.items():
        v = getattr(args, k)
        if v is not None and not (ok(v) and math.isfinite(v)):       # (ok first: an int past float's range fails it)
            raise UserError(f'--{k.replace("_", "-")} {v}: must be {what}')
    # (A resumed run checks its saved --batch once it is read.)
    if args.batch_gpu and args.batch % args.batch_gpu and (args.resume is None or 'batch' in args.explicit):
        raise UserError(f'--batch {args.batch} is not a multiple of --batch-gpu {args.batch_gpu}')
    parse_metrics(args.metrics)

# ----------------------------------------------------------------------------------------------------
# The method. Every random draw can be passed in, so the tests pin them.

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0   # EDM's Karras schedule (Karras et al. 2022, Eq. 5)


def sid_sigma(t):
    """Noise level of the SiD generator loss for t ~ U(0, tmax/1000), on the Karras schedule (uniform steps in
    sigma^(1/rho)): t = 0 gives SIGMA_MIN, t = 1 SIGMA_MAX (SiD, Sec. 4)."""
    a, b = SIGMA_MAX ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
    return (a + (1 - t) * (b - a)) ** RHO


def edm_weight(sigma, sigma_data):
    """EDM's loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. 2022, Table 1)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def finite(x):
    """Per-sample mask [B]: True where every value of the sample is finite."""
    return torch.isfinite(x).flatten(1).all(dim=1)


def per_sample(mask, x):
    """mask [B] shaped to broadcast against x [B, ...]."""
    return mask.view(-1, *[1] * (x.ndim - 1))


def drop_nonfinite(ok, *tensors):
    """The NaN guard: samples with a non-finite value in any of `tensors` (or ok False already) are
    dropped *before* a loss sees them: ok is narrowed to the finite samples and each tensor gets zeros
    at the dropped ones, so neither a loss nor its derivative is ever evaluated at NaN and the other
    samples' gradients stay finite (upstream removes such samples by indexing; `where` needs no host sync)."""
    for t in tensors:
        if t is not None:
            ok = ok & finite(t)
    return ok, [None if t is None else torch.where(per_sample(ok, t), t, torch.zeros_like(t)) for t in tensors]


def masked_mean(x, ok):
    """Mean over the kept samples (ok: [B] bool) of the per-sample means of x, with no host sync."""
    per_sample_mean = x.flatten(1).mean(dim=1)
    return torch.where(ok, per_sample_mean, torch.zeros_like(per_sample_mean)).sum() / ok.sum().clamp(min=1)


def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction='none')


def sid_w(x_g, d_real):
    """SiD's per-sample normaliser w = mean over pixels of |x_g - f_phi(x_t)|, no gradient, at least 1e-5."""
    return (x_g - d_real).detach().abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)


def denoising_loss(denoised, x, sigma, sigma_data, logvar=None):
    """L_psi per pixel, EDM's denoising loss weight * (D(x + sigma n) - x)^2; with EDM2's log-variance u:
    weight / e^u * (...)^2 + u (Karras et al. 2024)."""
    loss = edm_weight(sigma, sigma_data) * (denoised - x) ** 2
    return loss if logvar is None else loss / logvar.exp() + logvar


def discriminator_loss(logit_real, logit_fake, sigma, sigma_data, ok, logvar=None):
    """L_D per sample (SiDA, Eq. 8): weight * (BCE(real, 1) + BCE(fake, 0)) / 2, each BCE a mean over the
    kept samples of the batch and over the logit map; EDM2 divides it by e^u of the fake score network."""
    loss = edm_weight(sigma, sigma_data) * ((masked_mean(bce(logit_real, 1.0), ok) + masked_mean(bce(logit_fake, 0.0), ok)) / 2)
    return loss if logvar is None else loss / logvar.exp()


def sid_loss(x_g, d_real, d_fake, alpha):
    """L_sid per pixel (SiD, Eq. 23): (d_r - d_f)((d_r - x_g) - alpha (d_r - d_f)) / w."""
    return (d_real - d_fake) * ((d_real - x_g) - alpha * (d_real - d_fake)) / sid_w(x_g, d_real)


def adversarial_loss(logit_g, x_g, d_real, ok):
    """L_adv per pixel (SiDA, Eq. 9): BCE(clamp(logit, -10, 10), 1) averaged over the kept samples of the
    per-GPU batch (its average fakeness), divided by each sample's w and broadcast to every pixel."""
    fakeness = masked_mean(bce(logit_g.clamp(-10, 10), 1.0), ok)
    return (fakeness / sid_w(x_g, d_real)).expand_as(x_g)


def fake_score_objective(fake, x_g, sigma, sigma_data, ok, logit_real, ls, lsd, batch):
    """What the fake score update minimises: sum(L_psi) ls / B, plus for SiDA sum(L_D) lsd / B, in one
    backward (B: the per-GPU batch). `fake` is f_psi's pass on the noisy generated images (its logits
    are the discriminator's on them); logit_real its encoder's on the noisy real images, or None (SiD)."""
    ok, (denoised, logit_fake, logvar, logit_real) = drop_nonfinite(ok, fake.denoised, fake.logits, fake.logvar, logit_real)
    loss_psi = denoising_loss(denoised, x_g, sigma, sigma_data, logvar) * per_sample(ok, x_g)
    total = loss_psi.sum() / batch * ls
    stats = {'loss_fake_score': loss_psi.mean(), 'dropped_fake': (~ok).sum()}
    if logit_real is not None:
        loss_d = discriminator_loss(logit_real, logit_fake, sigma, sigma_data, ok, logvar) * per_sample(ok, sigma)
        total = total + loss_d.sum() / batch * lsd
        stats['loss_disc'] = loss_d.mean()
    return total, ok, stats


def generator_objective(x_g, real, fake, ok, alpha, lsg, lsg_gan, use_adv, batch):
    """What the generator update minimises: sum(L_sid) lsg / B, and once the adversarial term is on
    (use_adv) 0.5 of that plus 0.5 sum(L_adv) lsg_gan / B. `real`, `fake`: the teacher's and
    the fake score network's passes on x_t; EDM2 divides both terms by e^u of the fake score network."""
    ok, (x_g, d_real, d_fake, logit_g, logvar) = drop_nonfinite(ok, x_g, real.denoised, fake.denoised, fake.logits, fake.logvar)
    scale = per_sample(ok, x_g) * (1 if logvar is None else torch.exp(-logvar))
    loss_sid = sid_loss(x_g, d_real, d_fake, alpha) * scale
    total = loss_sid.sum() / batch * lsg
    stats = {'loss_sid': loss_sid.mean(), 'dropped_gen': (~ok).sum()}
    if use_adv:
        loss_adv = adversarial_loss(logit_g, x_g, d_real, ok) * scale
        total = 0.5 * total + 0.5 * loss_adv.sum() / batch * lsg_gan
        stats['loss_adv'] = loss_adv.mean()
    return total, ok, stats

# ----------------------------------------------------------------------------------------------------
# Data: images in memory as uint8 [N, C, H, W] (on the GPU when they fit), or EDM2 latents read from
# their zip on demand; labels as integers. Every draw comes from a slot's random stream.

def load_dataset(path, resolution, channels, latent):
    """Images (uint8 [N, C, H, W]) and labels (or None) of an EDM zip or folder or the CIFAR-10 tarball;
    for latent teachers (EDM2) an EDM2 latent zip, read on demand."""
    if latent:
        data = networks.LatentData(path)
        images, labels, shape = data, data.labels, data.shape
    else:
        images, labels = fid.load_images(path)
        images, labels = torch.from_numpy(images), None if labels is None else torch.from_numpy(labels).long()
        shape = tuple(images.shape[1:])
    if shape != (channels, resolution, resolution):
        raise UserError(f'--data {path}: {"latents" if latent else "images"} are {shape} (C, H, W) but the '
                        f'teacher expects {(channels, resolution, resolution)}')
    return images, labels


# The random streams of one --seed: slot i draws from generator seed s * SEED_STRIDE + i and its dropout masks
# from s * SEED_STRIDE + DROPOUT_STREAM + i; no run has half a million slots, so no two streams share a seed.
SEED_STRIDE = 1_000_003
DROPOUT_STREAM = SEED_STRIDE // 2


class Slot:
    """The random streams of one micro-batch slot. A step of `batch` images is split into
    batch / batch_gpu slots, spread over ranks and accumulation rounds; each slot has its own streams,
    so the same seed gives the same draws however the slots are spread (1 GPU x 2 rounds = 2 GPUs x 1)."""

    def __init__(self, index, seed, device):
        self.index = index
        self.gen = torch.Generator(device).manual_seed(seed * SEED_STRIDE + index)
        # Dropout draws from torch's global generator, which each round reseeds from this one (plain Python: no
        # tensor, no device sync), so the masks too depend on the slot alone.
        self.dropout_seeds = random.Random(seed * SEED_STRIDE + DROPOUT_STREAM + index)


class Sampler:
    """Draws real data, labels and noise for one micro-batch from a slot's random stream."""

    def __init__(self, images, labels, label_dim, shape, device):
        self.latent = isinstance(images, networks.LatentData)
        if isinstance(images, torch.Tensor):
            # On the GPU if they take at most a fifth of its free memory (uint8: one byte each); the rest is for training.
            fits = device.type == 'cpu' or images.numel() < 0.2 * torch.cuda.mem_get_info(device)[0]
            images = images.to(device if fits else 'cpu')
        self.images = images
        self.data_device = images.device if isinstance(images, torch.Tensor) else torch.device('cpu')
        self.labels = None if labels is None else labels.to(self.data_device)
        self.label_dim, self.shape, self.device = label_dim, shape, device

    def draw(self, slot, n):
        idx = torch.randint(len(self.images), (n,), generator=slot.gen, device=self.device)
        return idx.to(self.data_device)          # a host copy only when the data are not on the GPU

    def real(self, slot, n):
        """Real images in [-1, 1] (EDM2: normalised latents mean + std * eps) and one-hot labels, from one batch."""
        idx = self.draw(slot, n)
        if self.latent:
            mean, std = self.images[idx].to(self.device, non_blocking=True).chunk(2, dim=1)
            eps = torch.randn(mean.shape, generator=slot.gen, device=self.device)
            x = networks.normalize_latents(mean + std * eps)
        else:
            x = self.images[idx].to(self.device, non_blocking=True).float() / 127.5 - 1
        return x, self.one_hot(None if self.labels is None else self.labels[idx].to(self.device))

    def labels_only(self, slot, n):
        """Labels for generated images: from a data batch when there are data, else uniform over classes."""
        if self.label_dim == 0:
            return None
        if self.labels is not None:
            return self.one_hot(self.labels[self.draw(slot, n)].to(self.device))
        return self.one_hot(torch.randint(self.label_dim, (n,), generator=slot.gen, device=self.device))

    def one_hot(self, idx):
        if self.label_dim == 0:
            return None
        # A comparison, not F.one_hot: that reads the labels back to the host to check them (on the CPU).
        return (idx[:, None] == torch.arange(self.label_dim, device=idx.device)).float()

    def noise(self, slot, n):
        return torch.randn(n, *self.shape, generator=slot.gen, device=self.device)

# ----------------------------------------------------------------------------------------------------
# Networks: three copies of one denoiser (the paper's f_phi, f_psi and G_theta), and the teacher's
# multi-step sampler for comparison.

class Denoised(NamedTuple):
    """One pass of a denoiser on (x, sigma, c): D(x, sigma, c), the SiDA discriminator logits of its
    encoder [B, 1, h, w], and EDM2's log-variance u(sigma) [B, 1, 1, 1] (None without that weighting)."""
    denoised: torch.Tensor
    logits: torch.Tensor
    logvar: Optional[torch.Tensor]


def denoise(net, x, sigma, labels, augment_labels, logvar=False):
    """net(x, sigma, c) as Denoised, in float32. Every call asks for the logits (free: the encoder runs
    anyway), so that torch.compile shares one graph between the calls of one network class."""
    out = net(x, sigma, labels, augment_labels, return_logits=True, return_logvar=logvar)
    return Denoised(out[0].float(), out[1].float(), out[2].float() if logvar else None)


def cast_once(call, net, dtype, keep=False):
    """call(...) (net, or net under DDP) with net's parameters cast to dtype by one operation for the whole
    network (networks.cast_parameters) instead of one per parameter by autocast. The same outputs: EDM
    networks use every parameter in autocast's dtype. keep: reuse the cast while the parameters are unchanged
    (the frozen teacher, a network in the other's step); run.drop() lets a kept cast go."""
    prefix = '' if call is net else 'module.'
    cast = lambda: {prefix + name: t for name, t in networks.cast_parameters(net, dtype).items()}
    kept = [None]

    def run(*args, **kwargs):
        if not keep:
            return torch.func.functional_call(call, cast(), args, kwargs)
        key = networks.version_key(net.parameters())
        if kept[0] is None or kept[0][0] != key:
            kept[0] = (key, cast())
        return torch.func.functional_call(call, kept[0][1], args, kwargs)
    run.drop = lambda: kept.__setitem__(0, None)
    return run


def denoise_and_discriminate(net, x, x_real, sigma, labels, augment_labels, augment_real, logvar=False):
    """denoise(net, x, ...) and the logits of net's encoder on x_real (same sigma and labels), in one pass
    of the encoder over both batches. x_real None: denoise alone, logits None."""
    if x_real is None:
        return denoise(net, x, sigma, labels, augment_labels, logvar), None
    both = lambda a, b: None if a is None else torch.cat([a, b])
    n = x.shape[0]
    out = net(both(x, x_real), both(sigma, sigma), both(labels, labels), both(augment_labels, augment_real),
              return_logits=True, return_logvar=logvar, encoder_only=n)
    return Denoised(out[0].float(), out[1][:n].float(), out[2].float() if logvar else None), out[1][n:].float()


def trainable_copy(net, dropout, device, drop_logvar=False):
    """A fresh trainable network with net's weights and the given dropout."""
    config = copy.deepcopy(net.config)
    config['kwargs']['dropout'] = dropout
    if drop_logvar:
        config['kwargs']['use_logvar'] = False
    copy_ = networks.build_network(config).to(device)
    copy_.load_state_dict(net.state_dict(), strict=not drop_logvar)
    return copy_.train().requires_grad_(True)

# ----------------------------------------------------------------------------------------------------
# One iteration: the fake score update, then the generator update, on the three networks.

def precision_setup(precision, device):
    """Autocast context for the networks (losses stay fp32) and its dtype (None: no autocast; float16 needs
    loss scaling)."""
    tf32 = precision == 'tf32'
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True      # fixed shapes: time the convolution algorithms once
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(precision)
    if dtype is not None:
        return lambda: torch.autocast(device.type, dtype=dtype), dtype
    return contextlib.nullcontext, None


def can_compile(device):
    """torch.compile needs Triton on CUDA; warn and run eagerly without it."""
    from torch.utils._triton import has_triton
    if device.type == 'cuda' and not has_triton():
        print('warning: --compile: Triton is not installed, running eagerly', flush=True)
        return False
    return True


def sanitize_grads(params, clip, chunk=2**28):
    """Non-finite gradient entries -> 0 / ±1e5 (as upstream); optionally clip elementwise to [-1, 1].
    Done on flat copies of consecutive gradients, `chunk` elements at most unless one gradient is larger (1 GiB
    in fp32: one copy up to 268M parameters, seven for EDM2-XXL): three operations per copy, not per tensor."""
    groups, size = [], chunk
    for g in (p.grad for p in params if p.grad is not None):
        if size + g.numel() > chunk:
            groups.append([])
            size = 0
        groups[-1].append(g)
        size += g.numel()
    for group in groups:
        flat = torch.nan_to_num_(torch.cat([g.flatten() for g in group]), nan=0.0, posinf=1e5, neginf=-1e5)
        if clip:
            flat.clamp_(-1.0, 1.0)
        torch._foreach_copy_(group, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in group]), group)])


class SiDA:
    """The teacher f_phi (frozen), the fake score network f_psi and the generator G with their optimizers.

    Each step runs `len(slots)` accumulation rounds of `batch_gpu` images and ends with one optimizer
    step. Train/eval modes decide where dropout acts: the teacher is always in eval mode, f_psi trains
    only in its own step, G only in its own step (its no-grad pass for the fake score step is in eval).
    """

    def __init__(self, args, teacher, G_init, sampler, world, batch_gpu, device, memory_format=torch.channels_last):
        # memory_format: the networks' layout on a GPU (bench.py --memory-format compares the two).
        self.args, self.sampler, self.device = args, sampler, device
        self.teacher_sums = teacher_sums(teacher)                   # which teacher: saved with the state
        self.teacher = networks.freeze(teacher)                      # no gradient of its own (loaded ones come frozen)
        self.world, self.batch_gpu = world, batch_gpu
        self.batch_per_gpu = args.batch // world                     # B in "sum * scale / B"
        self.p_mean = teacher.P_mean if args.p_mean is None else args.p_mean
        self.p_std = teacher.P_std if args.p_std is None else args.p_std
        self.adversarial = args.method != 'sid'
        self.clip_fake_grads = self.adversarial and not teacher.magnitude_preserving   # upstream's EDM2 runs do not clip
        # Every trainable parameter must take part in its step's loss (DDP stops a run otherwise): G never
        # uses a log-variance head, f_psi only for the log-variance weighting (EDM2, not --no-logvar).
        self.use_logvar = args.logvar and teacher.use_logvar
        self.fake_score = trainable_copy(teacher, args.dropout, device,
                                         drop_logvar=teacher.use_logvar and not self.use_logvar)
        self.G = trainable_copy(G_init, args.dropout, device, drop_logvar=G_init.use_logvar).eval()
        self.G_ema = networks.freeze(copy.deepcopy(self.G))
        # Forced weight normalisation as upstream's EDM2 runs apply it: the generator's stored weights are
        # renormalised before its training passes; the fake score network's never are (upstream makes it as
        # a copy of the eval-mode teacher, whose hook stays bound to the teacher), though its forward
        # normalises them like every EDM2 layer does.
        self.renormalize_G = args.force_norm and self.G.magnitude_preserving
        self.use_aug = args.augment > 0 and self.fake_score.augment_dim > 0
        # Unaugmented passes get zero augmentation labels (this also keeps map_augment in every DDP graph).
        self.no_aug = torch.zeros(batch_gpu, teacher.augment_dim, device=device) if teacher.augment_dim else None
        self.sigma_init = torch.full((batch_gpu, 1, 1, 1), args.init_sigma, device=device)   # G(z) = D(sigma_init z, sigma_init, c)
        if device.type == 'cuda':
            for net in (teacher, self.fake_score, self.G):
                net.to(memory_format=memory_format)
        ddp = lambda m: torch.nn.parallel.DistributedDataParallel(
            m, device_ids=[device] if device.type == 'cuda' else None, broadcast_buffers=False)
        self.fake_score_ddp = ddp(self.fake_score) if world > 1 else self.fake_score
        self.G_ddp = ddp(self.G) if world > 1 else self.G
        self.autocast, dtype = precision_setup(args.precision, device)
        fp16 = dtype == torch.float16
        adam = lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.0, 0.999), eps=1e-6 if fp16 else 1e-8, fused=True)
        self.opt_f, self.opt_g = adam(self.fake_score.parameters(), args.lr), adam(self.G.parameters(), args.glr)
        self.scaler_f = torch.amp.GradScaler(device.type, enabled=fp16)
        self.scaler_g = torch.amp.GradScaler(device.type, enabled=fp16)
        self.stats = {}
        self.nonfinite_streak = torch.zeros((), device=device)
        self.worst_streak = torch.zeros((), device=device)
        # The network calls. The fake score network is trained through DDP in its own step and frozen (a
        # plain module) in the generator's, where DDP must not see it.
        self.teacher_fn, self.G_fn, self.G_eval_fn = teacher, self.G_ddp, self.G
        self.fake_train_fn, self.fake_fn = self.fake_score_ddp, self.fake_score
        if dtype is not None and not teacher.magnitude_preserving and not args.compile:     # (compiled kernels fuse the casts)
            self.teacher_fn = cast_once(teacher, teacher, dtype, keep=True)
            self.G_fn = cast_once(self.G_ddp, self.G, dtype)
            self.G_eval_fn = cast_once(self.G, self.G, dtype, keep=True)
            self.fake_train_fn = cast_once(self.fake_score_ddp, self.fake_score, dtype)
            self.fake_fn = cast_once(self.fake_score, self.fake_score, dtype, keep=True)
        if args.compile and can_compile(device):
            self.compile()

    def compile(self, mode=None):
        """torch.compile the five network calls: one graph per call signature and network class (without
        dropout 3 with EDM networks, 4 with EDM2; the CIFAR-10 runs, with dropout, trace 4). A graph that fails
        to compile runs eagerly (dynamo logs why). mode: torch.compile's
        (bench.py's cudagraphs mode passes 'reduce-overhead')."""
        import torch._dynamo
        torch._dynamo.config.suppress_errors = True
        # Compiled kernels are kept across restarts (and runs) in a stable folder, not in /tmp.
        os.environ.setdefault('TORCHINDUCTOR_CACHE_DIR', os.path.expanduser('~/.cache/sida/torchinductor'))
        for k in ('teacher_fn', 'G_fn', 'G_eval_fn', 'fake_train_fn', 'fake_fn'):
            setattr(self, k, torch.compile(getattr(self, k), mode=mode))

    def rounds(self, ddp_net, slots, unchanged):
        """Yield (slot, context) per accumulation round; gradients sync across ranks on the last one.
        unchanged: (net, fn), the network the step uses but does not change (G in the fake score step, f_psi in
        the generator step): what depends on its weights alone, their cast to the compute dtype (fn, from
        cast_once) and EDM2's normalised weights, is made once for all the rounds and let go after them."""
        net, fn = unchanged
        networks.keep_weights(net)
        try:
            for r, slot in enumerate(slots):
                torch.manual_seed(slot.dropout_seeds.getrandbits(63))        # this round's dropout masks
                last = r == len(slots) - 1
                yield slot, contextlib.nullcontext() if last or self.world == 1 else ddp_net.no_sync()
        finally:                                  # also when a round fails (bench.py goes on to its next run)
            networks.keep_weights(net, False)
            getattr(fn, 'drop', lambda: None)()

    def fake_score_step(self, slots):
        """Fit f_psi to the generator's current output with the denoising loss, and (SiDA) train its
        encoder to tell noisy real images from noisy generated ones, in one backward."""
        a, data, n, dev = self.args, self.sampler, self.batch_gpu, self.device
        self.fake_score.train().requires_grad_(True)
        for slot, sync in self.rounds(self.fake_score_ddp, slots, unchanged=(self.G, self.G_eval_fn)):
            with sync:
                if self.adversarial:
                    x_real, c = data.real(slot, n)                # one data batch: images and labels
                else:                                             # SiD: the labels alone (no latents read)
                    x_real, c = None, data.labels_only(slot, n)
                z = data.noise(slot, n)
                with torch.no_grad(), self.autocast():
                    x_g = denoise(self.G_eval_fn, self.sigma_init * z, self.sigma_init, c, self.no_aug).denoised
                ok, (x_g,) = drop_nonfinite(torch.ones(n, dtype=torch.bool, device=dev), x_g)
                sigma = (torch.randn(n, 1, 1, 1, generator=slot.gen, device=dev) * self.p_std + self.p_mean).exp()
                noise = data.noise(slot, n)
                aug_g = aug_real = self.no_aug
                if self.use_aug:
                    x_g, aug_g = networks.augment(x_g, a.augment, slot.gen)
                    if self.adversarial:
                        x_real, aug_real = networks.augment(x_real, a.augment, slot.gen)
                # SiDA: the encoder also sees the real images at the same sigma and noise (one pass for both)
                x_real_t = x_real + sigma * noise if self.adversarial else None
                with self.autocast():
                    fake, logit_real = denoise_and_discriminate(self.fake_train_fn, x_g + sigma * noise, x_real_t, sigma,
                                                                c, aug_g, aug_real, self.use_logvar)
                loss, ok, stats = fake_score_objective(fake, x_g, sigma, self.teacher.sigma_data, ok, logit_real,
                                                       a.ls, a.lsd, self.batch_per_gpu)
                self.record(stats)
                self.scaler_f.scale(loss).backward()
        self.optimizer_step(self.opt_f, self.scaler_f, self.fake_score, self.clip_fake_grads)

    def generator_step(self, slots, use_adv):
        """Move G along the SiD loss, plus (once use_adv) the adversarial loss, in one backward; the
        gradients flow through the frozen teacher and fake score network into G."""
        a, data, n, dev = self.args, self.sampler, self.batch_gpu, self.device
        self.fake_score.eval().requires_grad_(False)
        self.G.train()
        if self.renormalize_G:
            self.G.normalize_weights_()
        all_bad = torch.ones((), dtype=torch.bool, device=dev)
        for slot, sync in self.rounds(self.G_ddp, slots, unchanged=(self.fake_score, self.fake_fn)):
            with sync:
                c = data.labels_only(slot, n)
                z = data.noise(slot, n)
                t = torch.rand(n, 1, 1, 1, generator=slot.gen, device=dev) * (a.tmax / 1000)
                sigma = sid_sigma(t)
                eps = data.noise(slot, n)
                with self.autocast():
                    x_g = denoise(self.G_fn, self.sigma_init * z, self.sigma_init, c, self.no_aug).denoised
                    ok, (x_g,) = drop_nonfinite(torch.ones(n, dtype=torch.bool, device=dev), x_g)
                    x_t = x_g + sigma * eps
                    real = denoise(self.teacher_fn, x_t, sigma, c, self.no_aug, self.use_logvar)
                    fake = denoise(self.fake_fn, x_t, sigma, c, self.no_aug, self.use_logvar)
                loss, ok, stats = generator_objective(x_g, real, fake, ok, a.alpha, a.lsg, a.lsg_gan, use_adv,
                                                      self.batch_per_gpu)
                all_bad &= ~ok.any()
                self.record(stats)
                self.scaler_g.scale(loss).backward()
        self.optimizer_step(self.opt_g, self.scaler_g, self.G, clip=False)
        self.G.eval()
        self.nonfinite_streak = torch.where(all_bad, self.nonfinite_streak + 1, torch.zeros_like(self.nonfinite_streak))
        self.worst_streak = torch.maximum(self.worst_streak, self.nonfinite_streak)

    def optimizer_step(self, opt, scaler, net, clip):
        scaler.unscale_(opt)
        sanitize_grads(net.parameters(), clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def update_ema(self, nimg):
        """Generator EMA with half-life `ema` Mimg, at most `ema_rampup` of the images seen before this step (EDM)."""
        halflife = min(self.args.ema * 1e6, nimg * self.args.ema_rampup)
        beta = 0.5 ** (self.args.batch / max(halflife, 1e-8))    # (halflife 0 at nimg 0: the EMA copies G)
        torch._foreach_lerp_(list(self.G_ema.parameters()), list(self.G.parameters()), 1 - beta)

    def record(self, stats):
        """Accumulate statistics on the device; they are read once per tick (no host sync per iteration)."""
        for name, value in stats.items():
            total, count = self.stats.get(name, (0, 0))
            self.stats[name] = (total + value.detach().float(), count + 1)

    def tick_stats(self):
        """The statistics recorded since the last tick, over all ranks: counts of dropped samples summed, losses
        averaged; then a fresh start."""
        row = {}
        for name, (total, count) in self.stats.items():
            value = torch.stack([total, torch.tensor(float(count), device=self.device)])
            if dist.is_initialized():
                dist.all_reduce(value)
            row[name] = int(value[0]) if name.startswith('dropped') else round(float(value[0] / value[1]), 6)
        self.stats = {}
        return row

    def state(self):
        return ({'G': self.G, 'G_ema': self.G_ema, 'fake_score': self.fake_score},
                {'G': self.opt_g, 'fake_score': self.opt_f}, {'G': self.scaler_g, 'fake_score': self.scaler_f})

# ----------------------------------------------------------------------------------------------------
# Training state: everything needed to continue bit-identically.

def save_state(path, sida, slots, nimg, tick, best, args, rank):
    """Gather every rank's random streams on rank 0 and write the training state atomically."""
    rng = {'slots': {s.index: s.gen.get_state() for s in slots},
           'dropout': {s.index: s.dropout_seeds.getstate() for s in slots}}
    all_rng = [rng]
    if dist.is_initialized():
        all_rng = [None] * dist.get_world_size()
        dist.all_gather_object(all_rng, rng)
    if rank != 0:
        return
    nets, opts, scalers = sida.state()
    state = {
        'format': 'sida-training-state', 'nimg': nimg, 'tick': tick, 'best': best,
        'args': {k: getattr(args, k) for k in RUN_FLAGS},
        'session_args': {k: getattr(args, k) for k in SESSION_FLAGS},
        'teacher_config': sida.teacher.config, 'teacher_sums': sida.teacher_sums,
        'nets': {k: v.state_dict() for k, v in nets.items()},
        'opts': {k: v.state_dict() for k, v in opts.items()},
        'scalers': {k: v.state_dict() for k, v in scalers.items()},
        'rng': all_rng,
    }
    networks.atomic_write(path, lambda f: torch.save(state, f))


def read_state(path, args):
    """Read a training state written by save_state and take its run flags: those given again on the
    command line must agree; the others are restored."""
    if not os.path.isfile(path):
        folder, why = os.path.dirname(path), ''
        if later_snapshots(folder):          # (a new run does not start among them either)
            why = ' (the run has snapshots but no state to continue from: move it away and start again)'
        elif os.path.isfile(os.path.join(folder, 'log.jsonl')):
            why = ' (the run stopped before its first state: start it again, without --resume)'
        raise UserError(f'--resume: {path} does not exist{why}')
    damaged = networks.damaged_member(path)
    if damaged:
        raise UserError(f'--resume: {path} is damaged: its {damaged} fails its checksum')
    try:
        with warnings.catch_warnings():           # torch warns of a foreign pickle before refusing it: one line only
            warnings.simplefilter('ignore')
            state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'--resume: {path} is not a readable training state ({type(e).__name__})') from None
    if not isinstance(state, dict) or state.get('format') != 'sida-training-state':
        raise UserError(f'--resume: {path} is not a sida training state')
    kinds = dict(nimg=int, tick=int, args=dict, session_args=dict, teacher_config=dict, teacher_sums=torch.Tensor,
                 nets=dict, opts=dict, scalers=dict, rng=list)
    if any(not isinstance(state.get(k), kind) for k, kind in kinds.items()):
        raise UserError(f'--resume: {path} is a training state of another version of sida.py, or damaged')
    differ = [f'--{k.replace("_", "-")} {v!r} (now {getattr(args, k)!r})' for k, v in state['args'].items()
              if k in args.explicit and v != getattr(args, k)]
    if differ:
        raise UserError(f'--resume: {path} was written with different settings: ' + ', '.join(differ))
    for k, v in {**state['session_args'], **state['args']}.items():
        if k not in args.explicit:
            setattr(args, k, v)
    try:
        check_args(args)
        parse_metrics(state['session_args'].get('metrics', 'none'))     # (the saved one: which chose the best)
    except (TypeError, AttributeError):
        raise UserError(f'--resume: {path} holds flags of the wrong type (damaged?)') from None
    return state


def teacher_sums(teacher):
    """The sum of |w| of each of the teacher's tensors: the state's record of which teacher it distils."""
    return torch.stack([t.double().abs().sum() for t in teacher.state_dict().values()]).cpu()


def restore_state(state, path, sida, slots, rank, world, metric):
    """Load networks, optimizers and random streams from a state; returns (nimg, tick, best), best None when
    the state's best was of another first metric than `metric`."""
    if state['teacher_config'] != sida.teacher.config:
        raise UserError(f'--resume: {path} was written for a teacher of another architecture than --teacher')
    sums = state['teacher_sums']
    if not (sums.shape == sida.teacher_sums.shape and
            torch.allclose(sums, sida.teacher_sums, rtol=1e-6, atol=0, equal_nan=True)):
        raise UserError(f'--resume: {path} was written with other teacher weights than --teacher {sida.args.teacher}')
    try:
        for objects, key in zip(sida.state(), ('nets', 'opts', 'scalers')):
            for k, v in objects.items():
                v.load_state_dict(state[key][k])
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f'--resume: {path} does not fit the networks of this run '
                        f'({networks.one_line(e)[:300]})') from None
    # Every slot continues its streams wherever it runs now (another number of GPUs or accumulation rounds);
    # only another --batch-gpu, which makes other slots, restarts them.
    saved, restart = {}, False
    try:
        for r in state['rng']:                           # (every rank's, gathered by save_state)
            saved.update({i: (r['slots'][i], r['dropout'][i]) for i in r['slots']})
        restart = not (len(saved) == len(slots) * world and all(s.index in saved for s in slots))
        for s in [] if restart else slots:
            s.gen.set_state(saved[s.index][0])
            s.dropout_seeds.setstate(saved[s.index][1])
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise UserError(f'--resume: {path} holds random streams of another form (damaged?)') from None
    if restart and rank == 0:
        print(f'warning: resumed with another --batch-gpu than {path} was written with: the random streams of the '
              f'micro-batches restart', flush=True)
    saved_metrics = parse_metrics(state['session_args'].get('metrics', 'none'))
    chosen_by = saved_metrics[0][0] if saved_metrics else None
    best = state['best'] if chosen_by == metric else None
    if state['best'] is not None and best is None and rank == 0:
        print(f'warning: the best generator so far was chosen by {chosen_by}; generator-best.pt is chosen by '
              f'{metric or "nothing"} from now on', flush=True)
    return state['nimg'], state['tick'], best

# ----------------------------------------------------------------------------------------------------
# Evaluation and the console: metrics of the EMA generator, the status line, log.txt (metrics.png: fid.py).

METRIC_PREFIXES = ('fid', 'is', 'fd', 'acc')     # log keys of metrics: fid50k, is50k, fd, acc, fd_teacher35, ...


def parse_metrics(spec):
    """'fid50k,is50k' -> [('fid50k', 'fid', 50000), ...]; 'fd' is the toy Fréchet distance (on toy.METRIC_IMAGES)."""
    out = []
    for name in [s.strip() for s in spec.split(',') if s.strip() and s.strip() != 'none']:
        kind = name.rstrip('0123456789k')
        digits = name[len(kind):]
        if kind not in ('fid', 'is', 'fd') or (digits and not (digits.endswith('k') and digits[:-1].isdigit())):
            raise UserError(f'--metrics: unknown metric "{name}" (use fidNk, isNk, fd or fdNk, e.g. fid50k)')
        if digits and int(digits[:-1]) < 1:
            raise UserError(f'--metrics: {name} measures no images (N is in thousands, at least 1)')
        out.append((name, kind, int(digits[:-1]) * 1000 if digits else toy.METRIC_IMAGES))
    if sum(kind == 'fd' for _, kind, _ in out) > 1:
        raise UserError(f'--metrics {spec}: one fd metric at most (the toy measures fd once per snapshot)')
    return out


class Evaluator:
    """Metrics and sample grids of the EMA generator, from their own seeds: never the training streams.
    FID and IS with the Inception network; in the toy run fd and acc with the toy's own (toy.Metrics)."""

    def __init__(self, args, latent, device):
        self.args, self.device = args, device
        self.metrics = parse_metrics(args.metrics)
        self.detector = self.ref = self.toy = None
        self.vae = networks.load_vae(args.vae, device) if latent else None    # EDM2: decode latents
        kinds = {kind for _, kind, _ in self.metrics}
        if 'fd' in kinds:                 # check_inputs made sure of the toy data and of --ref
            self.toy = toy.Metrics(device, num=next(num for _, kind, num in self.metrics if kind == 'fd'))
        if 'fid' in kinds:
            self.ref = fid.load_ref(args.ref)
        if kinds & {'fid', 'is'}:
            self.detector = fid.load_detector(args.detector, device)
        if self.detector is not None:      # statistics of other features would fail the first measurement, hours later
            fid.check_features(self.detector, torch.zeros(1, 3, 32, 32, dtype=torch.uint8), self.ref, device, args.detector)

    def baselines(self, teacher):
        """Toy run, tick 0: fd (and acc) of held-out real data and of the teacher's multi-step samplers, named
        after the run's metric (fd_data, fd1k_teacher35, ...) so that its plot and summary show them beside it."""
        if not self.toy:
            return {}
        fd = next(name for name, kind, _ in self.metrics if kind == 'fd')
        r = self.toy.baselines(teacher, toy.sampler_steps(self.args.teacher))
        return {k.replace('fd', fd, 1).replace('acc', 'acc' + fd[2:], 1): v for k, v in r.items()}

    def __call__(self, G):
        generate = lambda seeds: fid.generate_images(G, seeds, self.args.init_sigma, self.device, self.vae)
        results = {}
        for name, kind, num in self.metrics:
            if kind == 'fd':
                r = self.toy(G, self.args.init_sigma)
                results.update({name: r['fd']}, **({'acc' + name[2:]: r['acc']} if 'acc' in r else {}))
            else:
                r = fid.generator_metrics(generate, num, self.detector, ref=self.ref if kind == 'fid' else None,
                                          batch=max(64, self.args.batch_gpu or 64), device=self.device,
                                          want_is=kind == 'is')
                results[name] = r[kind]
        return results


class Tee(io.TextIOBase):
    """A console stream that also writes everything to a file (EDM's log.txt). The copy is only a copy:
    when the file cannot be written (a full disk) it stops with a warning and the console goes on."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text):
        self.stream.write(text)
        self.copy(lambda: self.file.write(text))
        return len(text)

    def flush(self):
        self.stream.flush()
        self.copy(self.file.flush)

    def copy(self, action):
        if self.file.closed:            # the other stream's copy failed
            return
        try:
            action()
        except OSError as e:
            with contextlib.suppress(OSError):
                self.file.close()
            self.stream.write(f'\nwarning: log.txt is no longer written ({e.strerror or e}); the run goes on\n')


@contextlib.contextmanager
def tee_console(path, enabled=True):
    """Copy stdout and stderr (status lines, progress, warnings) to `path` while the block runs. The copy is
    held in memory until the block calls the start() it is given: a block that fails before writes nothing."""
    if not enabled:
        yield lambda: None
        return
    saved, memory, files = (sys.stdout, sys.stderr), io.StringIO(), []
    tees = Tee(saved[0], memory), Tee(saved[1], memory)

    def start():
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            files.append(open(path, 'a'))
        except OSError as e:
            raise UserError(f'{path}: cannot write the run\'s folder ({e.strerror or e})') from None
        for tee in tees:
            tee.file = files[0]
        tees[0].copy(lambda: files[0].write(memory.getvalue()))

    sys.stdout, sys.stderr = tees
    try:
        yield start
    finally:
        sys.stdout, sys.stderr = saved
        for f in files:
            with contextlib.suppress(OSError):
                f.close()


def print_options(args, world, rounds, batch_gpu, device):
    """Every option once at the start, grouped as on the command line, and the batch layout."""
    groups = {'run': RUN_FLAGS, 'session': SESSION_FLAGS}
    print(f'{args.method}: {args.teacher} -> one-step generator on {device}; '
          f'batch {args.batch} = {world} process(es) x {rounds} round(s) x {batch_gpu} images')
    for title in ('run', 'session'):
        print(f'{title + " options:":17s}' + '  '.join(f'{k.replace("_", "-")} {getattr(args, k)}' for k in groups[title]))
    print(f'output:          {os.path.abspath(args.resume or args.outdir)}', flush=True)


def status_line(row, total_kimg):
    """One tick for a person: progress, losses, speed, time left, memory and any metric just measured."""
    parts = [f'tick {row["tick"]:<4d} kimg {row["kimg"]:<9g} {100 * row["kimg"] / total_kimg:5.1f}%']
    losses = [k for k in row if k.startswith('loss_')]     # (+ 0: a loss of -0.0 prints as 0)
    parts.append(' '.join(f'{k.removeprefix("loss_")} {row[k] + 0:<8.4g}' for k in losses))
    dropped = row.get('dropped_fake', 0) + row.get('dropped_gen', 0)
    if dropped:
        parts.append(f'dropped {dropped}')
    if 'img_per_s' in row:
        left = (total_kimg - row['kimg']) * row['sec_per_kimg']
        parts.append(f'{row["img_per_s"]:.1f} img/s {row["sec_per_kimg"]:.3g} s/kimg ETA {fid.format_duration(left)}')
        parts.append(f'mem {row["peak_gb"]:.2f} GB')
    measured = [k for k in row if k.startswith(METRIC_PREFIXES)]
    if measured:
        parts.append(' '.join(f'{k} {row[k]:.4g}' for k in measured))
    return ' | '.join(p for p in parts if p)


def snapshot_path(outdir, kimg):
    return os.path.join(outdir, f'generator-{kimg:010.3f}.pt')    # kimg to the image: fractional ticks never collide


def save_snapshot(G_ema, row, is_best, evaluator, args, outdir, device):
    """Sample grid and EMA generator at this kimg; generator-best.pt too when the main metric improved."""
    fid.save_grid(fid.generate_images(G_ema, torch.arange(fid.GRID_IMAGES), args.init_sigma, device, evaluator.vae),
                  os.path.join(outdir, f'samples-{row["kimg"]:010.3f}.png'))
    meta = dict(kimg=row['kimg'], method=args.method, teacher=str(args.teacher))
    networks.save_network(G_ema, snapshot_path(outdir, row['kimg']), **meta)
    if is_best:
        name = evaluator.metrics[0][0]
        networks.save_network(G_ema, os.path.join(outdir, 'generator-best.pt'), **meta, **{name: row[name]})


def saved_meta(path):
    """The `meta` of a saved generator without reading its tensors; {} when there is none or it is unreadable."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True, mmap=True)['meta']
    except Exception:
        return {}


def improves(row, best, metrics):
    """Whether the run's main metric (the first of --metrics) in `row` is better than `best`."""
    name, kind, _ = metrics[0] if metrics else (None, None, None)
    value = row.get(name)                        # None without metrics, or when the measurement failed
    return value is not None and (best is None or (value > best if kind == 'is' else value < best))


def append_row(path, row):
    """Append one row to log.jsonl as a whole line, on disk before the state that follows it. A line cut short
    by an earlier failed write is ended first, so that it never swallows this row."""
    line = (json.dumps(row) + '\n').encode()
    with open(path, 'a+b') as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b'\n':
                line = b'\n' + line
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def derived(what, make, *args):
    """Make a derived output (the status line, samples, a snapshot, the plot), always after the training state:
    a failure is one warning line and the run goes on."""
    try:
        make(*args)
    except Exception as e:
        print(f'warning: {what} failed ({type(e).__name__}: {networks.one_line(e)}); the run goes on', flush=True)


def read_log(path):
    """The rows of a run's log.jsonl. A line cut short (a kill or a full disk in mid-write) or otherwise
    unreadable is skipped with a warning: a damaged log never stops a run (resume repairs it)."""
    rows, bad = [], 0
    if os.path.isfile(path):
        with open(path, errors='replace') as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if (isinstance(row, dict) and type(row.get('tick')) is int and 'kimg' in row
                        and all(type(v) in (int, float) for v in row.values())):       # (every value is a number)
                    rows.append(row)
                else:
                    bad += bool(line.strip())
    if bad:
        print(f'warning: {path}: skipped {bad} unreadable line(s)', flush=True)
    return rows


def summary(rows, method):
    """The run's result as a table, a column per metric: the tick-0 baselines (the toy's real data and teacher
    samplers), the initial generator, and the final EMA generator (the run's result), all 1 NFE but the teacher's."""
    names = sorted({k for r in rows for k in r if k.startswith(METRIC_PREFIXES) and '_' not in k},
                   key=lambda k: (METRIC_PREFIXES.index(k.rstrip('0123456789k')), k))
    if not names:
        return []
    baselines = list(dict.fromkeys(k.split('_', 1)[1] for k in rows[0] if k.split('_', 1)[0] in names and '_' in k))
    table = [(toy.baseline_label(who), [rows[0].get(f'{name}_{who}') for name in names]) for who in baselines]
    table += [('initial generator (1 NFE)', [rows[0].get(name) for name in names]),
              (f'{method} generator (1 NFE), final EMA', [[r[name] for r in rows if name in r][-1] for name in names])]
    cell = lambda v: f'{"-":>10s}' if v is None else f'{v:10,.0f}' if v >= 100 else f'{v:10.4g}'
    return [f'{"result":40s}' + ''.join(f'{name:>10s}' for name in names)] + \
           [f'  {label:38s}' + ''.join(cell(v) for v in values) for label, values in table]

# ----------------------------------------------------------------------------------------------------
# The distillation: set-up, the loop, the summary.

def max_rank(value, device):
    """The largest of the ranks' values, on every rank (a host sync)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([float(value)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class StopVote:
    """The ranks agree every iteration on whether to stop, without waiting for the GPU: each iteration's vote
    (the number of a signal this rank got, or 0) is max-reduced on the device and read an iteration later,
    when the device has long finished it. A signal to any rank thus stops them all one iteration later."""

    def __init__(self, world, device):
        self.world, self.device, self.event = world, device, None
        self.agreed = torch.zeros(1, pin_memory=device.type == 'cuda')

    def __call__(self, vote, now=False):
        """The signal number the ranks agree on (0: go on); now: agree on this iteration's votes (a host sync)."""
        if self.world == 1:
            return vote
        if now:
            return int(max_rank(vote, self.device))
        if self.event is not None:
            self.event.synchronize()                  # the previous iteration's vote has arrived
        agreed = int(self.agreed.item())
        t = torch.full((1,), float(vote), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.agreed.copy_(t, non_blocking=True)
        if self.device.type == 'cuda':
            self.event = torch.cuda.Event()
            self.event.record()
        return agreed


def check_inputs(args, outdir):
    """What the run reads and where it writes, checked before the teacher is loaded or anything downloaded:
    the method's inputs are given, their paths exist (or are known names or URLs), --outdir can be a folder."""
    if args.method == 'sid2a' and args.init_generator is None:
        raise UserError('--method sid2a needs --init-generator (a distilled SiD generator)')
    if args.method != 'sid2a' and args.init_generator is not None:
        raise UserError(f'--init-generator is for --method sid2a; {args.method} starts from the teacher')
    if args.method != 'sid' and args.data is None:
        raise UserError(f'--method {args.method} needs real images for its discriminator: pass --data')
    kinds = {kind for _, kind, _ in parse_metrics(args.metrics)}
    if 'fd' in kinds and args.data != 'toy':
        raise UserError(f'--metrics {args.metrics}: fd is the toy run\'s metric (its classifier knows only '
                        f'the toy images); use --data toy, or fidNk with --ref')
    if 'fid' in kinds and args.ref is None:
        raise UserError('--metrics fid...: pass --ref (reference statistics) or --metrics none')
    if args.data not in (None, 'toy') and not os.path.exists(args.data):
        raise UserError(f'--data {args.data}: no such file or folder')
    if args.data == 'toy':          # the toy's shipped files, missing only from a partial copy of the project
        for what, path in (('teacher', args.teacher), ('sid-generator', args.init_generator if args.method == 'sid2a' else None)):
            if path == toy.shipped(what, args.arch) and not os.path.isfile(path):
                raise UserError(f'{path} is missing: make it with python toy/make.py {what} --arch {args.arch}')
    nets = {**networks.OFFICIAL_URLS, **networks.RELEASED_URLS}
    for flag, source, names in (('--teacher', args.teacher, nets),
                                ('--init-generator', args.init_generator if args.method == 'sid2a' else None, nets),
                                ('--ref', args.ref if 'fid' in kinds else None, fid.REF_URLS),
                                ('--detector', args.detector if kinds & {'fid', 'is'} else None, {})):
        if source is not None and not (os.path.exists(source) or source in names or source.startswith(('http://', 'https://', 'file://'))):
            raise UserError(f'{flag} {source}: no such file, nor a known name or URL')
    flag = '--resume' if args.resume else '--outdir'
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise UserError(f'{flag} {outdir}: not a folder')
    if blocked := fid.unwritable(outdir):
        raise UserError(f'{flag} {outdir}: {blocked} is not a writable folder')


# The files a run writes into its folder (and, with a dot and a suffix, their temporary files while written).
RUN_FILES = re.compile(r'args\.json|log\.jsonl|log\.txt|training-state\.pt|metrics\.png|toy-comparison\.png|'
                       r'samples-[\d.]+\.png|generator-([\d.]+|best)\.pt')


def later_snapshots(outdir):
    """The generator snapshots past 0 kimg in a run folder."""
    names = os.listdir(outdir) if os.path.isdir(outdir) else []
    return [n for n in names if re.fullmatch(r'generator-\d+\.\d+\.pt', n) and n != os.path.basename(snapshot_path('', 0))]


def refuse_earlier_run(outdir, state_path):
    """A new run starts only in a folder without another run's results: a training state or generator
    snapshots past 0 kimg, nor files of someone else's. (A run stopped before its first state and snapshot
    starts again from scratch.)"""
    if os.path.exists(state_path):
        raise UserError(f'--outdir {outdir} already holds a run: continue it with --resume {outdir} '
                        f'or choose another --outdir')
    names = os.listdir(outdir) if os.path.isdir(outdir) else []
    foreign = sorted(n for n in names if not (RUN_FILES.fullmatch(n) or n.startswith('.')))
    if foreign:
        raise UserError(f'--outdir {outdir} holds files that are not a run\'s ({", ".join(foreign[:3])}'
                        f'{", ..." if len(foreign) > 3 else ""}): choose an empty or new folder')
    if snapshots := later_snapshots(outdir):
        raise UserError(f'--outdir {outdir} holds an earlier run without a training state to resume '
                        f'({max(snapshots)}): move it away or choose another --outdir')


def claim_folder(outdir, fresh, state_path):
    """Hold the run folder while this process lives (the lock goes with it): a second run or resume of the
    same folder stops in one line instead of mixing its files with this one's. Returns the open lock file."""
    try:
        os.makedirs(outdir, exist_ok=True)
        lock = open(os.path.join(outdir, '.lock'), 'a')
    except OSError as e:
        raise UserError(f'{outdir}: cannot write the run\'s folder ({e.strerror or e})') from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise UserError(f'{outdir} is in use by another run: wait for it to end, or choose another --outdir') from None
    if fresh:
        refuse_earlier_run(outdir, state_path)    # again: another run may have written it since the first look
    return lock


def distill(args):
    rank, world, device = fid.init_distributed(args.device)
    master = rank == 0
    outdir = args.resume or args.outdir
    state_path = os.path.join(outdir, 'training-state.pt')
    state = read_state(state_path, args) if args.resume else None
    if state is None:
        refuse_earlier_run(outdir, state_path)
    check_inputs(args, outdir)
    # The folder is written only once the set-up has succeeded (distill_in calls start): a failed start
    # leaves it as it was, with no log.txt or args.json.
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}   # the loop sets its own
    with tee_console(os.path.join(outdir, 'log.txt'), enabled=master) as start:
        try:
            result = distill_in(args, rank, world, device, outdir, state, state_path, start)
            if dist.is_initialized():
                dist.barrier()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            if dist.is_initialized():
                dist.destroy_process_group()
    return result


def distill_in(args, rank, world, device, outdir, state, state_path, start):
    """The run in its folder: the batch layout, the data and the teacher, the three networks (from `state` when
    resuming), the folder's files, then the training loop and, once finished, the summary."""
    master = rank == 0
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)

    # Batch arithmetic: batch = world_size * batch_gpu * rounds.
    batch_gpu = args.batch_gpu or args.batch // world
    if batch_gpu < 1 or args.batch % (world * batch_gpu) != 0:
        raise UserError(f'--batch {args.batch} is not divisible by world_size * --batch-gpu = {world} * {batch_gpu}')
    rounds = args.batch // (world * batch_gpu)
    if master:
        print_options(args, world, rounds, batch_gpu, device)

    # Data and teacher. The toy run draws its images (toy.images).
    images = labels = None
    if args.data == 'toy':
        images, labels = toy.images(toy.TRAIN_IMAGES, toy.TRAIN_SEED)
        labels = labels if args.cond else None
    log(f'loading the teacher {args.teacher}')
    teacher = networks.load_network(args.teacher, device)
    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    if args.data not in (None, 'toy'):
        log(f'loading the data {args.data}')
        images, labels = load_dataset(args.data, teacher.img_resolution, teacher.img_channels, teacher.latent)
    if args.cond != (teacher.label_dim > 0):
        raise UserError(f'--teacher {args.teacher} is {"" if teacher.label_dim else "un"}conditional: '
                        f'{"pass" if teacher.label_dim else "drop"} --cond')
    if teacher.label_dim and images is not None:
        if labels is None:
            raise UserError(f'--data {args.data}: the conditional teacher needs class labels (dataset.json)')
        if int(labels.max()) >= teacher.label_dim or int(labels.min()) < 0:
            raise UserError(f'--data {args.data}: labels span {int(labels.min())}..{int(labels.max())} but the '
                            f'teacher has {teacher.label_dim} classes')
    G_init = networks.load_network(args.init_generator, device) if args.method == 'sid2a' else teacher
    makes = lambda net: (f'{net.img_channels}x{net.img_resolution}x{net.img_resolution} '
                         f'{"latents" if net.latent else "images"} of {net.label_dim or "no"} classes')
    if makes(G_init) != makes(teacher):
        raise UserError(f'--init-generator {args.init_generator} makes {makes(G_init)}, the teacher {makes(teacher)}')

    sampler = Sampler(images, labels if teacher.label_dim else None, teacher.label_dim, shape, device)
    sida = SiDA(args, teacher, G_init, sampler, world, batch_gpu, device)
    slots = [Slot(rank * rounds + r, args.seed, device) for r in range(rounds)]
    evaluator = Evaluator(args, teacher.latent, device)
    nimg, cur_tick, best = 0, 0, None
    if state is not None:
        nimg, cur_tick, best = restore_state(state, state_path, sida, slots, rank, world,
                                             evaluator.metrics[0][0] if evaluator.metrics else None)
    lock = claim_folder(outdir, state is None, state_path) if master else None    # held until the run ends
    start()
    log_path, rows = os.path.join(outdir, 'log.jsonl'), []
    if master:
        for name in os.listdir(outdir):         # temporary files of this program's atomic writes that a kill cut short
            if re.fullmatch(rf'\.({RUN_FILES.pattern})\.\w+\.tmp', name):
                os.remove(os.path.join(outdir, name))
        # The log as of the state: rows past it are redone and unreadable lines dropped; a fresh run drops
        # the rows of an attempt stopped before its first state.
        if state is not None:
            rows = [r for r in read_log(log_path) if r['tick'] <= cur_tick]
        try:
            if state is None:
                networks.atomic_write(os.path.join(outdir, 'args.json'), lambda f: f.write(json.dumps(vars(args), indent=2).encode()))
            networks.atomic_write(log_path, lambda f: f.write(''.join(json.dumps(r) + '\n' for r in rows).encode()))
        except OSError as e:
            raise UserError(f'{outdir}: cannot write the run\'s files ({e.strerror or e})') from None
    if state is not None:
        log(f'resumed from {state_path} at {nimg / 1000:g} kimg')
    log(f'networks: {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M parameters each (teacher, fake score '
        f'network, generator)')
    nimg, stopped_by = training_loop(args, sida, slots, evaluator, (nimg, cur_tick, best), rows, state is None,
                                     outdir, state_path, rank, world, device)
    if master and nimg >= args.duration * 1e6:
        for line in summary(rows, args.method):
            log(line)
        if args.data == 'toy':
            derived('toy-comparison.png', toy.save_comparison, teacher, G_init, sida.G_ema,
                    os.path.join(outdir, 'toy-comparison.png'), args.method, toy.sampler_steps(args.teacher),
                    args.init_sigma, device)
        log(f'done: the final EMA generator is {outdir}/generator-{nimg / 1000:010.3f}.pt'
            + (f' (the best snapshot by {evaluator.metrics[0][0]}: generator-best.pt)' if evaluator.metrics else ''))
    if lock:
        lock.close()
    return {'nimg': nimg, 'outdir': outdir, 'stopped_by': stopped_by}


def training_loop(args, sida, slots, evaluator, start, rows, fresh, outdir, state_path, rank, world, device):
    """Iterate until --duration; every --tick kimg a status line, at snapshots metrics and samples, at
    dumps the training state. SIGTERM / SIGINT finish the iteration, save the state and stop. `rows`: the
    log so far (rank 0), extended as the run goes."""
    master = rank == 0
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    nimg, cur_tick, best = start
    # Upstream: the generator steps once more than 100k images were seen (SiD: from the start), the
    # adversarial term once more than 200k; nimg counts the images before this iteration.
    gen_start = args.gen_start_kimg * 1000 if sida.adversarial else -math.inf
    adv_start = args.adv_start_kimg * 1000 if sida.adversarial else math.inf
    total = int(args.duration * 1e6)
    log_path = os.path.join(outdir, 'log.jsonl')
    if not fresh and master and rows and rows[-1]['tick'] == cur_tick and (nimg >= total or cur_tick % args.snap == 0):
        # The state's tick was a snapshot tick: a kill after the state may have cut its generator files short.
        # The EMA generator is the state's, so what is missing comes out as the tick would have written it.
        is_best = best is not None and rows[-1].get(evaluator.metrics[0][0]) == best
        best_path = os.path.join(outdir, 'generator-best.pt')
        if (not os.path.isfile(snapshot_path(outdir, rows[-1]['kimg'])) or
                is_best and saved_meta(best_path).get('kimg') != rows[-1]['kimg']):
            derived('the snapshot', save_snapshot, sida.G_ema, rows[-1], is_best, evaluator, args, outdir, device)
    if not fresh and nimg >= total:      # a finished run resumed: nothing to add
        return nimg, None
    stop, vote = [], StopVote(world, device)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)

    measured = [None, {}]    # the EMA generator's weights when last measured (version_key), and its metrics

    def finish_tick(row, snap, dump):
        """The tick's row (with the metrics, at snapshots) on disk, then at dumps the training state, and only
        then what derives from them: the status line, the samples and generator files, the plot. A kill leaves
        the state and the rows up to it whole; a failed derived output costs only itself."""
        nonlocal best
        key = networks.version_key(sida.G_ema.parameters()) if snap and evaluator.metrics else None
        if key is not None and fid.broadcast_object(key == measured[0]):   # (rank 0 decides: ranks measure together)
            row.update(measured[1])           # unchanged since (the discriminator warm-up): the same numbers
        elif key is not None:
            log(f'measuring {args.metrics} of the EMA generator...')
            try:
                measured[:] = key, {k: round(v, 5) for k, v in evaluator(sida.G_ema).items()}
                row.update(measured[1])
            except UserError:
                raise
            except Exception as e:
                failure = f'measuring {args.metrics} failed ({type(e).__name__}: {networks.one_line(e)})'
                if world > 1:          # the other ranks would wait for this one in the measurement's collectives
                    raise UserError(f'{failure} on rank {rank}, which stops a run of several processes; the last '
                                    f'saved state (if any) is intact: continue with --resume {outdir}') from None
                log(f'warning: {failure}; the run goes on')
        is_best = snap and improves(row, best, evaluator.metrics)
        best = fid.broadcast_object(row[evaluator.metrics[0][0]] if is_best else best)
        if master:
            try:
                append_row(log_path, row)
            except OSError as e:
                raise UserError(f'could not append to {log_path} ({e.strerror or e}); the last training state is '
                                f'intact: continue with --resume {outdir} once that is fixed') from None
            rows.append(row)
        if max_rank(sida.worst_streak, device) >= args.max_nonfinite:      # every rank stops together
            last = f'the last good state is {state_path}' if os.path.isfile(state_path) else 'no state was saved yet'
            raise UserError(f'no finite generated sample in {args.max_nonfinite} iterations in a row; stopped '
                            f'({last}); lower --lr/--glr or check the teacher')
        if dump and max_rank(sida.nonfinite_streak, device) > 0:    # the networks are likely broken: keep the last state
            log(f'warning: no training state saved at {nimg / 1000:g} kimg: the last iteration generated no finite sample')
        elif dump:
            try:
                save_state(state_path, sida, slots, nimg, cur_tick, best, args, rank)
            except OSError as e:
                raise UserError(f'could not write {state_path} ({e.strerror or e}); the state written before (if any) '
                                f'is intact: continue with --resume {outdir} once that is fixed') from None
        if master:
            derived('the status line', log, status_line(row, total / 1000))
            if snap:
                derived('the snapshot', save_snapshot, sida.G_ema, row, is_best, evaluator, args, outdir, device)
            derived('metrics.png', fid.plot_metrics, rows, os.path.join(outdir, 'metrics.png'), METRIC_PREFIXES,
                    toy.baseline_label)

    if fresh:             # tick 0: the initial generator, and in the toy run the data and the teacher
        log('measuring the initial generator (and, in the toy run, the data and the teacher)...')
        finish_tick({'tick': 0, 'kimg': 0.0, **evaluator.baselines(sida.teacher)}, snap=True, dump=False)
    tick_nimg, tick_time, start_time = nimg, time.time(), time.time()
    uncompiled = {'fake score', 'generator', 'adversarial generator'} if args.compile else set()
    while True:
        if nimg < total:
            t0, step = time.time(), 'fake score'
            sida.fake_score_step(slots)                      # every iteration from the start
            if nimg > gen_start:                             # SiDA: after the discriminator warm-up
                step = 'adversarial generator' if nimg > adv_start else 'generator'
                sida.generator_step(slots, use_adv=nimg > adv_start)
                sida.update_ema(nimg)
            nimg += args.batch
            if step in uncompiled:                           # --compile: a new step's graphs compile on first use
                uncompiled.discard(step)
                log(f'--compile: the first iteration with the {step} step took {time.time() - t0:.1f} s')
        done = nimg >= total
        signum = vote(stop[0] if stop else 0, now=done)    # a signal to any rank stops them all
        stopping = signum > 0
        if stopping and not stop:
            stop.append(signum)
        if not (done or stopping or nimg >= tick_nimg + args.tick * 1000):
            continue

        # Tick: one status line; at snapshot ticks metrics, samples and a generator; at dump ticks the state.
        cur_tick += 1
        row = {'tick': cur_tick, 'kimg': round(nimg / 1000, 3)}
        row.update(sida.tick_stats())
        elapsed = time.time() - tick_time
        row['sec_per_kimg'] = round(elapsed / max((nimg - tick_nimg) / 1000, 1e-9), 3)
        row['img_per_s'] = round((nimg - tick_nimg) / max(elapsed, 1e-9), 2)
        row['peak_gb'] = round((torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else peak_rss()) / 2**30, 3)
        row['time_s'] = round(time.time() - start_time, 1)
        # A stop saves the state without measuring first (a FID-50k takes minutes: a scheduler's grace may not).
        finish_tick(row, snap=done or (cur_tick % args.snap == 0 and not stopping),
                    dump=cur_tick % args.dump == 0 or done or stopping)
        if done or stopping:
            break
        tick_nimg, tick_time = nimg, time.time()
    if stop:
        log(f'stopped by signal {stop[0]} at {nimg / 1000:g} kimg; continue with --resume {outdir}')
    return nimg, (stop[0] if stop else None)


def peak_rss():
    import resource                                  # POSIX only: imported where it is needed
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    try:
        result = distill(parse_args(argv))
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:        # before the loop (which saves and stops on Ctrl-C) or after it: nothing to save
        print('error: interrupted', file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    if result['stopped_by']:                  # saved, not finished: 128 + the signal, as the shell reports a kill
        sys.exit(128 + result['stopped_by'])


if __name__ == '__main__':
    main()
