#!/usr/bin/env python3
"""SiDA: Score identity Distillation with an Adversarial loss (Zhou et al., ICLR 2025).

The whole distillation loop in one file. A pretrained EDM/EDM2 denoiser (the teacher) becomes a one-step
generator. Read it top to bottom: the method (noise levels, augmentation, the losses), data, networks,
the training loop, then the entry points (the offline toy run and the benchmark).

One process (CPU or one GPU):
    python sida.py --preset toy                     # offline toy run: trains a small teacher, distills it
    python sida.py --teacher edm-cifar10-32x32-uncond-vp --data cifar-10-python.tar.gz \
        --ref https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz --outdir runs/c10
One node with 8 GPUs:
    torchrun --standalone --nproc_per_node=8 sida.py --teacher edm-cifar10-32x32-uncond-vp --data ...
Two nodes (run on both, NODE_RANK=0 and 1):
    torchrun --nnodes=2 --node_rank=$NODE_RANK --nproc_per_node=8 --master_addr=$MASTER_ADDR \
        --master_port=29500 sida.py --teacher ... --data ...
The paper's runs, with every setting: train_cifar.sh and train_imagenet.sh. Other entry points:
    python sida.py --bench --arch ddpmpp --batch-gpu 64 --precision bf16   # throughput, random networks
    python sida.py --prepare-latents IMAGES.zip LATENTS.zip                 # EDM2 latent dataset (diffusers)
"""

import argparse
import contextlib
import copy
import io
import json
import math
import os
import signal
import sys
import time
import zipfile

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils._python_dispatch
import torch.utils.flop_counter
from PIL import Image

import fid
import networks
from networks import UserError

# ----------------------------------------------------------------------------------------------------
# Settings. Defaults are the CIFAR-10 unconditional SiDA run of the paper (SPEC §6).

def parse_args(argv=None):
    p = argparse.ArgumentParser(description='SiD / SiDA / SiD²A distillation of EDM and EDM2 teachers.')
    a = p.add_argument
    a('--method',         default='sida', choices=['sid', 'sida', 'sid2a'], help='SiD, SiDA, or SiDA from a SiD generator')
    a('--teacher',        default='edm-cifar10-32x32-uncond-vp', help='teacher: path, URL or official name')
    a('--init-generator', default=None,   help='SiD²A: generator to start from (path or URL)')
    a('--data',           default=None,   help='real images: zip, folder, CIFAR-10 tarball or "toy" (SiD needs none)')
    a('--cond',           action='store_true', help='class-conditional distillation (teacher must be conditional)')
    a('--outdir',         default='runs/sida', help='where logs, samples and checkpoints go')
    a('--alpha',          type=float, default=1.0,  help='weight of the bias-correction term of the SiD loss')
    a('--tmax',           type=int,   default=800,  help='largest noise step of the generator loss, out of 1000')
    a('--init-sigma',     type=float, default=2.5,  help='noise level at which the generator denoises z')
    a('--batch',          type=int,   default=256,  help='total batch over all GPUs and accumulation rounds')
    a('--batch-gpu',      type=int,   default=None, help='per-GPU batch of one accumulation round')
    a('--lr',             type=float, default=1e-5, help='fake score network learning rate')
    a('--glr',            type=float, default=1e-5, help='generator learning rate')
    a('--ls',             type=float, default=1.0,  help='fake score loss scale')
    a('--lsg',            type=float, default=100., help='SiD generator loss scale')
    a('--lsd',            type=float, default=1.0,  help='discriminator loss scale')
    a('--lsg-gan',        type=float, default=0.01, help='adversarial generator loss scale')
    a('--ema',            type=float, default=0.5,  help='EMA half-life of the generator, Mimg')
    a('--duration',       type=float, default=300., help='training length, Mimg')
    a('--dropout',        type=float, default=0.13, help='dropout of the trained networks')
    a('--augment',        type=float, default=0.12, help='augmentation probability on the fake-score side')
    a('--p-mean',         type=float, default=None, help='log-normal mean of the fake-score noise (EDM -1.2, EDM2 -0.4)')
    a('--p-std',          type=float, default=None, help='log-normal std of the fake-score noise (EDM 1.2, EDM2 1.0)')
    a('--logvar',         action=argparse.BooleanOptionalAction, default=True, help='EDM2: log-variance weighting of the losses')
    a('--force-norm',     action=argparse.BooleanOptionalAction, default=True, help='EDM2: forced weight normalisation')
    a('--gen-start-kimg', type=float, default=100., help='generator steps start after this many kimg (SiDA)')
    a('--adv-start-kimg', type=float, default=200., help='adversarial generator term starts after this many kimg')
    a('--precision',      default='fp32', choices=['fp32', 'tf32', 'bf16', 'fp16'], help='arithmetic of the networks')
    a('--compile',        action='store_true', help='torch.compile the networks')
    a('--seed',           type=int,   default=0,    help='random seed')
    a('--tick',           type=float, default=50.,  help='log every this many kimg')
    a('--snap',           type=int,   default=50,   help='samples, generator snapshot and metrics every N ticks')
    a('--dump',           type=int,   default=50,   help='training state every N ticks')
    a('--metrics',        default='fid50k', help='comma list of fidNk, isNk, fd, fdNk, or none')
    a('--ref',            default=None,  help='reference statistics for FID (npz/pkl path or URL)')
    a('--detector',       default=None,  help='Inception detector (path or URL; default: the official URL)')
    a('--vae',            default=networks.VAE_NAME, help='EDM2 latents: the Stable Diffusion VAE (hub name or folder)')
    a('--device',         default=None,  help='cuda or cpu (default: cuda when available)')
    a('--resume',         default=None,  help='continue the run in this folder from its training-state.pt')
    a('--max-nonfinite',  type=int,   default=100, help='stop after this many iterations in a row with no finite sample')
    # The offline toy run and the benchmark.
    a('--preset',         default=None, choices=['toy'], help='toy: offline run on procedurally generated images')
    a('--arch',           default='ddpmpp', choices=['ddpmpp', 'ncsnpp', 'adm', 'edm2'], help='toy/bench architecture')
    a('--teacher-kimg',   type=float, default=None, help='toy: train the toy teacher from scratch on this many kimg')
    a('--teacher-only',   action='store_true', help='toy: train the toy teacher into --outdir/teacher.pt, measure it, exit')
    a('--bench',          action='store_true', help='time full SiDA iterations on random networks and exit')
    a('--prepare-latents', nargs=2, metavar=('SRC', 'DEST'), help='encode 512x512 images into an EDM2 latent zip')
    a('--bench-iters',    type=int,   default=10)
    a('--resolution',     type=int,   default=32)
    a('--cbase',          type=int,   default=128)
    a('--cres',           default='2,2,2')
    a('--label-dim',      type=int,   default=0)
    args = p.parse_args(argv)
    # Flags given on the command line (a resumed run takes every other run flag from its saved state).
    given = [a.split('=')[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith('--')]
    args.explicit = sorted({act.dest for act in p._actions for opt in act.option_strings if opt in given})
    if args.preset == 'toy':
        # Only flags left at their defaults are changed, so `--preset toy --method sid` etc. still work.
        # The teacher: the shipped one of --arch (toy/ARCH/teacher.pt, made by --teacher-only), or one trained
        # from scratch with --teacher-kimg / --teacher-only (and for architectures that ship none).
        shipped = os.path.join(TOY_TEACHERS, args.arch, 'teacher.pt')
        retrain = args.teacher_only or args.teacher_kimg is not None or not os.path.isfile(shipped)
        toy = dict(teacher=None if retrain else shipped, data='toy', cond=True, outdir='runs/toy', batch=64,
                   lr=1e-4, glr=1e-4, ema=0.002, duration=0.02, dropout=0.0, augment=0.0, gen_start_kimg=0.5,
                   adv_start_kimg=1.0, tick=2., snap=2, dump=2, metrics='fd', teacher_kimg=TOY_TEACHER_KIMG)
        for k, v in toy.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    return args

# ----------------------------------------------------------------------------------------------------
# The method. Every random draw can be passed in, so the tests pin them.

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0   # EDM's Karras schedule


def sid_sigma(t):
    """Noise level of the SiD generator loss: t in [0, tmax/1000] on the Karras schedule (SPEC §2)."""
    a, b = SIGMA_MAX ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
    return (a + (1 - t) * (b - a)) ** RHO


def edm_weight(sigma, sigma_data):
    """EDM's loss weight lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def sid_generator_loss(x_g, d_real, d_fake, alpha):
    """SiD generator loss per pixel (SPEC §2): (d_r - d_f)((d_r - x_g) - alpha (d_r - d_f)) / w."""
    with torch.no_grad():
        w = (x_g - d_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)
    return (d_real - d_fake) * ((d_real - x_g) - alpha * (d_real - d_fake)) / w


def denoising_loss(denoised, x, sigma, sigma_data, logvar=None):
    """EDM's denoising loss per pixel (SPEC §3); with EDM2's log-variance u: weight/e^u (...)^2 + u."""
    loss = edm_weight(sigma, sigma_data) * (denoised - x) ** 2
    return loss if logvar is None else loss / logvar.exp() + logvar


def masked_mean(x, ok):
    """Mean over the kept samples (ok: [B] bool); dropped samples count for nothing, with no host sync."""
    per_sample = x.flatten(1).mean(dim=1)
    return keep(per_sample, ok).sum() / ok.sum().clamp(min=1)


def discriminator_loss(logit_real, logit_fake, weight, ok=None):
    """SiDA discriminator loss per sample (SPEC §4): weight * (BCE(real, 1) + BCE(fake, 0)) / 2,
    each BCE a mean over the batch and the logit map (over kept samples only, when ok is given)."""
    ok = torch.ones(len(weight), dtype=torch.bool, device=weight.device) if ok is None else ok
    bce = lambda logit, target: F.binary_cross_entropy_with_logits(
        logit, torch.full_like(logit, target), reduction='none')
    loss = (masked_mean(bce(logit_real, 1.0), ok) + masked_mean(bce(logit_fake, 0.0), ok)) / 2
    return keep(weight * loss, ok)


def adversarial_loss(logit_g, x_g, d_real, ok=None):
    """SiDA generator adversarial loss per pixel (SPEC §4): BCE(clamp(logit, -10, 10), 1) averaged over
    the per-GPU batch (its average fakeness), then divided by each sample's w."""
    ok = torch.ones(len(x_g), dtype=torch.bool, device=x_g.device) if ok is None else ok
    with torch.no_grad():
        w = (x_g - d_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-5)
    logit = logit_g.clamp(-10, 10)
    bce = masked_mean(F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit), reduction='none'), ok)
    return keep((bce / w).expand_as(x_g), ok)


def finite_samples(*tensors):
    """Per-sample mask: True where every value of every tensor is finite (SPEC §4 NaN guard)."""
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok &= torch.isfinite(t).flatten(1).all(dim=1)
    return ok


def keep(loss, ok):
    """Zero the loss of dropped samples without a host sync (where, not indexing: NaN * 0 is NaN)."""
    return torch.where(ok.view(-1, *[1] * (loss.ndim - 1)), loss, torch.zeros_like(loss))


def augment(x, p, gen):
    """EDM's geometric augmentation (SPEC §5) as one affine warp per sample; returns (x, 9-dim labels).

    x-flip is drawn for every sample (probability multiplier 1e8); every other transform is applied with
    probability p. The warp uses bilinear sampling with reflection padding.
    """
    B, dev = x.shape[0], x.device
    rand = lambda: torch.rand(B, generator=gen, device=dev)
    randn = lambda: torch.randn(B, generator=gen, device=dev)
    coin = lambda: torch.randint(2, (B,), generator=gen, device=dev).float()
    gate = lambda v, prob: torch.where(rand() < prob, v, torch.zeros_like(v))
    xflip, yflip = coin(), gate(coin(), p)
    scale = gate(randn() * 0.2, p)                        # log2 of the isotropic scale
    rot = gate((rand() * 2 - 1) * math.pi, p)             # rotation, uniform over the circle
    aniso = gate(randn() * 0.2, p)                        # log2 of the anisotropic scale...
    aniso_rot = gate((rand() * 2 - 1) * math.pi, 0.5)     # ...in a frame rotated with probability 0.5
    tx, ty = gate(randn() * 0.125, p), gate(randn() * 0.125, p)  # translation, fraction of the size

    def mat(a, b, c, d, e=0., f=0.):
        z, o = torch.zeros(B, device=dev), torch.ones(B, device=dev)
        rows = [[a, b, e], [c, d, f], [z, z, o]]
        return torch.stack([torch.stack([torch.as_tensor(v, device=dev).expand(B).float() for v in r], -1)
                            for r in rows], -2)
    rotm = lambda t: mat(t.cos(), -t.sin(), t.sin(), t.cos())
    s, a = 2 ** scale, 2 ** aniso
    M = mat(1 - 2 * xflip, 0., 0., 1 - 2 * yflip)                  # forward map of pixel coordinates
    M = mat(s, 0., 0., s) @ M
    M = rotm(rot) @ M
    M = rotm(aniso_rot) @ mat(a, 0., 0., 1 / a) @ rotm(-aniso_rot) @ M
    M = mat(1., 0., 0., 1., 2 * tx, 2 * ty) @ M                   # grid coordinates span 2 per image size
    theta = torch.linalg.inv_ex(M)[0][:, :2]                      # grid_sample maps output to input; _ex: no sync
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode='bilinear', padding_mode='reflection', align_corners=False)
    labels = torch.stack([xflip, yflip, scale, rot.cos() - 1, rot.sin(),
                          aniso * aniso_rot.cos(), aniso * aniso_rot.sin(), tx, ty], dim=1)
    return out, labels

# ----------------------------------------------------------------------------------------------------
# Distributed set-up from torchrun's environment; a plain process is rank 0 of 1.

def setup_distributed(device_arg):
    if device_arg is None:
        device_arg = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device_arg.startswith('cuda') and not torch.cuda.is_available():
        raise UserError('--device cuda: no CUDA device is available')
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        local_rank = int(os.environ.get('LOCAL_RANK', 0))
        device = torch.device('cuda', local_rank) if device_arg.startswith('cuda') else torch.device('cpu')
        if device.type == 'cuda':
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, torch.device(device_arg)


def broadcast_object(obj, rank):
    if not dist.is_initialized():
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]

# ----------------------------------------------------------------------------------------------------
# Data: images in memory as uint8 [N, C, H, W] (on the GPU when they fit) plus integer labels.

TOY_RES, TOY_CLASSES, toy_images = fid.TOY_RES, fid.TOY_CLASSES, fid.toy_images   # the toy run's data (fid.py)
TOY_SAMPLER_STEPS = 18          # Heun steps of the toy teacher's EDM sampler (35 network evaluations)
TOY_REF_IMAGES = 10000          # real images behind the toy fd's reference statistics
TOY_TEACHERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'toy')   # shipped teachers: {arch}/teacher.pt


def load_dataset(path, resolution, channels):
    """Images (uint8 [N, C, H, W]) and labels (or None) of an EDM zip or folder or the CIFAR-10 tarball;
    for EDM2 teachers (4 latent channels) an EDM2 latent zip, read on demand."""
    if channels == 4:
        data = LatentData(path)
        images, labels, shape = data, data.labels, data.shape
    else:
        images, labels = fid.load_images(path)
        images, labels = torch.from_numpy(images), None if labels is None else torch.from_numpy(labels).long()
        shape = tuple(images.shape[1:])
    if shape != (channels, resolution, resolution):
        raise UserError(f'--data {path}: {"latents" if channels == 4 else "images"} are {shape} (C, H, W) but the '
                        f'teacher expects {(channels, resolution, resolution)}')
    return images, labels


class LatentData:
    """EDM2's latent dataset (SPEC §7): a zip of per-image .npy files holding the Stable Diffusion VAE's
    posterior mean and std (8 x 64 x 64 for ImageNet 512) and EDM's dataset.json labels. ImageNet's
    latents do not fit in memory, so they are read from the zip on demand."""

    def __init__(self, path):
        try:
            self.zip = zipfile.ZipFile(path)
            self.names = sorted(n for n in self.zip.namelist() if n.endswith('.npy'))
            first = np.load(io.BytesIO(self.zip.read(self.names[0]))) if self.names else None
        except (OSError, zipfile.BadZipFile, ValueError) as e:
            raise UserError(f'--data {path}: not an EDM2 latent zip ({type(e).__name__})') from None
        if first is None or first.ndim != 3 or first.shape[0] % 2:
            raise UserError(f'--data {path}: expected .npy files of the VAE mean and std [2C, H, W]')
        self.shape = (first.shape[0] // 2, *first.shape[1:])
        self.labels = None
        if 'dataset.json' in self.zip.namelist():
            labels = dict(json.loads(self.zip.read('dataset.json')).get('labels') or [])
            if labels:
                self.labels = torch.tensor([labels[n] for n in self.names], dtype=torch.int64)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, idx):
        """Mean and std of the latents of the given indices: float32 [n, 2C, H, W]."""
        return torch.from_numpy(np.stack([np.load(io.BytesIO(self.zip.read(self.names[i]))) for i in idx.tolist()])).float()


def prepare_latents(src, dest, device, vae=networks.VAE_NAME):
    """Encode a dataset of 512x512 images (EDM-style zip or folder, e.g. from EDM2's dataset_tool.py
    convert) into an EDM2 latent zip with the Stable Diffusion VAE."""
    if os.path.exists(dest):
        raise UserError(f'--prepare-latents: {dest} exists; not overwriting it')
    vae = networks.load_vae(vae, device=device)
    dataset = fid.ImageDataset(src)

    def write(f):
        labels = {}
        with zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED) as z:
            index = 0
            for images, batch_labels in fid.iterate_images(dataset, batch=32):
                for mean_std, label in zip(networks.encode_images(vae, images).cpu().numpy(), batch_labels.tolist()):
                    name = f'{index // 1000:05d}/img{index:08d}.npy'
                    buf = io.BytesIO()
                    np.save(buf, mean_std)
                    z.writestr(name, buf.getvalue())
                    if label >= 0:
                        labels[name] = label
                    index += 1
                print(f'encoded {index}/{len(dataset)} images', flush=True)
            z.writestr('dataset.json', json.dumps({'labels': [[k, v] for k, v in labels.items()] or None}))

    networks.atomic_write(dest, write)
    print(f'wrote {dest}')


class Slot:
    """The random stream of one micro-batch slot. A step of `batch` images is split into
    batch / batch_gpu slots, spread over ranks and accumulation rounds; each slot has its own generator,
    so the same seed gives the same draws however the slots are spread (1 GPU x 2 rounds = 2 GPUs x 1)."""

    def __init__(self, index, seed, device):
        self.index = index
        self.gen = torch.Generator(device).manual_seed(seed * 1_000_003 + index)


class Sampler:
    """Draws generator inputs and real data for one micro-batch from a slot's random stream."""

    def __init__(self, images, labels, label_dim, shape, device):
        self.latent = isinstance(images, LatentData)
        if isinstance(images, torch.Tensor):
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
# Networks.

def trainable_copy(net, dropout, device, drop_logvar=False):
    """A fresh trainable network with net's weights and the given dropout."""
    config = copy.deepcopy(net.config)
    config['kwargs']['dropout'] = dropout
    if drop_logvar:
        config['kwargs']['use_logvar'] = False
    copy_ = networks.build_network(config).to(device)
    copy_.load_state_dict(net.state_dict(), strict=not drop_logvar)
    return copy_.train().requires_grad_(True)


def is_edm2(net):
    return net.config['class_name'] == 'EDM2Precond'


def one_step(G, z, sigma_init, labels, augment_labels=None, **kwargs):
    """The generator: x_g = G(sigma_init z, sigma_init, c) (SPEC §1)."""
    return G(z * sigma_init, torch.full((z.shape[0], 1, 1, 1), sigma_init, device=z.device), labels, augment_labels,
             **kwargs)


@torch.no_grad()
def edm_sampler(net, z, labels, steps=18):
    """EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, Alg. 1) for the teacher."""
    i = torch.arange(steps, dtype=torch.float64, device=z.device)
    a, b = SIGMA_MAX ** (1 / RHO), SIGMA_MIN ** (1 / RHO)
    t = torch.cat([(a + i / (steps - 1) * (b - a)) ** RHO, torch.zeros(1, dtype=torch.float64, device=z.device)])
    x = z.double() * t[0]
    for k in range(steps):
        d = (x - net(x.float(), t[k].float().expand(len(x)), labels).double()) / t[k]
        x_next = x + (t[k + 1] - t[k]) * d
        if k < steps - 1:
            d2 = (x_next - net(x_next.float(), t[k + 1].float().expand(len(x)), labels).double()) / t[k + 1]
            x_next = x + (t[k + 1] - t[k]) * (d + d2) / 2
        x = x_next
    return x.float()


class EDMSampler(torch.nn.Module):
    """The teacher's multi-step sampler behind the one-step call G(sigma_init z, sigma_init, c), so that
    fid.generate_images (same seeds, same z) measures it like a generator."""

    def __init__(self, net, steps):
        super().__init__()
        self.net, self.steps = net, steps
        self.img_resolution, self.img_channels, self.label_dim = net.img_resolution, net.img_channels, net.label_dim

    def forward(self, x, sigma, class_labels=None):
        return edm_sampler(self.net, x / sigma, class_labels, self.steps)


def plot_metrics(rows, path):
    """Every metric against kimg, drawn with PIL (no plotting dependency). A metric measured once
    (the toy run's fd_data and fd_teacher) is drawn as a horizontal reference line; log scale."""
    from PIL import ImageDraw
    names = sorted({k for r in rows for k in r if k.startswith(('fid', 'is', 'fd')) and r[k] > 0})
    if not names:
        return
    W, H, m = 640, 400, 60
    img = Image.new('RGB', (W, H), 'white')
    d = ImageDraw.Draw(img)
    colours = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e']
    kimgs = [r['kimg'] for r in rows]
    values = [math.log10(r[n]) for n in names for r in rows if n in r and r[n] > 0]
    x0, x1, y0, y1 = min(kimgs), max(kimgs), min(values), max(values)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    px = lambda x: m + (x - x0) / (x1 - x0) * (W - 2 * m)
    py = lambda v: H - m - (math.log10(v) - y0) / (y1 - y0) * (H - 2 * m)
    d.rectangle([m, m, W - m, H - m], outline='black')
    for k in range(5):
        fx, fy = x0 + (x1 - x0) * k / 4, 10 ** (y0 + (y1 - y0) * k / 4)
        d.text((px(fx) - 10, H - m + 5), f'{fx:g}', fill='black')
        d.text((5, py(fy) - 5), f'{fy:.3g}', fill='black')
    d.text((W // 2 - 15, H - 25), 'kimg', fill='black')
    for i, n in enumerate(names):
        xy = [(px(r['kimg']), py(r[n])) for r in rows if n in r and r[n] > 0]
        c = colours[i % len(colours)]
        if len(xy) == 1:
            d.line([(m, xy[0][1]), (W - m, xy[0][1])], fill=c, width=1)
        else:
            d.line(xy, fill=c, width=2)
            for x, y in xy:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        d.text((m + 10 + 110 * i, m - 20), n, fill=c)
    networks.atomic_write(path, lambda f: img.save(f, format='PNG'))

# ----------------------------------------------------------------------------------------------------
# Evaluation.

def parse_metrics(spec):
    """'fid50k,is50k' -> [('fid50k', 'fid', 50000), ...]; 'fd' is the toy Fréchet distance on 2048 images."""
    out = []
    for name in [s.strip() for s in spec.split(',') if s.strip() and s.strip() != 'none']:
        kind = name.rstrip('0123456789k')
        digits = name[len(kind):]
        if kind not in ('fid', 'is', 'fd') or (digits and not (digits.endswith('k') and digits[:-1].isdigit())):
            raise UserError(f'--metrics: unknown metric "{name}" (use fidNk, isNk, fd or fdNk, e.g. fid50k)')
        out.append((name, kind, int(digits[:-1]) * 1000 if digits else 2048))
    return out


# ----------------------------------------------------------------------------------------------------
# The method as two updates per iteration, on the networks of SPEC §1.

def precision_setup(precision, device):
    """Autocast context for the networks (losses stay fp32) and whether fp16 loss scaling is needed."""
    tf32 = precision == 'tf32'
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True      # fixed shapes: time the convolution algorithms once
    if precision in ('bf16', 'fp16'):
        dtype = torch.bfloat16 if precision == 'bf16' else torch.float16
        return lambda: torch.autocast(device.type, dtype=dtype), precision == 'fp16'
    return contextlib.nullcontext, False


def compile_fn(enabled, device):
    """torch.compile for --compile; the identity when off or when compiling cannot work here (warned)."""
    if not enabled:
        return lambda fn: fn
    import torch._dynamo
    from torch.utils._triton import has_triton
    if device.type == 'cuda' and not has_triton():
        print('warning: --compile: Triton is not installed, running eagerly', flush=True)
        return lambda fn: fn
    torch._dynamo.config.suppress_errors = True    # a graph that fails to compile runs eagerly (logged)
    return torch.compile


def sanitize_grads(params, clip):
    """SPEC §4: non-finite gradient entries -> 0 / ±1e5; optionally clip elementwise to [-1, 1]."""
    grads = [p.grad for p in params if p.grad is not None]
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=1e5, neginf=-1e5)
    if clip and grads:
        torch._foreach_clamp_min_(grads, -1.0)
        torch._foreach_clamp_max_(grads, 1.0)


class SiDA:
    """Teacher f_phi (frozen), fake score network f_psi and generator G with their optimizers.

    `fake_score_step` and `generator_step` are one iteration of SiD / SiDA (SPEC §2-4); each runs
    `len(slots)` accumulation rounds of `batch_gpu` images and ends with one optimizer step.
    """

    def __init__(self, args, teacher, G_init, sampler, world, batch_gpu, device):
        self.args, self.teacher, self.sampler, self.device = args, teacher, sampler, device
        self.world, self.batch_gpu = world, batch_gpu
        self.batch_per_gpu = args.batch // world                     # B of the SPEC's "sum * scale / B"
        self.edm2 = is_edm2(teacher)
        self.p_mean = args.p_mean if args.p_mean is not None else (-0.4 if self.edm2 else -1.2)
        self.p_std = args.p_std if args.p_std is not None else (1.0 if self.edm2 else 1.2)
        self.adversarial = args.method != 'sid'
        self.clip_fake_grads = self.adversarial and not self.edm2   # the official EDM2 runs do not clip
        self.fake_score = trainable_copy(teacher, args.dropout, device)
        self.G = trainable_copy(G_init, args.dropout, device, drop_logvar=self.edm2).eval()
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.use_logvar = self.edm2 and args.logvar and self.fake_score.config['kwargs'].get('use_logvar', True)
        self.force_norm = self.edm2 and args.force_norm
        self.use_aug = args.augment > 0 and self.fake_score.config['kwargs'].get('augment_dim', 0) > 0
        if device.type == 'cuda':
            for net in (teacher, self.fake_score, self.G):
                net.to(memory_format=torch.channels_last)
        ddp = lambda m: torch.nn.parallel.DistributedDataParallel(
            m, device_ids=[device] if device.type == 'cuda' else None, broadcast_buffers=False)
        self.fake_score_ddp = ddp(self.fake_score) if world > 1 else self.fake_score
        self.G_ddp = ddp(self.G) if world > 1 else self.G
        self.autocast, fp16 = precision_setup(args.precision, device)
        adam = lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.0, 0.999), eps=1e-6 if fp16 else 1e-8, fused=True)
        self.opt_f, self.opt_g = adam(self.fake_score.parameters(), args.lr), adam(self.G.parameters(), args.glr)
        self.scaler_f = torch.amp.GradScaler(device.type, enabled=fp16)
        self.scaler_g = torch.amp.GradScaler(device.type, enabled=fp16)
        self.stats = {}
        self.nonfinite_streak = torch.zeros((), device=device)
        self.worst_streak = torch.zeros((), device=device)
        # The fake score network serves two roles: trained through DDP in its own step, frozen (plain module)
        # in the generator step, where DDP must not see it.
        # Compile note: torch.compile keeps a graph per call signature, shared by instances of one class. So the
        # teacher and fake score calls all ask for the same outputs, and G asks for logits too (unused): with
        # EDM networks 4 graphs cover the 6 calls (G + fake score training, frozen teacher + fake score,
        # G without gradients, discriminator).
        compile_ = compile_fn(args.compile, device)
        self.fake_kw = dict(return_logits=True, return_logvar=True) if self.use_logvar else dict(return_logits=True)
        self.teacher_fn, self.G_fn, self.G_eval_fn = compile_(teacher), compile_(self.G_ddp), compile_(self.G)
        self.fake_train_fn, self.fake_fn = compile_(self.fake_score_ddp), compile_(self.fake_score)
        self.discriminate_fn = compile_(self.fake_score.discriminate)
        # SPEC §5: unaugmented queries pass zero augmentation labels (this also keeps map_augment in every
        # DDP graph, so DDP needs no unused-parameter search).
        augment_dim = self.fake_score.config['kwargs'].get('augment_dim', 0)
        self.no_aug = lambda n: torch.zeros(n, augment_dim, device=device) if augment_dim else None

    def state(self):
        return ({'G': self.G, 'G_ema': self.G_ema, 'fake_score': self.fake_score},
                {'G': self.opt_g, 'fake_score': self.opt_f}, {'G': self.scaler_g, 'fake_score': self.scaler_f})

    def record(self, name, value):
        """Accumulate a statistic on the device; read once per tick (no host sync per iteration)."""
        total, count = self.stats.get(name, (0, 0))
        self.stats[name] = (total + value.detach().float(), count + 1)

    def batch_sum(self, loss):
        return loss.sum() / self.batch_per_gpu

    def accumulate(self, ddp_net, slots):
        """Yield (slot, context) per accumulation round; gradients sync across ranks on the last one."""
        for r, slot in enumerate(slots):
            last = r == len(slots) - 1
            yield slot, contextlib.nullcontext() if last or self.world == 1 else ddp_net.no_sync()

    def fake_score_step(self, slots):
        """Fake score network + discriminator update: L_psi on generated images (SPEC §3), plus L_D
        between real and generated images (SPEC §4) for SiDA, in one backward."""
        a, s, sd = self.args, self.sampler, self.teacher.sigma_data
        self.fake_score.train().requires_grad_(True)
        if self.force_norm:
            self.fake_score.normalize_weights_()
        for slot, sync_ctx in self.accumulate(self.fake_score_ddp, slots):
            with sync_ctx:
                if self.adversarial or s.labels is not None:
                    x_real, c = s.real(slot, self.batch_gpu)          # one data batch: images and labels
                else:
                    x_real, c = None, s.labels_only(slot, self.batch_gpu)
                z = s.noise(slot, self.batch_gpu)
                with torch.no_grad(), self.autocast():
                    x_g = one_step(self.G_eval_fn, z, a.init_sigma, c, self.no_aug(self.batch_gpu)).float()
                sigma = (torch.randn(self.batch_gpu, 1, 1, 1, generator=slot.gen, device=self.device)
                         * self.p_std + self.p_mean).exp()
                n = s.noise(slot, self.batch_gpu)
                aug = self.no_aug(self.batch_gpu)
                if self.use_aug:
                    x_g, aug = augment(x_g, a.augment, slot.gen)
                with self.autocast():
                    out = self.fake_train_fn(x_g + sigma * n, sigma, c, aug, **self.fake_kw)
                denoised, logit_fake = out[0].float(), out[1].float()
                loss_psi = denoising_loss(denoised, x_g, sigma, sd, out[2].float() if self.use_logvar else None)
                ok = finite_samples(loss_psi, logit_fake)
                if self.adversarial:
                    aug_real = self.no_aug(self.batch_gpu)
                    if self.use_aug:
                        x_real, aug_real = augment(x_real, a.augment, slot.gen)
                    with self.autocast():
                        logit_real = self.discriminate_fn(x_real + sigma * n, sigma, c, aug_real).float()
                    ok &= finite_samples(logit_real)
                    loss_d = discriminator_loss(logit_real, logit_fake, edm_weight(sigma, sd), ok)
                    self.record('loss_disc', loss_d.mean())
                loss_psi = keep(loss_psi, ok)
                loss = self.batch_sum(loss_psi) * a.ls
                if self.adversarial:
                    loss = loss + self.batch_sum(loss_d) * a.lsd
                self.record('loss_fake_score', loss_psi.mean())
                self.record('dropped_fake', (~ok).sum())
                self.scaler_f.scale(loss).backward()
        self.optimizer_step(self.opt_f, self.scaler_f, self.fake_score, self.clip_fake_grads)

    def generator_step(self, slots, use_adv):
        """Generator update: the SiD loss (SPEC §2), plus the adversarial loss (SPEC §4) once use_adv,
        in one backward; gradients flow through the frozen teacher and fake score network into G."""
        a, s = self.args, self.sampler
        self.fake_score.eval().requires_grad_(False)
        self.G.train()
        if self.force_norm:
            self.G.normalize_weights_()
        all_bad = torch.ones((), dtype=torch.bool, device=self.device)
        for slot, sync_ctx in self.accumulate(self.G_ddp, slots):
            with sync_ctx:
                c = s.labels_only(slot, self.batch_gpu)
                z = s.noise(slot, self.batch_gpu)
                t = torch.rand(self.batch_gpu, 1, 1, 1, generator=slot.gen, device=self.device) * (a.tmax / 1000)
                sigma = sid_sigma(t)
                eps = s.noise(slot, self.batch_gpu)
                with self.autocast():   # call signatures shared with the fake score step: see the compile note
                    x_g = one_step(self.G_fn, z, a.init_sigma, c, self.no_aug(self.batch_gpu), return_logits=True)[0].float()
                    x_t = x_g + sigma * eps
                    out = self.teacher_fn(x_t, sigma, c, self.no_aug(self.batch_gpu), **self.fake_kw)
                    d_real = out[0].float()
                    out = self.fake_fn(x_t, sigma, c, self.no_aug(self.batch_gpu), **self.fake_kw)
                d_fake, logit_g = out[0].float(), out[1].float()
                ok = finite_samples(x_g, d_real, d_fake, logit_g)
                all_bad &= ~ok.any()
                # EDM2: the generator terms are divided by exp(u) of the fake score network (SPEC §3).
                scale = torch.exp(-out[2].detach().float()) if self.use_logvar else 1.0
                loss_sid = keep(sid_generator_loss(x_g, d_real, d_fake, a.alpha) * scale, ok)
                loss = self.batch_sum(loss_sid) * a.lsg
                if use_adv:
                    loss_adv = adversarial_loss(logit_g, x_g, d_real, ok) * scale
                    loss = 0.5 * loss + 0.5 * self.batch_sum(loss_adv) * a.lsg_gan
                    self.record('loss_adv', loss_adv.mean())
                self.record('loss_sid', loss_sid.mean())
                self.record('dropped_gen', (~ok).sum())
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
        """Generator EMA with half-life `ema` Mimg and ramp-up 0.05 (SPEC §4)."""
        halflife = min(self.args.ema * 1e6, nimg * 0.05)
        beta = 0.5 ** (self.args.batch / max(halflife, 1e-8))
        torch._foreach_lerp_(list(self.G_ema.parameters()), list(self.G.parameters()), 1 - beta)


# ----------------------------------------------------------------------------------------------------
# Training state: everything needed to continue bit-identically.

RUN_FLAGS = ('method', 'cond', 'alpha', 'tmax', 'init_sigma', 'batch', 'lr', 'glr', 'ls', 'lsg', 'lsd', 'lsg_gan',
             'ema', 'dropout', 'augment', 'p_mean', 'p_std', 'logvar', 'force_norm', 'gen_start_kimg', 'adv_start_kimg',
             'precision', 'seed', 'arch')                 # a resumed run must keep these
SESSION_FLAGS = ('teacher', 'init_generator', 'data', 'duration', 'batch_gpu', 'tick', 'snap', 'dump', 'metrics',
                 'ref', 'detector', 'vae', 'compile', 'max_nonfinite')   # restored when not given again; may change


def save_state(path, sida, slots, nimg, tick, best, args, rank):
    """Gather every rank's random streams on rank 0 and write the training state atomically."""
    rng = {'slots': {s.index: s.gen.get_state() for s in slots}, 'torch': torch.get_rng_state(),
           'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
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
        'teacher_config': sida.teacher.config,
        'nets': {k: v.state_dict() for k, v in nets.items()},
        'opts': {k: v.state_dict() for k, v in opts.items()},
        'scalers': {k: v.state_dict() for k, v in scalers.items()},
        'rng': all_rng,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    networks.atomic_write(path, lambda f: f.write(buf.getvalue()))


def read_state(path, args):
    """Read a training state written by save_state and take its run flags: those given again on the
    command line must agree; the others are restored."""
    if not os.path.isfile(path):
        raise UserError(f'--resume: {path} does not exist')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'--resume: {path} is not a readable training state ({type(e).__name__})') from None
    if not isinstance(state, dict) or state.get('format') != 'sida-training-state':
        raise UserError(f'--resume: {path} is not a sida training state')
    differ = [f'--{k.replace("_", "-")} {v!r} (now {getattr(args, k)!r})' for k, v in state['args'].items()
              if k in args.explicit and v != getattr(args, k)]
    if differ:
        raise UserError(f'--resume: {path} was written with different settings: ' + ', '.join(differ))
    for k, v in {**state['session_args'], **state['args']}.items():
        if k not in args.explicit:
            setattr(args, k, v)
    return state


def restore_state(state, path, teacher, sida, slots, rank, world):
    """Load networks, optimizers and random streams from a state; returns (nimg, tick, best)."""
    if state['teacher_config'] != teacher.config:
        raise UserError(f'--resume: {path} was written for a teacher of another architecture than --teacher')
    nets, opts, scalers = sida.state()
    for k, v in nets.items():
        v.load_state_dict(state['nets'][k])
    for k, v in opts.items():
        v.load_state_dict(state['opts'][k])
    for k, v in scalers.items():
        v.load_state_dict(state['scalers'][k])
    rng = state['rng'][rank] if len(state['rng']) == world else None
    if rng is not None and set(rng['slots']) == {s.index for s in slots}:
        for s in slots:
            s.gen.set_state(rng['slots'][s.index])
        torch.set_rng_state(rng['torch'])
        if rng['cuda'] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng['cuda'])
    else:
        print('warning: resumed with a different GPU/accumulation layout: random streams restart', flush=True)
    return state['nimg'], state['tick'], state['best']

# ----------------------------------------------------------------------------------------------------
# The toy run's teacher.

TOY_TEACHER_KIMG = 100.         # training length of the toy teacher, kimg


def toy_arch(arch, cond):
    """Small networks of each architecture for the toy run and the CPU tests."""
    common = dict(img_resolution=TOY_RES, img_channels=3, label_dim=TOY_CLASSES if cond else 0)
    if arch == 'edm2':
        return {'class_name': 'EDM2Precond', 'kwargs': dict(common, model_channels=32, channel_mult=[1, 2],
                                                            num_blocks=1, attn_resolutions=[8], logvar_channels=32)}
    if arch == 'adm':
        return {'class_name': 'EDMPrecond', 'kwargs': dict(common, model_type='DhariwalUNet', model_channels=32,
                                                           channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])}
    song = dict(model_type='SongUNet', model_channels=24, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8],
                dropout=0.0)
    if arch == 'ncsnpp':
        song.update(embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1, 3, 3, 1])
    return {'class_name': 'EDMPrecond', 'kwargs': dict(common, **song)}


def train_teacher(args, images, labels, device, path):
    """Toy run only: a small EDM teacher trained from scratch with the denoising loss (SPEC §3) on real images."""
    net = networks.build_network(toy_arch(args.arch, labels is not None)).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3, betas=(0.9, 0.99))
    sampler = Sampler(images, labels, net.label_dim, images.shape[1:], device)
    slot = Slot(-1, args.seed, device)
    batch = 128
    steps = int(args.teacher_kimg * 1000 / batch)
    t0 = time.time()
    edm2 = is_edm2(net)
    p_mean, p_std = (-0.4, 1.0) if edm2 else (-1.2, 1.2)
    for step in range(steps):
        if edm2:
            net.normalize_weights_()
        x, c = sampler.real(slot, batch)
        sigma = (torch.randn(batch, 1, 1, 1, generator=slot.gen, device=device) * p_std + p_mean).exp()
        n = sampler.noise(slot, batch)
        out = net(x + sigma * n, sigma, c, **({'return_logvar': True} if edm2 else {}))
        denoised, logvar = out if edm2 else (out, None)
        loss = denoising_loss(denoised, x, sigma, net.sigma_data, logvar).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g['lr'] = 2e-3 * min(1, (step + 1) / 100) * 0.1 ** (step / steps)   # warm-up, then decay
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - min(0.999, (step + 1) / (step + 10)))
        if step % 100 == 0 or step == steps - 1:
            print(f'teacher: step {step + 1}/{steps}, loss {loss.item():.4f}, {time.time() - t0:.0f} s', flush=True)
    networks.save_network(ema, path, kimg=args.teacher_kimg, method='edm-teacher', data='toy')
    print(f'saved the toy teacher to {path}', flush=True)


def toy_teacher_only(args):
    """--teacher-only: train the toy teacher into --outdir/teacher.pt, print its tick-0 figures, stop."""
    if args.data != 'toy':
        raise UserError('--teacher-only trains the toy teacher: use it with --preset toy')
    path = os.path.join(args.outdir, 'teacher.pt')
    if os.path.exists(path):
        raise UserError(f'--teacher-only: {path} exists; not overwriting it (choose another --outdir)')
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    images, labels = toy_images(4096, seed=1)
    start = time.time()
    train_teacher(args, images, labels if args.cond else None, device, path)
    minutes = (time.time() - start) / 60
    teacher = networks.load_network(path, device)
    print(json.dumps({'teacher': path, 'train_minutes': round(minutes, 1), 'sampler_nfe': 2 * TOY_SAMPLER_STEPS - 1,
                      **Evaluator(args, images, (3, TOY_RES, TOY_RES), device).toy_baselines(teacher)}), flush=True)

# ----------------------------------------------------------------------------------------------------
# The distillation loop.

class Evaluator:
    """Metrics and sample grids of the EMA generator, from their own seeds: never the training streams.

    The toy run measures with its own Inception, fid.ToyClassifier (trained on real toy images only):
    `fd` is the Fréchet distance of its penultimate features to those of TOY_REF_IMAGES real images (the
    toy FID, same statistics code), and for a conditional generator `acc` is the fraction of samples the
    classifier assigns to the class they were generated for."""

    def __init__(self, args, images, shape, device):
        self.args, self.device = args, device
        self.metrics = parse_metrics(args.metrics)
        self.detector = self.ref = self.classifier = self.toy_ref = None
        self.vae = networks.load_vae(args.vae, device) if shape[0] == 4 else None    # EDM2: decode latents
        kinds = {kind for _, kind, _ in self.metrics}
        if 'fd' in kinds:
            if args.data != 'toy':
                raise UserError(f'--metrics {args.metrics}: fd is the toy run\'s metric (its classifier knows only '
                                f'the toy images); use --data toy, or fidNk with --ref')
            self.classifier = fid.load_toy_classifier(device=device)
            stats = fid.FeatureStats()
            for chunk in toy_images(TOY_REF_IMAGES, seed=2)[0].split(1000):
                stats.update(fid.run_detector(self.classifier, chunk, device, return_features=True))
            self.toy_ref = stats.mean_cov()
        if 'fid' in kinds:
            if args.ref is None:
                raise UserError('--metrics fid...: pass --ref (reference statistics) or --metrics none')
            self.ref = fid.load_ref(args.ref)
        if kinds & {'fid', 'is'}:
            self.detector = fid.load_detector(args.detector, device)

    def toy_metrics(self, generate, classes, num):
        """{'fd'} of num images generate(seeds) -> uint8 [n, C, H, W], plus {'acc'} when classes(seeds) gives
        the class each image was made for (None: unconditional)."""
        correct = torch.zeros([], dtype=torch.int64, device=self.device)

        def generate_and_classify(seeds):
            images = generate(seeds)
            if classes is not None:
                predicted = fid.run_detector(self.classifier, images, self.device).argmax(dim=1)
                correct.add_((predicted == classes(seeds).to(self.device)).sum())
            return images
        r = fid.generator_metrics(generate_and_classify, num, self.classifier, ref=self.toy_ref, batch=256,
                                  device=self.device, progress=False)
        if classes is None:
            return {'fd': r['fid']}
        if dist.is_initialized():
            dist.all_reduce(correct)               # each rank classified its share of the seeds
        return {'fd': r['fid'], 'acc': int(correct) / num}

    def generator_toy_metrics(self, G, num):
        generate = lambda seeds: fid.generate_images(G, seeds, self.args.init_sigma, self.device)
        shape = (G.img_channels, G.img_resolution, G.img_resolution)
        classes = (lambda seeds: fid.generated_classes(seeds, G.label_dim, shape)) if G.label_dim else None
        return self.toy_metrics(generate, classes, num)

    def toy_baselines(self, teacher):
        """Toy run, tick 0: fd (and acc) of held-out real images and of the teacher's multi-step sampler
        (the floor and the mark to beat)."""
        if self.args.data != 'toy' or self.classifier is None:
            return {}
        num = next(num for _, kind, num in self.metrics if kind == 'fd')
        held_out, held_out_labels = toy_images(num, seed=3)
        data = self.toy_metrics(lambda seeds: held_out[seeds],
                                (lambda seeds: held_out_labels[seeds]) if teacher.label_dim else None, num)
        teacher_ = self.generator_toy_metrics(EDMSampler(teacher, TOY_SAMPLER_STEPS), num)
        return {f'{k}_{who}': round(v, 5) for who, r in (('data', data), ('teacher', teacher_)) for k, v in r.items()}

    def __call__(self, G):
        generate = lambda seeds: fid.generate_images(G, seeds, self.args.init_sigma, self.device, self.vae)
        results = {}
        for name, kind, num in self.metrics:
            if kind == 'fd':
                r = self.generator_toy_metrics(G, num)
                results.update({name: r['fd']}, **({'acc' + name[2:]: r['acc']} if 'acc' in r else {}))
            else:
                r = fid.generator_metrics(generate, num, self.detector, ref=self.ref if kind == 'fid' else None,
                                          batch=max(64, self.args.batch_gpu or 64), device=self.device,
                                          want_is=kind == 'is')
                results[name] = r[kind]
        return results


def distill(args):
    rank, world, device = setup_distributed(args.device)
    master = rank == 0
    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    torch.manual_seed(args.seed * 1_000_003 + rank)        # dropout masks; every other draw is a slot stream
    outdir = args.resume or args.outdir
    state_path = os.path.join(outdir, 'training-state.pt')
    state = read_state(state_path, args) if args.resume else None
    if state is None and os.path.exists(state_path):
        raise UserError(f'--outdir {outdir} already holds a run: continue it with --resume {outdir} '
                        f'or choose another --outdir')
    if master:
        os.makedirs(outdir, exist_ok=True)

    # Batch arithmetic: batch = world_size * batch_gpu * rounds.
    batch_gpu = args.batch_gpu or args.batch // world
    if batch_gpu < 1 or args.batch % (world * batch_gpu) != 0:
        raise UserError(f'--batch {args.batch} is not divisible by world_size * --batch-gpu = {world} * {batch_gpu}')
    rounds = args.batch // (world * batch_gpu)
    if args.method == 'sid2a' and args.init_generator is None:
        raise UserError('--method sid2a needs --init-generator (a distilled SiD generator)')

    # Data and teacher. The toy run makes its images and, unless --teacher is given, trains its teacher.
    images = labels = None
    if args.data == 'toy':
        images, labels = toy_images(4096, seed=1)
        if not args.cond:
            labels = None
        if args.teacher is None:
            args.teacher = os.path.join(outdir, 'teacher.pt')
            if master and not os.path.isfile(args.teacher):
                train_teacher(args, images, labels, device, args.teacher)
            if dist.is_initialized():
                dist.barrier()
    elif args.teacher is None:
        raise UserError('--teacher is required (only the toy run, --data toy, trains its own)')
    teacher = networks.load_network(args.teacher, device)
    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    if args.data not in (None, 'toy'):
        images, labels = load_dataset(args.data, teacher.img_resolution, teacher.img_channels)
    if images is None and args.method != 'sid':
        raise UserError(f'--method {args.method} needs real images for its discriminator: pass --data')
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

    sampler = Sampler(images, labels if teacher.label_dim else None, teacher.label_dim, shape, device)
    sida = SiDA(args, teacher, G_init, sampler, world, batch_gpu, device)
    slots = [Slot(rank * rounds + r, args.seed, device) for r in range(rounds)]
    gen_start = args.gen_start_kimg * 1000 if sida.adversarial else 0
    adv_start = args.adv_start_kimg * 1000 if sida.adversarial else float('inf')
    evaluator = Evaluator(args, images, shape, device)
    nimg, cur_tick, best = 0, 0, None
    if state is not None:
        nimg, cur_tick, best = restore_state(state, state_path, teacher, sida, slots, rank, world)
        log(f'resumed from {state_path} at {nimg / 1000:g} kimg')
    elif master:
        networks.atomic_write(os.path.join(outdir, 'args.json'), lambda f: f.write(json.dumps(vars(args), indent=2).encode()))

    # SIGTERM / SIGINT: finish the iteration, save the state, exit cleanly.
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signum))

    log(f'{args.method}: {args.teacher} -> one-step generator; {world} process(es) x {rounds} round(s) x '
        f'{batch_gpu} images; {sum(p.numel() for p in sida.G.parameters()) / 1e6:.2f}M parameters; {device}')
    total = int(args.duration * 1e6)
    tick_nimg, tick_time, start_time = nimg, time.time(), time.time()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    log_path = os.path.join(outdir, 'log.jsonl')

    def write_row(row, snap):
        """Log one row; at snapshots add the metrics, the sample grid and the generator files."""
        nonlocal best
        if snap:
            if evaluator.metrics:
                row.update({k: round(v, 5) for k, v in evaluator(sida.G_ema).items()})
            if master:
                best = save_snapshot(sida.G_ema, row, best, evaluator, args, outdir, device)
            best = broadcast_object(best, rank)
        if master:
            log(json.dumps(row))
            with open(log_path, 'a') as f:
                f.write(json.dumps(row) + '\n')
            if any(name in row for name, _, _ in evaluator.metrics):
                with open(log_path) as f:
                    plot_metrics([json.loads(line) for line in f if line.strip()], os.path.join(outdir, 'metrics.png'))

    if not args.resume:       # tick 0: the initial generator; in the toy run also the data and the teacher
        write_row({'tick': 0, 'kimg': 0.0, **evaluator.toy_baselines(teacher)}, snap=True)
        tick_time = time.time()
    while True:
        if nimg < total:
            sida.fake_score_step(slots)                      # every iteration from the start
            if nimg >= gen_start:                            # SiDA: after the discriminator warm-up
                sida.generator_step(slots, use_adv=nimg >= adv_start)
                sida.update_ema(nimg + args.batch)
            nimg += args.batch
        done = nimg >= total
        # Ranks agree on a stop request every few iterations (a host sync; free in one process).
        stopping = bool(stop) if world == 1 else (nimg // args.batch % 8 == 0 or done) and any_rank(bool(stop), device)
        if not (done or stopping or nimg >= tick_nimg + args.tick * 1000):
            continue

        # Tick: one log line; at snap ticks samples, a snapshot and metrics; at dump ticks the state.
        cur_tick += 1
        row = {'tick': cur_tick, 'kimg': round(nimg / 1000, 3)}
        for name, (total_, count) in sida.stats.items():
            value = torch.stack([total_, torch.tensor(float(count), device=device)])
            if dist.is_initialized():
                dist.all_reduce(value)
            row[name] = int(value[0]) if name.startswith('dropped') else round(float(value[0] / value[1]), 6)
        sida.stats = {}
        elapsed = time.time() - tick_time
        row['sec_per_kimg'] = round(elapsed / max((nimg - tick_nimg) / 1000, 1e-9), 3)
        row['img_per_s'] = round((nimg - tick_nimg) / max(elapsed, 1e-9), 2)
        row['peak_gb'] = round((torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else peak_rss()) / 2**30, 3)
        row['time_s'] = round(time.time() - start_time, 1)
        write_row(row, snap=cur_tick % args.snap == 0 or done or stopping)
        if float(sida.worst_streak) >= args.max_nonfinite:
            raise UserError(f'no finite generated sample in {args.max_nonfinite} iterations in a row; stopped '
                            f'(the last good state is {state_path}); lower --lr/--glr or check the teacher')
        if cur_tick % args.dump == 0 or done or stopping:
            save_state(state_path, sida, slots, nimg, cur_tick, best, args, rank)
        if done or stopping:
            break
        tick_nimg, tick_time = nimg, time.time()

    if stop:
        log(f'stopped by signal {stop[0]} at {nimg / 1000:g} kimg; continue with --resume {outdir}')
    elif master and args.data == 'toy' and os.path.isfile(log_path):
        with open(log_path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        fds = [r for r in rows if 'fd' in r]
        if fds and 'fd_teacher' in rows[0]:
            log(f'toy run, Fréchet distance in ToyFeatures space ({evaluator.metrics[0][2]} images): '
                f'real data {rows[0]["fd_data"]:.3f}, teacher ({2 * TOY_SAMPLER_STEPS - 1} NFE) '
                f'{rows[0]["fd_teacher"]:.3f}, initial one-step generator {fds[0]["fd"]:.3f}, distilled '
                f'one-step generator {fds[-1]["fd"]:.3f} (best {min(r["fd"] for r in fds):.3f})')
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return {'nimg': nimg, 'best': best, 'outdir': outdir}


def any_rank(flag, device):
    """True on every rank when flag is true on any (a host sync; used at most once per iteration)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t)
    return t.item() > 0


def save_snapshot(G_ema, row, best, evaluator, args, outdir, device):
    """Sample grid and EMA generator at this kimg; generator-best.pt when the main metric improves."""
    tag, metrics = f'{int(row["kimg"]):06d}', evaluator.metrics
    fid.save_grid(fid.generate_images(G_ema, torch.arange(64), args.init_sigma, device, evaluator.vae),
              os.path.join(outdir, f'samples-{tag}.png'))
    meta = dict(kimg=row['kimg'], method=args.method, teacher=str(args.teacher))
    networks.save_network(G_ema, os.path.join(outdir, f'generator-{tag}.pt'), **meta)
    if metrics:
        name, kind, _ = metrics[0]
        value = row[name]
        if best is None or (value > best if kind == 'is' else value < best):
            networks.save_network(G_ema, os.path.join(outdir, 'generator-best.pt'), **meta, **{name: value})
            return value
    return best


def peak_rss():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

# ----------------------------------------------------------------------------------------------------
# Benchmark: full SiDA iterations on randomly initialised networks (no downloads).

PEAK_TFLOPS = {'H100': 989, 'H200': 989, 'A100': 312}     # dense bf16/fp16 tensor-core peaks


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the tensor operations (views excluded) an iteration dispatches: the kernels eager mode launches,
    each costing host time whatever the tensor size."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def bench_config(args):
    """The teacher architecture of --arch at --resolution / --cbase / --cres (official defaults otherwise)."""
    mult = [int(m) for m in args.cres.split(',')]
    common = dict(img_resolution=args.resolution, label_dim=args.label_dim, dropout=args.dropout)
    if args.arch == 'edm2':
        return {'class_name': 'EDM2Precond', 'kwargs': dict(common, img_channels=4, model_channels=args.cbase,
                                                            channel_mult=mult)}
    if args.arch == 'adm':
        return {'class_name': 'EDMPrecond', 'kwargs': dict(common, img_channels=3, model_type='DhariwalUNet',
                                                           model_channels=args.cbase, channel_mult=mult)}
    song = dict(model_type='SongUNet', model_channels=args.cbase, channel_mult=mult, augment_dim=9)
    if args.arch == 'ncsnpp':
        song.update(embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1, 3, 3, 1])
    return {'class_name': 'EDMPrecond', 'kwargs': dict(common, img_channels=3, **song)}


def random_sida(args, world, device):
    """SiDA on a randomly initialised teacher of --arch and 1024 random images (the benchmark's set-up)."""
    torch.manual_seed(args.seed)
    teacher = networks.build_network(bench_config(args)).to(device).eval().requires_grad_(False)
    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    images = torch.randint(0, 256, (1024, *shape), dtype=torch.uint8)
    labels = torch.randint(args.label_dim, (1024,)) if args.label_dim else None
    sampler = Sampler(images, labels, args.label_dim, shape, device)
    return SiDA(args, teacher, teacher, sampler, world, args.batch_gpu, device)


def bench(args):
    _, world, device = setup_distributed(args.device)
    args.batch_gpu = args.batch_gpu or 64
    args.batch = args.batch_gpu * world
    sida = random_sida(args, world, device)
    slots = [Slot(0, args.seed, device)]
    iteration = lambda: (sida.fake_score_step(slots), sida.generator_step(slots, use_adv=sida.adversarial))
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    eager = {'teacher_fn': sida.teacher, 'G_fn': sida.G_ddp, 'G_eval_fn': sida.G, 'fake_train_fn': sida.fake_score_ddp,
             'fake_fn': sida.fake_score, 'discriminate_fn': sida.fake_score.discriminate}
    compiled = {k: getattr(sida, k) for k in eager}
    for k, fn in eager.items():
        setattr(sida, k, fn)
    iteration()                                               # creates the optimizer state
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter, OpCounter() as ops:   # counted eagerly
        iteration()
    flops = counter.get_total_flops()
    for k, fn in compiled.items():
        setattr(sida, k, fn)
    for _ in range(3):                                        # warm-up (and compilation)
        iteration()
    sync()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.bench_iters):
        iteration()
    sync()
    sec = (time.perf_counter() - t0) / args.bench_iters
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    result = {'arch': args.arch, 'resolution': args.resolution, 'batch_gpu': args.batch_gpu, 'precision': args.precision,
              'compile': args.compile, 'device': name, 'img_per_s': round(args.batch_gpu / sec, 2),
              'sec_per_iter': round(sec, 4),
              'peak_gb': round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == 'cuda' else None,
              'gflop_per_iter': round(flops / 1e9, 1), 'eager_ops_per_iter': ops.count,
              'mfu': round(flops / sec / (peak * 1e12), 4) if peak else None}
    print(json.dumps(result), flush=True)
    return result


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    try:
        if args.prepare_latents:
            prepare_latents(*args.prepare_latents, device=args.device or ('cuda' if torch.cuda.is_available() else 'cpu'),
                            vae=args.vae)
        elif args.bench:
            bench(args)
        elif args.teacher_only:
            toy_teacher_only(args)
        else:
            distill(args)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
