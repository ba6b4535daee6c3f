"""The networks of SiDA and how they are loaded and saved.

A teacher, the fake score network and the generator all share one denoiser architecture: EDM's
SongUNet (DDPM++/NCSN++) or DhariwalUNet (ADM) inside EDMPrecond, or EDM2's magnitude-preserving
UNet inside EDM2Precond. SiDA adds no parameters for its discriminator: the logits are the channel
mean of the UNet encoder's last feature map (SiDA paper), available from the same pass as the denoised
image (`net(x, sigma, c, return_logits=True)`) or from the encoder alone (`net.discriminate(...)`).

    net = load_network('edm-cifar10-32x32-uncond-vp')          # official name, URL or file
    denoised, logits = net(x, sigma, class_labels, return_logits=True)
    save_network(net, 'generator.pt', kimg=1000)               # plain data, torch.load(weights_only=True)

Official EDM/EDM2/SiD/SiDA pickles embed Python source that their own loader executes. Ours reads
them with a restricted unpickler that runs nothing from the file: it collects the tensors and the
constructor arguments, builds our module and checks every tensor name and shape.

Contents: errors and downloads; EDM layers; SongUNet and DhariwalUNet; EDM2 layers and UNet;
the two preconditioners; EDM's augmentation; building, saving and loading; EDM2's latent space (the VAE,
the latent dataset of an EDM2 run: LatentData reads it, `python networks.py encode-latents` writes it).
"""

import functools
import hashlib
import http.client
import importlib
import io
import itertools
import json
import math
import os
import pickle
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

# ----------------------------------------------------------------------------------------------------
# Errors, files and downloads.

class UserError(Exception):
    """A problem with the user's input (a file, flag or URL). The message is one line naming it."""


_EDM_TEACHER_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/{}.pkl'
_EDM2_TEACHER_URL = 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions/edm2-img512-{}.pkl'

OFFICIAL_URLS = {  # official teacher name -> URL; EDM2: the post-hoc EMA reconstructions the SiDA paper distils
    **{name: _EDM_TEACHER_URL.format(name) for name in [
        'edm-cifar10-32x32-uncond-vp', 'edm-cifar10-32x32-cond-vp', 'edm-imagenet-64x64-cond-adm',
        'edm-ffhq-64x64-uncond-vp', 'edm-afhqv2-64x64-uncond-vp']},
    **{f'edm2-img512-{size}': _EDM2_TEACHER_URL.format(f'{size}-{snapshot}') for size, snapshot in [
        ('xs', '2147483-0.135'), ('s', '2147483-0.130'), ('m', '2147483-0.100'),
        ('l', '1879048-0.085'), ('xl', '1342177-0.085'), ('xxl', '0939524-0.070')]},
}

# The released one-step generators (README of the official SiD/SiDA code), named
# {method}-{data}[-alpha{alpha}] after the release table's data, method and alpha columns. SiD: alpha
# 1.2 on EDM data, 1.0 on EDM2; SiDA and SiD²A: alpha 1.0, plus a SiD²A with alpha 1.2 per EDM data set.
# The file names disagree with the table twice (the EDM2-XL SiDA file says sid2a, the EDM2-XXL SiD file
# says sida) and the AFHQv2 SiD path says alpha1 where the table says 1.2; no EDM2-XXL SiD²A is released.
_SID = 'https://huggingface.co/UT-Austin-PML/SiD/resolve/main/'
_SIDA = 'https://huggingface.co/UT-Austin-PML/SiDA/resolve/main/EDM_distillation/'
_SIDA_EDM2 = 'https://huggingface.co/UT-Austin-PML/SiDA/resolve/main/EDM2_distillation/'

RELEASED_URLS = {  # released generator name -> URL
    'sid-cifar10-uncond':            _SID + 'cifar10-uncond/alpha1.2/network-snapshot-1.200000-403968.pkl',
    'sida-cifar10-uncond':           _SIDA + 'cifar10_uncond_sida_alpha1-217920.pkl',
    'sid2a-cifar10-uncond':          _SIDA + 'cifar10_uncond_sid2a_alpha1-028160.pkl',
    'sid2a-cifar10-uncond-alpha1.2': _SIDA + 'cifar10_uncond_sid2a_alpha1.2-022528.pkl',
    'sid-cifar10-cond':              _SID + 'cifar10-cond/alpha1.2/network-snapshot-1.200000-713312.pkl',
    'sida-cifar10-cond':             _SIDA + 'cifar10_cond_sida_alpha1-293184.pkl',
    'sid2a-cifar10-cond':            _SIDA + 'cifar10_cond_sid2a_alpha1-038912.pkl',
    'sid2a-cifar10-cond-alpha1.2':   _SIDA + 'cifar10_cond_sid2a_alpha1.2-053760.pkl',
    'sid-imagenet64':                _SID + 'imagenet64/alpha1.2/network-snapshot-1.200000-939176.pkl',
    'sida-imagenet64':               _SIDA + 'imgnet64_sida_alpha1-249167.pkl',
    'sid2a-imagenet64':              _SIDA + 'imgnet64_sid2a_alpha1-029499.pkl',
    'sid2a-imagenet64-alpha1.2':     _SIDA + 'imgnet64_sid2a_alpha1.2-021471.pkl',
    'sid-ffhq64':                    _SID + 'ffhq64/alpha1.2/network-snapshot-1.200000-498176.pkl',
    'sida-ffhq64':                   _SIDA + 'ffhq64_sida_alpha1-185856.pkl',
    'sid2a-ffhq64':                  _SIDA + 'ffhq64_sid2a_alpha1-168960.pkl',
    'sid2a-ffhq64-alpha1.2':         _SIDA + 'ffhq64_sid2a_alpha1.2-080896.pkl',
    'sid-afhq64':                    _SID + 'afhq64/alpha1/network-snapshot-1.000000-371712.pkl',
    'sida-afhq64':                   _SIDA + 'afhq64-v2_sida_alpha1-127488.pkl',
    'sid2a-afhq64':                  _SIDA + 'afhq64-v2_sid2a_alpha1-175104.pkl',
    'sid2a-afhq64-alpha1.2':         _SIDA + 'afhq64-v2_sid2a_alpha1.2-175104.pkl',
    'sid-edm2-img512-xs':            _SIDA_EDM2 + 'edm2_img512_xs_sid_alpha1-249360.pkl',
    'sida-edm2-img512-xs':           _SIDA_EDM2 + 'edm2_img512_xs_sida_alpha1-166410.pkl',
    'sid2a-edm2-img512-xs':          _SIDA_EDM2 + 'edm2_img512_xs_sid2a_alpha1-028674.pkl',
    'sid-edm2-img512-s':             _SIDA_EDM2 + 'edm2_img512_s_sid_alpha1-192010.pkl',
    'sida-edm2-img512-s':            _SIDA_EDM2 + 'edm2_img512_s_sida_alpha1-117764.pkl',
    'sid2a-edm2-img512-s':           _SIDA_EDM2 + 'edm2_img512_s_sid2a_alpha1-075268.pkl',
    'sid-edm2-img512-m':             _SIDA_EDM2 + 'edm2_img512_m_sid_alpha1-226830.pkl',
    'sida-edm2-img512-m':            _SIDA_EDM2 + 'edm2_img512_m_sida_alpha1-115716.pkl',
    'sid2a-edm2-img512-m':           _SIDA_EDM2 + 'edm2_img512_m_sid2a_alpha1-044036.pkl',
    'sid-edm2-img512-l':             _SIDA_EDM2 + 'edm2_img512_l_sid_alpha1-203788.pkl',
    'sida-edm2-img512-l':            _SIDA_EDM2 + 'edm2_img512_l_sida_alpha1-166918.pkl',
    'sid2a-edm2-img512-l':           _SIDA_EDM2 + 'edm2_img512_l_sid2a_alpha1-050182.pkl',
    'sid-edm2-img512-xl':            _SIDA_EDM2 + 'edm2_img512_xl_sid_alpha1-234004.pkl',
    'sida-edm2-img512-xl':           _SIDA_EDM2 + 'edm2_img512_xl_sid2a_alpha1-024578.pkl',   # sic: sid2a
    'sid2a-edm2-img512-xl':          _SIDA_EDM2 + 'edm2_img512_xl_sid2a_alpha1-079495.pkl',
    'sid-edm2-img512-xxl':           _SIDA_EDM2 + 'edm2_img512_xxl_sida_alpha1-077932.pkl',   # sic: sida
    'sida-edm2-img512-xxl':          _SIDA_EDM2 + 'edm2_img512_xxl_sida_alpha1-089816.pkl',
}


def one_line(text):
    return ' '.join(str(text).split())


def atomic_write(path, write, replace=True):
    """Create or replace `path` through write(f) on a temporary file in the same folder, fsync'd and
    renamed into place: readers (and a crash) never see a partial file, and a failed write leaves
    the previous file intact. replace=False: never replace a file that appeared at `path` meanwhile (the
    caller checked that none was there before writing for hours): the result is kept under a free name."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            try:
                write(f)
            except RuntimeError as e:   # torch.save reports a failed write (a full disk) as a RuntimeError
                if isinstance(e.__context__, OSError):
                    raise e.__context__ from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)                  # mkstemp creates 0600; the result is an ordinary file
        if replace:
            os.replace(tmp, path)
        elif not _link_new(tmp, path):
            root, ext = os.path.splitext(path)
            kept = next(f'{root}-{n}{ext}' for n in itertools.count(1) if _link_new(tmp, f'{root}-{n}{ext}'))
            raise UserError(f'{path} appeared while this was being written; not overwriting it: the result is {kept}')
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _link_new(tmp, path):
    """Give the file `tmp` the name `path` too, unless that name exists (False). A hard link checks and creates
    in one step; on a file system without hard links, a check, then a rename (tmp is then gone)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:
        if os.path.lexists(path):
            return False
        os.replace(tmp, path)
    return True


def is_zip(path):
    """A zip archive (torch.save, npz), whole or cut short: a cut one has lost its directory at the end, but
    still starts with a zip entry's signature."""
    with open(path, 'rb') as f:
        return zipfile.is_zipfile(path) or f.read(4) == b'PK\x03\x04'


def cached(source, path):
    """For an error about the file open_url gave for `source`: where it was downloaded to, if it was."""
    return '' if os.path.abspath(path) == os.path.abspath(str(source)) else f' (downloaded to {path}: delete it to download again)'


def damaged_member(path):
    """The first entry of the zip archive `path` (torch.save's format) whose bytes fail their CRC, else None (also
    when it is no zip: the loader says what it is). torch.load does not check: a damaged tensor loads as it is."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return None


def open_url(source, cache_dir=None):
    """A local path for `source`: a file path as it is, an http(s) or file:// URL downloaded once into
    the cache ($SIDA_CACHE or ~/.cache/sida). The download is written atomically, so an interrupted
    download never looks cached."""
    source = str(source)
    if not re.match(r'(https?|file)://', source):
        if not os.path.isfile(source):
            raise UserError(f'{source}: a folder, not a file' if os.path.isdir(source) else f'file not found: {source}')
        return source
    cache_dir = cache_dir or os.environ.get('SIDA_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'sida')
    name = os.path.basename(urllib.parse.urlparse(source).path) or 'download'
    path = os.path.join(cache_dir, f'{hashlib.sha256(source.encode()).hexdigest()[:12]}-{name}')
    if os.path.isfile(path):
        return path

    def download(f):
        with urllib.request.urlopen(source, timeout=60) as response:
            total, done = int(response.headers.get('Content-Length') or 0), 0
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                size = f'{done / 2**20:.0f}/{total / 2**20:.0f} MiB' if total else f'{done / 2**20:.0f} MiB'
                print(f'\rdownloading {source}: {size}', end='', file=sys.stderr, flush=True)
            print(file=sys.stderr)

    try:
        atomic_write(path, download)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        reason = getattr(e, 'reason', None) or e
        raise UserError(one_line(f'could not reach {source} ({reason}); '
                                 'download it yourself and pass the local file instead')) from None
    except OSError as e:
        raise UserError(f'cannot write {path} ({e.strerror or e}); set SIDA_CACHE to a writable folder') from None
    return path

# ----------------------------------------------------------------------------------------------------
# EDM layers (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

def fir_filter(taps):
    # The separable 2D filter [1, 1, k, k] of the 1D taps, normalised to unit sum.
    taps = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(taps, taps) / taps.sum() ** 2)[None, None]


def is_box(taps):
    return len(taps) == 2 and taps[0] == taps[1]


def resample(x, mode, f=None, padding=0):
    """Up ('up') or downsampling ('down') by 2 with a separable FIR filter f [1, 1, k, k] of unit sum.
    f=None is the box filter [1,1] (DDPM++, ADM, EDM2): exactly 2x2 average pooling and nearest-neighbour
    repetition, computed so, as depthwise (transposed) convolutions are slow on GPUs."""
    if f is None:
        return F.avg_pool2d(x, 2) if mode == 'down' else F.interpolate(x, scale_factor=2, mode='nearest')
    f = f.to(x.device, x.dtype).tile(x.shape[1], 1, 1, 1)
    if mode == 'down':
        return F.conv2d(x, f, groups=x.shape[1], stride=2, padding=padding)
    # x4: the filter sums to 1 but each output pixel receives a quarter of the taps.
    return F.conv_transpose2d(x, f * 4, groups=x.shape[1], stride=2, padding=padding)


def weight_init(shape, mode, fan_in, fan_out):
    # The initialisations EDM's networks use (Glorot & Bengio 2010; He et al. 2015).
    if mode == 'xavier_uniform':
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_uniform':
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'unknown init mode {mode!r}')


class Linear(nn.Module):
    # Fully connected layer with EDM's initialisation options.
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):
    # 2D convolution with optional FIR up/downsampling by 2, as in EDM (filters from NCSN++, Song et al. 2021).
    def __init__(self,
        in_channels, out_channels,
        kernel,                             # Kernel size; 0 = resampling only, no weights.
        up              = False,            # Upsample by 2 before the convolution.
        down            = False,            # Downsample by 2 before the convolution.
        resample_filter = [1, 1],           # 1D taps of the separable filter: [1,1] box, [1,3,3,1] NCSN++.
        fused_resample  = False,            # Convolve, then downsample, in one padded pass (NCSN++ residual input).
        init_mode       = 'kaiming_normal', # Initialisation (see weight_init).
        init_weight     = 1,                # Scale of the initial weights.
        init_bias       = 0,                # Scale of the initial bias.
    ):
        super().__init__()
        assert not (up and down)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(weight_init(shape, **fans) * init_weight) if kernel else None
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel else None
        self.register_buffer('resample_filter', fir_filter(resample_filter) if up or down else None)
        self.box = is_box(resample_filter)

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f = None if self.box else self.resample_filter
        f_pad = 0 if self.resample_filter is None else (self.resample_filter.shape[-1] - 1) // 2
        if self.fused_resample and w is not None and self.down:
            x = resample(F.conv2d(x, w, padding=w_pad + f_pad), 'down', f)
            return x if b is None else x + b.to(x.dtype).reshape(1, -1, 1, 1)   # in the convolution's dtype
        if self.up:
            x = resample(x, 'up', f, f_pad)
        if self.down:
            x = resample(x, 'down', f, f_pad)
        return x if w is None else F.conv2d(x, w, b, padding=w_pad)


class GroupNorm(nn.Module):
    # Group normalisation (Wu & He 2018) with EDM's rule for narrow layers: at least 4 channels per group.
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        # In x's precision even under autocast (which would run it in fp32): the statistics accumulate in
        # fp32 inside the kernel, and the next convolution needs no cast back.
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def attention(qkv, num_heads, normalize_qkv=False):
    """Multi-head self-attention over pixels: softmax(q k^T / sqrt(c)) v per head. `qkv` is [B, 3C, H, W]
    with its channels laid out as (head, channel, q|k|v), the layout of the EDM and EDM2 weights."""
    B, C3, H, W = qkv.shape
    qkv = qkv.reshape(B, num_heads, C3 // (3 * num_heads), 3, H * W)
    if normalize_qkv:  # EDM2 normalises q, k and v per pixel (cosine attention)
        qkv = normalize(qkv, dim=2)
    # q, k, v [B, heads, HW, c] contiguous (one copy), as the fused attention kernels need them.
    q, k, v = qkv.permute(3, 0, 1, 4, 2).contiguous().unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(-1, -2).reshape(B, C3 // 3, H, W)


def dropout(x, p, training):
    # F.dropout in one operation on every device (CUDA's F.dropout is this; on the CPU it takes four).
    return torch.native_dropout(x, p, True)[0] if training and p > 0 else x


class UNetBlock(nn.Module):
    # Residual block with optional self-attention of DDPM++/NCSN++ (Song et al. 2021) and ADM (Dhariwal & Nichol 2021).
    def __init__(self,
        in_channels, out_channels,
        emb_channels,                       # Width of the noise/label embedding vector.
        up                = False,          # Upsample by 2 at the start (decoder).
        down              = False,          # Downsample by 2 at the start (encoder).
        attention         = False,          # Follow the residual branch with self-attention.
        num_heads         = None,           # Attention heads; None = out_channels // channels_per_head.
        channels_per_head = 64,             # Used when num_heads is None (ADM).
        dropout           = 0,              # Dropout probability before the second convolution.
        skip_scale        = 1,              # Output multiplier; sqrt(1/2) in DDPM++/NCSN++ keeps the variance.
        eps               = 1e-5,           # Group-norm epsilon.
        resample_filter   = [1, 1],         # FIR taps for up/downsampling.
        resample_proj     = False,          # 1x1 convolution on the skip path when resampling (DDPM++).
        adaptive_scale    = True,           # Embedding gives a scale and a shift (ADM) instead of a bias.
        init              = None,           # Initialisation of most layers.
        init_zero         = None,           # Initialisation of the last layer of each branch (near zero).
        init_attn         = None,           # Initialisation of the qkv projection; None = init.
    ):
        super().__init__()
        init, init_zero = init or {}, init_zero or {}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn or init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, params):
        # params: this block's affine(emb) [B, C], computed for all blocks at once (block_embeddings).
        h = self.conv0(F.silu(self.norm0(x)))
        params = params[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(shift + self.norm1(h) * (scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(dropout(h, self.dropout, self.training))
        x = self.rescale(h + (x if self.skip is None else self.skip(x)))
        if self.num_heads:
            x = self.rescale(self.proj(attention(self.qkv(self.norm2(x)), self.num_heads)) + x)
        return x

    def rescale(self, x):
        return x if self.skip_scale == 1 else x * self.skip_scale     # (ADM's 1: no operation)


def block_embeddings(layers, emb):
    """affine(emb) of every UNetBlock among `layers`, in order, from one matrix product over their stacked
    weights: one operation per pass instead of one per block (each block keeps its own Linear)."""
    affines = [layer.affine for layer in layers if isinstance(layer, UNetBlock)]
    weight = torch.cat([a.weight for a in affines]).to(emb.dtype)
    bias = torch.cat([a.bias for a in affines]).to(emb.dtype)
    return iter(F.linear(emb, weight, bias).split([a.out_features for a in affines], dim=1))


class PositionalEmbedding(nn.Module):
    # Sinusoidal embedding of the noise level (Vaswani et al. 2017), as in DDPM++ and ADM.
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        x = torch.outer(x, ((1 / self.max_positions) ** freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    # Random Fourier features of the noise level (Tancik et al. 2020), as in NCSN++.
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


# ----------------------------------------------------------------------------------------------------
# EDM's UNets. Each exposes embed / encode / decode so that the preconditioner can run the encoder
# alone for the SiDA discriminator; forward() is the plain UNet.

class SongUNet(nn.Module):
    # DDPM++ and NCSN++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs"), as reimplemented in EDM.
    def __init__(self,
        img_resolution,                     # Input and output resolution.
        in_channels,                        # Input channels.
        out_channels,                       # Output channels.
        label_dim          = 0,             # Number of classes; 0 = unconditional.
        augment_dim        = 0,             # Width of the augmentation labels; 0 = none.
        model_channels     = 128,           # Channels at multiplier 1.
        channel_mult       = [1, 2, 2, 2],  # Channel multiplier of each resolution level.
        channel_mult_emb   = 4,             # Embedding width = model_channels * this.
        num_blocks         = 4,             # Residual blocks per level.
        attn_resolutions   = [16],          # Resolutions with self-attention.
        dropout            = 0.10,          # Dropout probability inside the residual blocks.
        embedding_type     = 'positional',  # Noise embedding: 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise = 1,             # Noise embedding width = model_channels * this: 1 DDPM++, 2 NCSN++.
        encoder_type       = 'standard',    # 'standard' (DDPM++) or 'residual' (NCSN++).
        decoder_type       = 'standard',    # 'standard': the only one of EDM's trained networks.
        resample_filter    = [1, 1],        # FIR taps: [1,1] DDPM++, [1,3,3,1] NCSN++.
    ):
        super().__init__()
        assert embedding_type in ['fourier', 'positional']
        assert encoder_type in ['standard', 'residual']     # EDM's 'skip' types: in no released network
        assert decoder_type == 'standard'
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=math.sqrt(0.2))
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                     init=init, init_zero=init_zero, init_attn=init_attn)

        # Embedding of noise level, class and augmentation.
        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == 'positional' \
            else FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. 'aux' layers carry the downsampled input image alongside (NCSN++'s residual input).
        self.enc = nn.ModuleDict()
        cout, caux = in_channels, in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, cout, 3, down=True, resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for name, m in self.enc.items() if 'aux' not in name]

        # Decoder: every 'block' takes the matching encoder output concatenated to its input.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block)
            if level == 0:
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, 3, **init_zero)

    def embed(self, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # DDPM++/NCSN++ order: sin before cos
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def encode(self, x, emb):
        """The encoder's feature maps, the skip connections of the decoder; the last is the lowest resolution."""
        skips, aux, params = [], x, block_embeddings(self.enc.values(), emb)
        for name, layer in self.enc.items():
            if name.endswith('aux_residual'):
                x = skips[-1] = aux = (x + layer(aux)) / math.sqrt(2)
            else:
                x = layer(x, next(params)) if isinstance(layer, UNetBlock) else layer(x)
                skips.append(x)
        return skips

    def decode(self, skips, emb):
        skips = list(skips)
        x, params = skips[-1], block_embeddings(self.dec.values(), emb)
        for name, layer in self.dec.items():
            if name.endswith('aux_norm'):                 # the output layers, last
                x = layer(x)
            elif name.endswith('aux_conv'):
                x = layer(F.silu(x))
            else:
                if '_block' in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = layer(x, next(params))
        return x

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.embed(noise_labels, class_labels, augment_labels)
        return self.decode(self.encode(x, emb), emb)


class DhariwalUNet(nn.Module):
    # ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis"), as reimplemented in EDM.
    def __init__(self,
        img_resolution,                     # Input and output resolution.
        in_channels,                        # Input channels.
        out_channels,                       # Output channels.
        label_dim          = 0,             # Number of classes; 0 = unconditional.
        augment_dim        = 0,             # Width of the augmentation labels; 0 = none.
        model_channels     = 192,           # Channels at multiplier 1.
        channel_mult       = [1, 2, 3, 4],  # Channel multiplier of each resolution level.
        channel_mult_emb   = 4,             # Embedding width = model_channels * this.
        num_blocks         = 3,             # Residual blocks per level.
        attn_resolutions   = [32, 16, 8],   # Resolutions with self-attention.
        dropout            = 0.10,          # Dropout probability inside the residual blocks.
    ):
        super().__init__()
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Embedding of noise level, augmentation and class.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal',
                                init_weight=math.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [m.out_channels for m in self.enc.values()]

        # Decoder: every 'block' takes the matching encoder output concatenated to its input.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    def embed(self, noise_labels, class_labels=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels)
        return F.silu(emb)

    def encode(self, x, emb):
        """The encoder's feature maps, the skip connections of the decoder; the last is the lowest resolution."""
        skips, params = [], block_embeddings(self.enc.values(), emb)
        for layer in self.enc.values():
            x = layer(x, next(params)) if isinstance(layer, UNetBlock) else layer(x)
            skips.append(x)
        return skips

    def decode(self, skips, emb):
        skips = list(skips)
        x, params = skips[-1], block_embeddings(self.dec.values(), emb)
        for name, layer in self.dec.items():
            if '_block' in name:
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x, next(params))
        return self.out_conv(F.silu(self.out_norm(x)))

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        emb = self.embed(noise_labels, class_labels, augment_labels)
        return self.decode(self.encode(x, emb), emb)

# ----------------------------------------------------------------------------------------------------
# EDM2 layers (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
# Models"). Every layer preserves the magnitude (root-mean-square) of its input.

def normalize(x, dim=None, eps=1e-4):
    # Rescale to unit root-mean-square over `dim` (all but the first by default); eps keeps 0 finite.
    dim = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = eps + norm * math.sqrt(norm.numel() / x.numel())
    return x / norm.to(x.dtype)


def compute_dtype(device):
    # The dtype the layers compute in: autocast's where it is on, float32 otherwise (inputs are float32).
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else torch.float32


def mp_silu(x):
    # SiLU divided by its output magnitude for unit-normal input.
    return F.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    # Weighted sum (1-t) a + t b rescaled so that unit-magnitude inputs give a unit-magnitude output.
    return torch.lerp(a, b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, dim=1, t=0.5):
    # Concatenation in which a and b contribute (1-t) and t of the output magnitude, whatever their widths.
    na, nb = a.shape[dim], b.shape[dim]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (scale / math.sqrt(na) * (1 - t)), b * (scale / math.sqrt(nb) * t)], dim=dim)


def mp_resample(x, mode='keep', taps=(1, 1)):
    # Up/downsampling by 2 with a normalised separable FIR filter; EDM2 uses the box filter [1,1].
    if mode == 'keep':
        return x
    return resample(x, mode, None if is_box(taps) else fir_filter(taps), (len(taps) - 1) // 2)


class MPFourier(nn.Module):
    # Magnitude-preserving Fourier features: sqrt(2) cos(2 pi (f x + phase)), unit magnitude per channel.
    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer('freqs', 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * math.pi * torch.rand(num_channels))

    def forward(self, x):
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    # Magnitude-preserving convolution (kernel [k, k]) or linear layer (kernel []) with weight normalisation (EDM2).
    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def normalized_weight(self, gain, dtype):
        # The stored weight is renormalised in place by EDM2Precond.normalize_weights_() before a training
        # step (not here: a second training-mode pass in the same step would break autograd).
        # Normalising again in the graph makes the gradient orthogonal to the weight.
        w = normalize(self.weight.to(torch.float32))
        return (w * (gain / math.sqrt(w[0].numel()))).to(dtype)

    def forward(self, x, weights=None, gain=1):
        # weights: unit_weights() of the whole network for this pass (gain 1); without them the layer
        # normalises its own weight, as upstream does in every pass.
        w = self.normalized_weight(gain, x.dtype) if weights is None else weights[self]
        if w.ndim == 2:
            return F.linear(x, w)
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


GAINED_LAYERS = ('emb_linear', 'out_conv')    # EDM2 layers scaled by a learned gain before the cast: not in unit_weights


def _by_fan_in(layers):
    groups = {}
    for layer in layers:
        groups.setdefault(math.prod(layer.weight.shape[1:]), []).append(layer)
    return groups.values()


def _stack(*weights):
    # The weights as the rows of one float32 matrix [sum of out_channels, fan_in].
    return torch.cat([w.flatten(1) for w in weights]).to(torch.float32)


def _unstack(w, layers):
    return [rows.view(layer.weight.shape) for rows, layer in zip(w.split([l.out_channels for l in layers]), layers)]


def _unit_stack(dtype, *weights):
    # normalize(w) / sqrt(fan_in) of the stacked weights, in one division.
    w = _stack(*weights)
    return (w / (torch.linalg.vector_norm(w, dim=1, keepdim=True) + 1e-4 * math.sqrt(w.shape[1]))).to(dtype)


def unit_weights(net, dtype):
    """{layer: normalize(w) / sqrt(fan_in) in `dtype`} for the MPConv layers of `net` (all but GAINED_LAYERS):
    the weight each convolves with, the same values as MPConv.normalized_weight(1, dtype). Layers of equal
    fan-in are normalised as one stack: a handful of operations per pass, where normalising layer by layer
    took ~20 per layer in a pass that trains the weights (forward and backward). In such a pass the stack
    is recomputed for the backward (checkpoint) rather than kept: no float32 copy of the weights is held."""
    layers = [m for name, m in net.named_modules() if isinstance(m, MPConv) and not name.endswith(GAINED_LAYERS)]
    weights = {}
    for group in _by_fan_in(layers):
        params = [layer.weight for layer in group]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            w = torch.utils.checkpoint.checkpoint(_unit_stack, dtype, *params, use_reentrant=False,
                                                  preserve_rng_state=False)
        else:
            w = _unit_stack(dtype, *params)
        weights.update(zip(group, _unstack(w, group)))
    return weights


class MPBlock(nn.Module):
    # EDM2 residual block: encoder blocks pixel-normalise the skip path, decoder blocks take the concatenated skip.
    def __init__(self,
        in_channels, out_channels,
        emb_channels,                       # Width of the embedding vector.
        flavor            = 'enc',          # 'enc' or 'dec'.
        resample_mode     = 'keep',         # 'keep', 'up' or 'down' (by 2, at the start).
        resample_filter   = [1, 1],         # FIR taps for resampling.
        attention         = False,          # Follow the residual branch with self-attention.
        channels_per_head = 64,             # Attention heads = out_channels // this.
        dropout           = 0,              # Dropout probability inside the residual branch.
        res_balance       = 0.3,            # Share of the residual branch in the output (mp_sum).
        attn_balance      = 0.3,            # Share of the attention branch in the output (mp_sum).
        clip_act          = 256,            # Clamp activations to +-clip_act (keeps fp16 finite); None = off.
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.flavor, self.resample_mode, self.resample_filter = flavor, resample_mode, resample_filter
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout, self.res_balance, self.attn_balance, self.clip_act = dropout, res_balance, attn_balance, clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == 'enc' else in_channels, out_channels, [3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, [])
        self.conv_res1 = MPConv(out_channels, out_channels, [3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, [1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, [1, 1]) if self.num_heads else None

    def forward(self, x, modulation, w=None):
        # modulation: 1 + emb_linear(emb, gain=emb_gain) [B, C], computed for all blocks at once (block_modulations);
        # w: the network's unit_weights() for this pass.
        x = mp_resample(x, self.resample_mode, self.resample_filter)
        if self.flavor == 'enc':            # the encoder projects its input first and pixel-normalises it
            x = normalize(x if self.conv_skip is None else self.conv_skip(x, w), dim=1)
        h = self.conv_res0(mp_silu(x), w)
        h = mp_silu(h * modulation.to(h.dtype)[..., None, None])
        h = self.conv_res1(dropout(h, self.dropout, self.training), w)
        if self.flavor == 'dec' and self.conv_skip is not None:   # the decoder projects only the skip path
            x = self.conv_skip(x, w)
        x = mp_sum(x, h, t=self.res_balance)
        if self.num_heads:
            y = attention(self.attn_qkv(x, w), self.num_heads, normalize_qkv=True)
            x = mp_sum(x, self.attn_proj(y, w), t=self.attn_balance)
        if self.clip_act is not None:
            x = F.hardtanh(x, -self.clip_act, self.clip_act)   # clamp, its backward one operation (not five)
        return x


def block_modulations(layers, emb):
    """1 + emb_linear(emb, gain=emb_gain), the per-channel modulation from the embedding, of every MPBlock among
    `layers`, in order, from one matrix product: the stacked weights are normalised per output channel, as each
    layer normalises its own, so the values are the layers' (each block keeps its own MPConv)."""
    blocks = [layer for layer in layers if isinstance(layer, MPBlock)]
    weight = normalize(torch.cat([b.emb_linear.weight for b in blocks]).to(torch.float32))
    gain = torch.cat([b.emb_gain.expand(b.out_channels) for b in blocks])[:, None] / math.sqrt(weight.shape[1])
    return iter((1 + F.linear(emb, (weight * gain).to(emb.dtype))).split([b.out_channels for b in blocks], dim=1))


class EDM2UNet(nn.Module):
    # EDM2's magnitude-preserving UNet (Karras et al. 2024, config G), on VAE latents.
    def __init__(self,
        img_resolution,                     # Input and output resolution.
        img_channels,                       # Input and output channels.
        label_dim          = 0,             # Number of classes; 0 = unconditional.
        model_channels     = 192,           # Channels at multiplier 1.
        channel_mult       = [1, 2, 3, 4],  # Channel multiplier of each resolution level.
        channel_mult_noise = None,          # Noise embedding width multiplier; None = channel_mult[0].
        channel_mult_emb   = None,          # Embedding width multiplier; None = max(channel_mult).
        num_blocks         = 3,             # Residual blocks per level.
        attn_resolutions   = [16, 8],       # Resolutions with self-attention.
        label_balance      = 0.5,           # Share of the class embedding in the embedding (mp_sum).
        concat_balance     = 0.5,           # Share of the encoder skip in decoder inputs (mp_cat).
        **block_kwargs,                     # MPBlock arguments: dropout, res_balance, attn_balance, ...
    ):
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, [])
        self.emb_label = MPConv(label_dim, emb_channels, []) if label_dim else None

        # Encoder; the input gets a constant channel of ones so that the first layer can learn a bias.
        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        for level, width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, width
                self.enc[f'{res}x{res}_conv'] = MPConv(cin, cout, [3, 3])
            else:
                self.enc[f'{res}x{res}_down'] = MPBlock(cout, cout, emb_channels, flavor='enc', resample_mode='down',
                                                        **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, width
                self.enc[f'{res}x{res}_block{idx}'] = MPBlock(cin, cout, emb_channels, flavor='enc',
                                                              attention=res in attn_resolutions, **block_kwargs)
        skips = [m.out_channels for m in self.enc.values()]

        # Decoder: every 'block' takes the matching encoder output concatenated to its input.
        self.dec = nn.ModuleDict()
        for level, width in reversed(list(enumerate(widths))):
            res = img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f'{res}x{res}_in0'] = MPBlock(cout, cout, emb_channels, flavor='dec', attention=True,
                                                       **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = MPBlock(cout, cout, emb_channels, flavor='dec', **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = MPBlock(cout, cout, emb_channels, flavor='dec', resample_mode='up',
                                                      **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), width
                self.dec[f'{res}x{res}_block{idx}'] = MPBlock(cin, cout, emb_channels, flavor='dec',
                                                              attention=res in attn_resolutions, **block_kwargs)
        self.out_conv = MPConv(cout, img_channels, [3, 3])

    def embed(self, noise_labels, class_labels=None, w=None):
        emb = self.emb_noise(self.emb_fourier(noise_labels), w)
        if self.emb_label is not None:
            labels = self.emb_label(class_labels * math.sqrt(class_labels.shape[1]), w)
            emb = mp_sum(emb, labels.to(emb.dtype), t=self.label_balance)
        return mp_silu(emb)

    def encode(self, x, emb, w=None):
        """The encoder's feature maps, the skip connections of the decoder; the last is the lowest resolution.
        w: unit_weights() of the network for this pass (the layers normalise their own without it)."""
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips, modulations = [], block_modulations(self.enc.values(), emb)
        for layer in self.enc.values():
            x = layer(x, next(modulations), w) if isinstance(layer, MPBlock) else layer(x, w)
            skips.append(x)
        return skips

    def decode(self, skips, emb, w=None):
        skips = list(skips)
        x, modulations = skips[-1], block_modulations(self.dec.values(), emb)
        for name, layer in self.dec.items():
            if '_block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = layer(x, next(modulations), w)
        return self.out_conv(x, gain=self.out_gain)

    def forward(self, x, noise_labels, class_labels=None):
        w = unit_weights(self, compute_dtype(x.device))
        emb = self.embed(noise_labels, class_labels, w)
        return self.decode(self.encode(x, emb, w), emb, w)

# ----------------------------------------------------------------------------------------------------
# Preconditioners: the denoiser D(x, sigma, c) = c_skip x + c_out F(c_in x, c_noise, c) (EDM, Table 1)
# and the SiDA discriminator on the same preconditioned input (SiDA paper).

def _plain(value):
    # A JSON-able copy: tuples become lists, numpy scalars Python numbers, dict subclasses dicts.
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return value


def _prepare(x, sigma, class_labels, label_dim):
    # Inputs in float32, sigma as [B,1,1,1] whatever its form, labels one-hot [B, label_dim] (zeros if None).
    x = x.to(torch.float32)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
    if sigma.shape[0] == 1:
        sigma = sigma.expand(x.shape[0], 1, 1, 1)
    if not label_dim:
        class_labels = None
    elif class_labels is None:
        class_labels = torch.zeros([x.shape[0], label_dim], device=x.device)
    else:
        class_labels = class_labels.to(torch.float32).reshape(-1, label_dim)
    return x, sigma, class_labels


def _coefficients(sigma, sigma_data):
    # EDM preconditioning (Karras et al. 2022, Table 1).
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_noise = sigma.log().flatten() / 4
    return c_skip, c_out, c_in, c_noise


def _head(t, n):
    # t[:n], but in eager mode t itself when that is all of it: a slice's backward writes its gradient into a
    # zeroed copy. (Compiled, the slice: one graph then serves the calls with and without encoder_only.)
    return t if not torch.compiler.is_compiling() and n == t.shape[0] else t[:n]


def _logits(features):
    # SiDA discriminator: the channel mean of the encoder's lowest-resolution feature map, [B,1,h,w].
    return features.to(torch.float32).mean(dim=1, keepdim=True)


class EDMPrecond(nn.Module):
    # EDM preconditioning (Karras et al. 2022) around SongUNet or DhariwalUNet, with the SiDA discriminator.
    def __init__(self,
        img_resolution,                     # Image resolution.
        img_channels,                       # Image channels.
        label_dim      = 0,                 # Number of classes; 0 = unconditional.
        model_type     = 'SongUNet',        # 'SongUNet' (DDPM++/NCSN++) or 'DhariwalUNet' (ADM).
        sigma_data     = 0.5,               # Standard deviation of the data.
        use_fp16       = False,             # Accepted from official pickles; precision comes from torch.autocast.
        sigma_min      = 0,                 # Accepted from official pickles; unused.
        sigma_max      = float('inf'),      # Accepted from official pickles; unused.
        **model_kwargs,                     # Arguments of the UNet.
    ):
        super().__init__()
        unets = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}
        if model_type not in unets:
            raise ValueError(f'unknown model_type {model_type!r}')
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.sigma_data = label_dim, sigma_data
        # What a training loop needs to know: pixels, no log-variance head, EDM's noise distribution.
        self.latent, self.use_logvar, self.magnitude_preserving = False, False, False
        self.augment_dim = model_kwargs.get('augment_dim', 0)   # width of the augmentation labels (0: none)
        self.P_mean, self.P_std = -1.2, 1.2                     # ln(sigma) of EDM's training (Karras et al. 2022)
        self.model = unets[model_type](img_resolution, img_channels, img_channels, label_dim=label_dim, **model_kwargs)
        self.config = {'class_name': 'EDMPrecond', 'kwargs': _plain(dict(
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
            model_type=model_type, sigma_data=sigma_data, **model_kwargs))}

    def forward(self, x, sigma, class_labels=None, augment_labels=None, return_logits=False, return_logvar=False,
                encoder_only=0):
        """D(x, sigma, c) [and the SiDA logits]. The last `encoder_only` samples pass the encoder alone: the
        logits cover the whole batch, D(x) the others (one pass where SiDA needs both on different images)."""
        if return_logvar:
            raise ValueError('EDM networks have no log-variance head')
        x, sigma, class_labels = _prepare(x, sigma, class_labels, self.label_dim)
        c_skip, c_out, c_in, c_noise = _coefficients(sigma, self.sigma_data)
        emb = self.model.embed(c_noise, class_labels, augment_labels)
        features = self.model.encode(c_in * x, emb)
        n = x.shape[0] - encoder_only
        F_x = self.model.decode([_head(f, n) for f in features], _head(emb, n))
        D_x = _head(c_skip, n) * _head(x, n) + _head(c_out, n) * F_x.to(torch.float32)
        return (D_x, _logits(features[-1])) if return_logits else D_x

    def discriminate(self, x, sigma, class_labels=None, augment_labels=None):
        """SiDA logits [B,1,h,w] from the encoder alone."""
        x, sigma, class_labels = _prepare(x, sigma, class_labels, self.label_dim)
        _, _, c_in, c_noise = _coefficients(sigma, self.sigma_data)
        emb = self.model.embed(c_noise, class_labels, augment_labels)
        return _logits(self.model.encode(c_in * x, emb)[-1])


class EDM2Precond(nn.Module):
    # EDM2 preconditioning (Karras et al. 2024) with the optional log-variance head, and the SiDA discriminator.
    def __init__(self,
        img_resolution,                     # Latent resolution.
        img_channels,                       # Latent channels.
        label_dim           = 0,            # Number of classes; 0 = unconditional.
        sigma_data          = 0.5,          # Standard deviation of the data.
        logvar_channels     = 128,          # Width of the log-variance head's Fourier features.
        use_logvar          = True,         # Keep the log-variance head (teachers, fake score); False for generators.
        force_normalization = True,         # The official switch, kept in the config; sida.py's --force-norm decides.
        use_fp16            = False,        # Accepted from official pickles; precision comes from torch.autocast.
        **unet_kwargs,                      # Arguments of EDM2UNet and MPBlock.
    ):
        super().__init__()
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.sigma_data = label_dim, sigma_data
        # What a training loop needs to know. EDM2 works on the 4 channels of the Stable Diffusion VAE's
        # latents (the toy run uses the same network on pixels); EDM2's noise distribution (Karras et al. 2024).
        self.latent, self.use_logvar, self.magnitude_preserving = img_channels == 4, use_logvar, True
        self.augment_dim = 0
        self.P_mean, self.P_std = -0.4, 1.0
        self.unet = EDM2UNet(img_resolution, img_channels, label_dim, **unet_kwargs)
        if use_logvar:
            # The uncertainty u(sigma) of EDM2's loss weighting (Karras et al. 2024, the learned log-variance).
            self.logvar_fourier = MPFourier(logvar_channels)
            self.logvar_linear = MPConv(logvar_channels, 1, [])
        self.keeps_weights, self._kept = False, None   # keep_weights(): keep the normalised weights between passes
        self.config = {'class_name': 'EDM2Precond', 'kwargs': _plain(dict(
            img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, sigma_data=sigma_data,
            logvar_channels=logvar_channels, use_logvar=use_logvar, force_normalization=force_normalization, **unet_kwargs))}

    def forward(self, x, sigma, class_labels=None, augment_labels=None, return_logits=False, return_logvar=False,
                encoder_only=0):
        """As EDMPrecond.forward, and u(sigma) of the samples with D(x). augment_labels is accepted for a
        uniform call signature and ignored: EDM2 has no augmentation input."""
        x, sigma, class_labels = _prepare(x, sigma, class_labels, self.label_dim)
        c_skip, c_out, c_in, c_noise = _coefficients(sigma, self.sigma_data)
        w = self.weights(compute_dtype(x.device))
        emb = self.unet.embed(c_noise, class_labels, w)
        features = self.unet.encode(c_in * x, emb, w)
        n = x.shape[0] - encoder_only
        F_x = self.unet.decode([_head(f, n) for f in features], _head(emb, n), w)
        D_x = _head(c_skip, n) * _head(x, n) + _head(c_out, n) * F_x.to(torch.float32)
        outputs = [D_x]
        if return_logits:
            outputs.append(_logits(features[-1]))
        if return_logvar:
            if not self.use_logvar:
                raise ValueError('this network has no log-variance head (use_logvar=False)')
            outputs.append(self.logvar_linear(self.logvar_fourier(_head(c_noise, n)), w).to(torch.float32).reshape(-1, 1, 1, 1))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def discriminate(self, x, sigma, class_labels=None, augment_labels=None):
        """SiDA logits [B,1,h,w] from the encoder alone."""
        x, sigma, class_labels = _prepare(x, sigma, class_labels, self.label_dim)
        _, _, c_in, c_noise = _coefficients(sigma, self.sigma_data)
        w = self.weights(compute_dtype(x.device))
        return _logits(self.unet.encode(c_in * x, self.unet.embed(c_noise, class_labels, w), w)[-1])

    def weights(self, dtype):
        """unit_weights() of this network for a pass in `dtype`. After keep_weights() it keeps them while its
        stored weights (an in-place change bumps their _version) stay, outside passes that train them."""
        params = [p for name, p in self.named_parameters() if name.endswith('.weight')]
        trained = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if torch.compiler.is_compiling() or not self.keeps_weights or trained:   # (compiling first: no guard on the flag)
            return unit_weights(self, dtype)
        key = (dtype, version_key(params))
        if self._kept is None or self._kept[0] != key:
            self._kept = (key, unit_weights(self, dtype))
        return self._kept[1]

    @torch.no_grad()
    def normalize_weights_(self):
        """Forced weight normalisation (EDM2, Sec. 2.3): rescale every stored weight in place to unit
        root-mean-square per output channel, so the effective learning rate does not decay as the
        weights grow. sida.py calls it on G before each generator step (--force-norm).
        Layers of equal fan-in are normalised as one stack."""
        for group in _by_fan_in([m for m in self.modules() if isinstance(m, MPConv)]):
            params = [layer.weight for layer in group]
            torch._foreach_copy_(params, _unstack(normalize(_stack(*params)), group))

# ----------------------------------------------------------------------------------------------------
# EDM's augmentation, whose 9 labels the EDM networks take as augment_labels (map_augment). SiDA applies
# it on the fake-score side (sida.py); draws and their application are separate functions, so given
# parameters can be checked against EDM.

# Karras et al. 2022, App. F.2: the geometric part of StyleGAN2-ADA's pipeline (Karras et al. 2020, App. B).
AUG_SCALE_STD = 0.2        # std of log2 of the isotropic and anisotropic scale factors
AUG_TRANSLATE_STD = 0.125  # std of the translation, as a fraction of the image size
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
SYM6_MARGIN = len(SYM6) // 4   # border (pixels at 1x) warped around the image for the low-pass filter
_sym6_on = {}                  # the filter per (device, dtype): a fresh copy to the GPU would synchronise


def draw_augment(batch, p, gen, device):
    """Per-sample draws of EDM's AugmentPipe(p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
    translate_frac=1): a dict of [batch] tensors, 0 where a transform is not applied."""
    rand = lambda *shape: torch.rand(*shape, batch, generator=gen, device=device)
    randn = lambda *shape: torch.randn(*shape, batch, generator=gen, device=device)
    bit = lambda: torch.randint(2, (batch,), generator=gen, device=device).float()
    angle = lambda: (rand() * 2 - 1) * math.pi
    gate = lambda v, prob: torch.where(rand() < prob, v, torch.zeros_like(v))
    xflip = bit()                          # eligible at any p (EDM's probability multiplier 1e8)
    yflip = gate(bit(), p)
    scale_w = gate(randn(), p)             # raw normal draws: the labels carry w, the factors are 2^(0.2 w)
    rot = gate(angle(), p)
    aniso_w = gate(randn(), p)
    aniso_r = gate(angle(), 0.5)           # the anisotropy's frame is rotated half of the time
    tx, ty = gate(randn(2), p)             # one gate for both translation components
    return dict(xflip=xflip, yflip=yflip, scale_w=scale_w, rot=rot, aniso_w=aniso_w, aniso_r=aniso_r,
                tx=tx, ty=ty)


def augment_labels(params):
    """The labels EDM's networks were trained with: [xflip, yflip, scale_w, cos rot - 1, sin rot,
    aniso_w cos r, aniso_w sin r, tx, ty]."""
    P = params
    return torch.stack([P['xflip'], P['yflip'], P['scale_w'], P['rot'].cos() - 1, P['rot'].sin(),
                        P['aniso_w'] * P['aniso_r'].cos(), P['aniso_w'] * P['aniso_r'].sin(), P['tx'], P['ty']], 1)


def affine(rows, like):
    """3x3 matrices [B, 3, 3] from two rows of [B] tensors or numbers; the third row is (0, 0, 1)."""
    values = [v for row in rows + [[0, 0, 1]] for v in row]
    filled = {v: torch.full_like(like, v) for v in {v for v in values if not torch.is_tensor(v)}}   # one per number
    return torch.stack([v if torch.is_tensor(v) else filled[v] for v in values], -1).view(-1, 3, 3)


def scale2d(sx, sy, like):
    return affine([[sx, 0, 0], [0, sy, 0]], like)


def rotate2d(theta):
    return affine([[theta.cos(), -theta.sin(), 0], [theta.sin(), theta.cos(), 0]], theta)


def translate2d(tx, ty, like):
    return affine([[1, 0, tx], [0, 1, ty]], like)


def augment_matrix(params, height, width):
    """G_inv: centred output pixel coordinates -> input pixel coordinates, EDM's product in EDM's order
    (isotropic scale, rotation, anisotropic scale in a frame rotated by r, translation)."""
    P = params
    s, a = 2 ** (AUG_SCALE_STD * P['scale_w']), 2 ** (AUG_SCALE_STD * P['aniso_w'])
    r = P['aniso_r']
    return (scale2d(1 / s, 1 / s, s) @ rotate2d(P['rot'])
            @ rotate2d(-r) @ scale2d(1 / a, a, a) @ rotate2d(r)
            @ translate2d(-AUG_TRANSLATE_STD * width * P['tx'], -AUG_TRANSLATE_STD * height * P['ty'], s))


def sym6(x):
    key = (x.device, x.dtype)
    if key not in _sym6_on:
        _sym6_on[key] = torch.tensor(SYM6, device=x.device, dtype=x.dtype)
    return _sym6_on[key]


def upsample2x(x):
    """Zero-stuffing then the sym6 low-pass, separably; a stride-2 transposed convolution does both at once."""
    C, f = x.shape[1], sym6(x)
    pad = len(SYM6) // 2 - 1               # keeps 2n outputs, pixel i at 2i: up then down is the identity
    x = F.conv_transpose2d(x, f.view(1, 1, 1, -1).expand(C, 1, 1, -1), stride=(1, 2), padding=(0, pad), groups=C)
    return F.conv_transpose2d(x, f.view(1, 1, -1, 1).expand(C, 1, -1, 1), stride=(2, 1), padding=(pad, 0), groups=C)


def downsample2x(x):
    """The sym6 low-pass then every other pixel, separably (the adjoint of upsample2x)."""
    C, f = x.shape[1], sym6(x)
    pad = len(SYM6) // 2 - 1
    x = F.conv2d(x, f.view(1, 1, 1, -1).expand(C, 1, 1, -1), stride=(1, 2), padding=(0, pad), groups=C)
    return F.conv2d(x, f.view(1, 1, -1, 1).expand(C, 1, -1, 1), stride=(2, 1), padding=(pad, 0), groups=C)


def warp(x, G_inv):
    """Resample x [B, C, H, W] through G_inv as EDM does: reflect-pad, 2x sym6 upsampling, bilinear
    grid_sample at 2x (zeros outside, align_corners=False), sym6 low-pass and 2x downsampling, crop."""
    B, C, H, W = x.shape
    # EDM pads by what the batch's transformed corners need (plus the filters' reach), clamped to size - 1,
    # the most reflect padding allows. Always padding that most never reads the corners back to the host
    # and gives EDM's pixels to ~1e-5: the extra reflected image is reached only by the filters' tails
    # under strong zoom-outs (where EDM lets zeros in), and the larger grid changes float32 rounding.
    Hp, Wp = 3 * H - 2, 3 * W - 2
    x = upsample2x(F.pad(x, [W - 1, W - 1, H - 1, H - 1], mode='reflect'))
    Ho, Wo = H + 2 * SYM6_MARGIN, W + 2 * SYM6_MARGIN
    like = G_inv[:, 0, 0]
    # EDM's warps pivot on the point a quarter pixel up and left of the centre (it conjugates its
    # 2x-resolution matrix by a half-pixel shift), so G_inv acts on coordinates shifted by 1/4.
    G_inv = translate2d(-0.25, -0.25, like) @ G_inv @ translate2d(0.25, 0.25, like)
    # grid_sample's [-1, 1] is a centred pixel coordinate over half the size (align_corners=False); the
    # 2x factors of the upsampled input and of the output cancel, so sizes at 1x are used.
    theta = scale2d(2 / Wp, 2 / Hp, like) @ G_inv @ scale2d(Wo / 2, Ho / 2, like)
    grid = F.affine_grid(theta[:, :2], [B, C, 2 * Ho, 2 * Wo], align_corners=False)
    x = downsample2x(F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False))
    return x[:, :, SYM6_MARGIN:-SYM6_MARGIN, SYM6_MARGIN:-SYM6_MARGIN]


def apply_augment(x, params, geometric=True):
    """EDM's augmentation of fp32 images x [B, C, H, W] with given parameters (draw_augment's dict);
    returns (images, labels [B, 9]). Flips are exact pixel copies; with `geometric` the whole batch is
    warped, so an untransformed sample also carries the resampling error (~1e-6), as in EDM."""
    flip = lambda bit: bit.view(-1, 1, 1, 1) > 0
    x = torch.where(flip(params['xflip']), x.flip(3), x)
    x = torch.where(flip(params['yflip']), x.flip(2), x)
    if geometric:
        x = warp(x, augment_matrix(params, x.shape[2], x.shape[3]))
    return x, augment_labels(params)


def augment(x, p, gen):
    """EDM's augmentation with probability p; returns (x, 9-dim labels). Nothing is resampled at p = 0."""
    return apply_augment(x, draw_augment(x.shape[0], p, gen, x.device), geometric=p > 0)

# ----------------------------------------------------------------------------------------------------
# Building, saving and loading.

def version_key(tensors):
    """Changes whenever one of `tensors` is replaced or changed in place (which bumps its _version), and between
    inference mode and outside it (a copy made in inference mode could not serve autograd): the key under which
    something computed from frozen weights is kept."""
    return torch.is_inference_mode_enabled(), *[(t.data_ptr(), t._version) for t in tensors]


def cast_parameters(net, dtype):
    """{name: parameter} with every floating-point parameter of `net` in `dtype`, made by one cast of all of
    them at once (each keeps its shape and memory layout; gradients flow back), for torch.func.functional_call.
    Autocast instead casts each parameter in each pass: an operation per parameter, and another backward."""
    named = [(name, p) for name, p in net.named_parameters() if p.is_floating_point()]
    orders = [sorted(range(p.ndim), key=lambda d: -p.stride(d)) for _, p in named]   # memory order: flatten is a view
    flat = torch.cat([p.permute(order).flatten() for (_, p), order in zip(named, orders)]).to(dtype)
    pieces = flat.split([p.numel() for _, p in named])
    return {name: piece.view([p.shape[d] for d in order]).permute([order.index(d) for d in range(p.ndim)])
            for (name, p), order, piece in zip(named, orders, pieces)}


def keep_weights(net, keep=True):
    """An EDM2 network normalises its weights once for all the passes that do not train them, not in each
    (again after any change to a weight); costs a copy of the weights. keep=False: per pass again, and the
    copy is let go. No effect on EDM networks."""
    for module in net.modules():
        if isinstance(module, EDM2Precond):
            module.keeps_weights, module._kept = keep, module._kept if keep else None
    return net


def freeze(net):
    """net in eval mode without gradients, normalising its EDM2 weights once (keep_weights). Loaded networks
    come frozen."""
    return keep_weights(net).eval().requires_grad_(False)


def build_network(config):
    """A fresh network from `net.config` ({'class_name': ..., 'kwargs': {...}})."""
    classes = {'EDMPrecond': EDMPrecond, 'EDM2Precond': EDM2Precond}
    name = config.get('class_name') if isinstance(config, dict) else None
    if name not in classes:
        raise UserError(f'unknown network class {name!r} (expected one of {", ".join(classes)})')
    return classes[name](**config.get('kwargs', {}))


def save_network(net, path, replace=True, **meta):
    """Write `net` as plain data {'format', 'config', 'state_dict', 'meta'}, atomically (replace: atomic_write's)."""
    while isinstance(net, nn.parallel.DistributedDataParallel) or hasattr(net, '_orig_mod'):  # DDP / torch.compile
        net = net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net._orig_mod
    data = {'format': 'sida-network', 'config': net.config, 'meta': meta,
            'state_dict': {name: t.detach().cpu() for name, t in net.state_dict().items()}}
    atomic_write(path, lambda f: torch.save(data, f), replace)


def safe_pickle_load(file, allowed, **unpickler_kwargs):
    """Unpickle `file` (a path or a binary file object) resolving only the globals in `allowed`:
    a set of 'module.qualname' names, imported as they are, or a dict mapping such names to the
    objects to use instead. Any other global raises UserError naming it and the file."""
    name = file if isinstance(file, (str, os.PathLike)) else getattr(file, 'name', '<pickle>')

    # Python's own unpickler (pickle._Unpickler), whose opcodes can be checked: BUILD sets attributes on
    # (or calls __setstate__ of) the object below it, which must be one the pickle made, never a class or
    # function it was handed, or a file could rewrite them for the whole process.
    class RestrictedUnpickler(pickle._Unpickler):
        dispatch = dict(pickle._Unpickler.dispatch)

        def find_class(self, module, qualname):
            key = f'{module}.{qualname}'
            if key not in allowed:
                raise UserError(f'refusing to load {name}: it needs the global {key}, which is not plain data')
            if isinstance(allowed, dict):
                found = allowed[key]
            else:
                with warnings.catch_warnings():  # numpy 2 warns on its numpy.core aliases
                    warnings.simplefilter('ignore')
                    found = functools.reduce(getattr, qualname.split('.'), importlib.import_module(module))
            self.handed_out.add(id(found))
            return found

        def load_build(self):
            target = self.stack[-2]
            if id(target) in self.handed_out or callable(target):     # classes and functions are callable
                raise UserError(f'refusing to load {name}: it would change {type(target).__name__} '
                                f'{getattr(target, "__qualname__", "")}, which it did not make'.replace('  ', ' '))
            super().load_build()
        dispatch[pickle.BUILD[0]] = load_build

        def load(self):
            self.handed_out = set()
            return super().load()

    try:
        if isinstance(file, (str, os.PathLike)):
            with open(file, 'rb') as f:
                return RestrictedUnpickler(f, **unpickler_kwargs).load()
        return RestrictedUnpickler(file, **unpickler_kwargs).load()
    except UserError:
        raise
    except OSError as e:
        raise UserError(one_line(f'cannot read {name}: {e.strerror or e}')) from None
    except Exception as e:  # whatever a truncated or corrupt pickle raises
        raise UserError(one_line(f'{name} is not a readable pickle (truncated or corrupt?): '
                                 f'{type(e).__name__}: {e}')) from None


class _PersistentObject:
    """What `torch_utils.persistence._reconstruct_persistent_obj(meta)` becomes: its class name and state.
    The embedded source `meta['module_src']` is never executed."""
    def __init__(self, meta):
        meta = meta if isinstance(meta, dict) else {}
        self.class_name, self.state = meta.get('class_name'), meta.get('state')


class _PickledModule:
    """Stand-in for the torch.nn containers (ModuleDict, ...) of official pickles: keeps the pickled __dict__."""
    def __setstate__(self, state):
        self.state = state


class _EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (a dict subclass); read as a plain dict."""


class _DroppedHook:
    """What a forward pre-hook of an official pickle becomes: its name, never called. The EDM2 SiDA
    networks register `_apply_forced_weight_normalization` on every MPConv; ours normalise themselves."""
    def __init__(self, name):
        self.name = name


def _hook_getattr(path):
    # pickle writes a bound method as builtins.getattr(owner, name). In the EDM2 SiDA pickles the owner is
    # the MPConv being rebuilt: saving the method saves the MPConv again from inside its own state, which
    # pickle resolves one level deep, so the owner is a _PersistentObject we made (its state dict possibly
    # still filling). Accept exactly that shape, call nothing, and keep an inert placeholder.
    def getattr_of_rebuilt_object(owner, name):
        if not isinstance(owner, _PersistentObject) or not isinstance(name, str):
            raise UserError(f'refusing to load {path}: it needs the global builtins.getattr, which is not plain data')
        return _DroppedHook(name)
    return getattr_of_rebuilt_object


def _storage_from_bytes(data):
    # torch.storage._load_from_bytes: the bytes are a legacy torch.save stream of one storage.
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # TypedStorage deprecation
        return torch.load(io.BytesIO(data), weights_only=True)


def numpy_pickle_globals():
    """The globals a pickle of plain numpy arrays and scalars names (numpy 1.x writers say numpy.core,
    numpy 2.x numpy._core), checked so that sizes come from the file's data: numpy's own pickles make an
    array as an empty shell that BUILD fills, and a scalar from its bytes."""
    np_core = np._core if hasattr(np, '_core') else np.core

    def array_shell(cls, shape, dtype):
        if cls is not np.ndarray or tuple(shape) != (0,):
            raise ValueError('a numpy array not made as numpy pickles arrays')
        return np_core.multiarray._reconstruct(cls, shape, dtype)

    def scalar(dtype, data=None):
        if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes) or len(data) != dtype.itemsize:
            raise ValueError('a numpy scalar not made from its bytes')
        return np_core.multiarray.scalar(dtype, data)

    allowed = {'numpy.ndarray': np.ndarray, 'numpy.dtype': np.dtype}
    for core in ('numpy.core', 'numpy._core'):
        allowed.update({f'{core}.multiarray._reconstruct': array_shell, f'{core}.multiarray.scalar': scalar,
                        f'{core}.numeric._frombuffer': np_core.numeric._frombuffer})     # protocol 5 arrays
    return allowed


def _official_globals(path):
    # Everything the EDM/EDM2/SiD/SiDA pickles need, and nothing that runs code from the file.
    allowed = {
        'torch_utils.persistence._reconstruct_persistent_obj': _PersistentObject,
        'builtins.getattr': _hook_getattr(path),   # only for hooks of the objects above
        'dnnlib.util.EasyDict': _EasyDict,
        'collections.OrderedDict': OrderedDict,
        'builtins.set': set,
        'torch._utils._rebuild_tensor_v2': torch._utils._rebuild_tensor_v2,
        'torch._utils._rebuild_parameter': torch._utils._rebuild_parameter,
        'torch.storage._load_from_bytes': _storage_from_bytes,
        **numpy_pickle_globals(),
    }
    for container in ('ModuleDict', 'ModuleList', 'Sequential', 'ParameterDict', 'ParameterList'):
        allowed[f'torch.nn.modules.container.{container}'] = _PickledModule
    return allowed


# Official class name -> (our class, the official constructor's positional parameters).
_EDM_ARGS = ['img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_min', 'sigma_max', 'sigma_data', 'model_type']
_EDM2_ARGS = ['img_resolution', 'img_channels', 'label_dim', 'use_fp16', 'sigma_data', 'logvar_channels']
_OFFICIAL_CLASSES = {
    'EDMPrecond':                   ('EDMPrecond', _EDM_ARGS),
    'EDMPrecond_EncoderDecoder':    ('EDMPrecond', _EDM_ARGS),   # SiD / SiDA
    'Precond':                      ('EDM2Precond', _EDM2_ARGS),
    'EDM_2_Precond_EncoderDecoder': ('EDM2Precond', _EDM2_ARGS), # SiDA fake score network (with log-variance head)
    'EDM_2_Precond_Generator':      ('EDM2Precond', _EDM2_ARGS), # SiDA generator (no log-variance head)
}


def _collect_tensors(obj, path, prefix=''):
    # The parameters and persistent buffers of a pickled module tree, named as in its state_dict.
    state = obj.state if isinstance(obj, (_PersistentObject, _PickledModule)) else None
    if not isinstance(state, dict):
        raise UserError(f'{path}: {prefix.rstrip(".") or "the network"} is not a pickled torch module')
    tensors = {}
    transient = state.get('_non_persistent_buffers_set') or set()
    for kind in ('_parameters', '_buffers'):
        for name, t in (state.get(kind) or {}).items():
            if t is None or (kind == '_buffers' and name in transient):
                continue
            if not isinstance(t, torch.Tensor):
                raise UserError(f'{path}: {prefix}{name} is not a tensor')
            tensors[prefix + name] = t
    for name, child in (state.get('_modules') or {}).items():
        if child is not None:
            tensors.update(_collect_tensors(child, path, f'{prefix}{name}.'))
    return tensors


def _fill(net, tensors, path):
    # Load `tensors` into `net` (built on the meta device) with strict name and shape checks.
    expected = net.state_dict()
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    def listing(names):
        return ', '.join(names[:8]) + (f' and {len(names) - 8} more' if len(names) > 8 else '')
    if missing or unexpected:
        problems = [f'missing {listing(missing)}'] if missing else []
        problems += [f'unexpected {listing(unexpected)}'] if unexpected else []
        raise UserError(f'{path}: the tensors do not match {net.config["class_name"]}: {"; ".join(problems)}')
    not_tensors = [k for k, t in tensors.items() if not isinstance(t, torch.Tensor)]
    if not_tensors:
        raise UserError(f'{path}: state_dict entries that are not tensors: {listing(not_tensors)}')
    wrong = [f'{k} {list(tensors[k].shape)} (expected {list(expected[k].shape)})'
             for k in expected if tensors[k].shape != expected[k].shape]
    if wrong:
        raise UserError(f'{path}: tensors of the wrong shape: {listing(wrong)}')
    short = [k for k, t in tensors.items() if t.numel() * t.element_size() > t.untyped_storage().nbytes()]
    if short:
        raise UserError(f'{path}: tensors larger than their data in the file: {listing(short)}')
    tensors = {k: t.detach().to(torch.float32) if t.is_floating_point() else t.detach() for k, t in tensors.items()}
    net.load_state_dict(tensors, strict=True, assign=True)
    return net


def _build_on_meta(class_name, kwargs, path):
    # Building on the meta device allocates nothing; the loaded tensors are then assigned.
    try:
        with torch.device('meta'):
            return build_network({'class_name': class_name, 'kwargs': kwargs})
    except UserError as e:
        raise UserError(f'{path}: {e}') from None
    except (TypeError, ValueError, AssertionError) as e:
        raise UserError(one_line(f'{path}: unsupported network arguments {kwargs} ({e})')) from None


def _few_values(value, path, limit=10_000):
    # Constructor arguments are a few numbers, strings and short lists; a pickle can share one list many times
    # over (memoised), which copying would expand exponentially, or make it contain itself.
    count, stack = 0, [value]
    while stack:
        v = stack.pop()
        count += 1
        if count > limit:
            raise UserError(f'{path}: network arguments of more than {limit} values (or a cycle)')
        stack.extend(v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else ())
    return value


def _load_official_pickle(path):
    data = safe_pickle_load(path, _official_globals(path))
    obj = data.get('ema') if isinstance(data, dict) else data
    if not isinstance(obj, _PersistentObject) or not isinstance(obj.state, dict):
        raise UserError(f'{path}: no network found (expected a pickled dict with an "ema" network)')
    if obj.class_name not in _OFFICIAL_CLASSES:
        raise UserError(f'{path}: unsupported network class {obj.class_name!r} (supported: {", ".join(_OFFICIAL_CLASSES)})')
    class_name, positional = _OFFICIAL_CLASSES[obj.class_name]
    init_args, init_kwargs = _few_values((obj.state.get('_init_args') or (), obj.state.get('_init_kwargs') or {}), path)
    kwargs = {**dict(zip(positional, init_args)), **_plain(dict(init_kwargs))}
    kwargs.pop('use_gan', None)  # SiDA's switch for its discriminator, which is always on here
    tensors = _collect_tensors(obj, path)
    if class_name == 'EDMPrecond':
        kwargs.pop('force_normalization', None)
        # The SiD/SiDA subclasses only add return options to EDM's UNets; the parameters are the same.
        kwargs['model_type'] = kwargs.get('model_type', 'DhariwalUNet').removesuffix('_EncoderDecoder')
    else:
        kwargs['use_logvar'] = 'logvar_linear.weight' in tensors  # distilled generators have no head
    kwargs.pop('use_fp16', None)
    return _fill(_build_on_meta(class_name, kwargs, path), tensors, path)


def _load_sida_file(path):
    damaged = damaged_member(path)
    if damaged:
        raise UserError(f'{path} is damaged: its {damaged} fails its checksum')
    try:
        with warnings.catch_warnings():       # torch warns of a TorchScript file before refusing it: one line only
            warnings.simplefilter('ignore')
            data = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r'(?:unsupported|Unsupported global:) GLOBAL ([\w.]+)', str(e))
        what = f'the global {found.group(1)}' if found else 'objects'
        raise UserError(f'refusing to load {path}: it contains {what}, which is not plain data') from None
    except Exception as e:
        raise UserError(one_line(f'{path} is not a readable network file (truncated or corrupt?): '
                                 f'{type(e).__name__}: {e}')) from None
    if not isinstance(data, dict) or data.get('format') != 'sida-network':
        raise UserError(f'{path}: not a network file written by save_network')
    config = data.get('config') if isinstance(data.get('config'), dict) else {}
    net = _build_on_meta(config.get('class_name'), config.get('kwargs', {}), path)
    net = _fill(net, data.get('state_dict') or {}, path)
    net.meta = data.get('meta') or {}
    return net


def check_network_source(source, flag=None):
    """source as a string if it can name a network (a file, URL or known name); refused before any download."""
    source = str(source)
    if not re.match(r'(https?|file)://', source) and not os.path.exists(source) and '/' not in source \
            and source not in OFFICIAL_URLS and source not in RELEASED_URLS:
        raise UserError(f'{flag + " " if flag else ""}{source}: no such file, nor a known network name '
                        f'(python fid.py names lists them)')
    return source


def load_network(source, device='cpu'):
    """A network from a file, URL, official teacher name (OFFICIAL_URLS) or released generator name
    (RELEASED_URLS): our own files written by save_network, or official EDM/EDM2/SiD/SiDA pickles.
    Returned in eval mode without gradients; `net.meta` holds the file's metadata ({} for official pickles)."""
    source = check_network_source(source)
    path = open_url(OFFICIAL_URLS.get(source) or RELEASED_URLS.get(source) or source)
    try:
        if is_zip(path):  # torch.save archive
            net = _load_sida_file(path)
        else:
            net = _load_official_pickle(path)
            net.meta = {}
    except UserError:
        raise
    except Exception as e:    # arguments or state of a kind no real network file has
        raise UserError(one_line(f'{source}: not a network this loader can read ({type(e).__name__}: {e})')[:400]) from None
    return freeze(net).to(device)

# ----------------------------------------------------------------------------------------------------
# EDM2's latent space: the Stable Diffusion VAE, through diffusers, imported only on this path. EDM2 feeds
# it pixels in [0, 1] (uint8 / 255) and reads decoded images back as clamp(0, 1) * 255; its latent
# statistics below were computed that way, so [-1, 1] pixels would put every latent off its scale.

VAE_NAME = 'stabilityai/sd-vae-ft-mse'
LATENT_MEAN = (5.81, 3.25, 0.12, -2.15)     # statistics of the raw VAE latents of ImageNet 512 (EDM2)
LATENT_STD = (4.17, 4.62, 3.71, 3.28)
LATENT_FINAL_STD = 0.5                      # the normalised latents have this standard deviation
VAE_BATCH = 8                               # images per VAE call: a 512x512 decode holds ~1 GB per image in fp32


def load_vae(source=VAE_NAME, device='cpu'):
    """diffusers.AutoencoderKL from a hub name or a local folder, in eval mode without gradients."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError('EDM2 latents need the Stable Diffusion VAE through diffusers: pip install diffusers') from None
    try:
        vae = AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False)   # (True wants `accelerate`, or warns)
    except Exception as e:
        raise UserError(f'could not load the VAE {source} ({type(e).__name__}); download it once with internet '
                        f'or pass a local folder') from None
    return vae.eval().requires_grad_(False).to(device)


def _latent_stats(x):
    shape = (1, -1, 1, 1)
    mean = torch.tensor(LATENT_MEAN, device=x.device).view(shape)
    std = torch.tensor(LATENT_STD, device=x.device).view(shape)
    return mean, std


def normalize_latents(raw):
    """Raw VAE latents -> the network's space: (raw - mean) * final_std / std (EDM2)."""
    mean, std = _latent_stats(raw)
    return (raw - mean) * (LATENT_FINAL_STD / std)


def denormalize_latents(x):
    mean, std = _latent_stats(x)
    return x * (std / LATENT_FINAL_STD) + mean


@torch.no_grad()
def encode_images(vae, images):
    """uint8 images [N, 3, H, W] -> float32 [N, 8, H/8, W/8]: the VAE posterior's mean and std, as EDM2
    stores them, of the pixels scaled to [0, 1]."""
    x = images.to(next(vae.parameters()).device, torch.float32) / 255
    posteriors = [vae.encode(part).latent_dist for part in x.split(VAE_BATCH)]
    return torch.cat([torch.cat([p.mean, p.std], dim=1) for p in posteriors]).float()


@torch.no_grad()
def decode_latents(vae, x):
    """Normalised latents [N, 4, h, w] -> uint8 images [N, 3, 8h, 8w], as EDM2 converts them:
    clamp(0, 1) * 255, truncated to an integer."""
    raw = denormalize_latents(x.float()).to(next(vae.parameters()).device)
    images = torch.cat([vae.decode(part).sample for part in raw.split(VAE_BATCH)])
    return (images.float().clamp(0, 1) * 255).to(torch.uint8)


class LatentData:
    """EDM2's latent dataset: a zip of per-image .npy files holding the Stable Diffusion VAE's posterior
    mean and std (8 x 64 x 64 for ImageNet 512) and EDM's dataset.json labels. ImageNet's latents do not
    fit in memory, so they are read from the zip on demand."""

    def __init__(self, path):
        self.path = path
        try:
            self.zip = zipfile.ZipFile(path)
        except (OSError, zipfile.BadZipFile) as e:
            raise UserError(f'--data {path}: not an EDM2 latent zip ({type(e).__name__})') from None
        self.names = sorted(n for n in self.zip.namelist() if n.endswith('.npy'))
        self.shape = None
        first = self._read(self.names[0]) if self.names else None
        if first is None or first.ndim != 3 or first.shape[0] % 2:
            raise UserError(f'--data {path}: expected .npy files of the VAE mean and std [2C, H, W]')
        self.shape = (first.shape[0] // 2, *first.shape[1:])
        self.labels = None
        if 'dataset.json' in self.zip.namelist():
            import fid                          # fid.py reads dataset.json (and imports this file)
            labels = fid.parse_labels(self.zip.read('dataset.json'), self.names, f'--data {path}')
            self.labels = None if labels is None else torch.from_numpy(labels)

    def __len__(self):
        return len(self.names)

    def __getitem__(self, idx):
        """Mean and std of the latents of the given indices: float32 [n, 2C, H, W]."""
        return torch.from_numpy(np.stack([self._read(self.names[i]) for i in idx.tolist()])).float()

    def _read(self, name):
        """One file's mean and std, of the shape of the first file's (once that is known)."""
        try:
            array = np.load(io.BytesIO(self.zip.read(name)))       # (no pickles: np.load refuses them)
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
            raise UserError(f'--data {self.path}: {name} is not a readable .npy file ({type(e).__name__})') from None
        if self.shape is not None and array.shape != (2 * self.shape[0], *self.shape[1:]):
            raise UserError(f'--data {self.path}: {name} is not of the shape of the first latents, {list(self.shape)} x 2')
        return array


def encode_dataset(src, dest, device='cpu', vae=VAE_NAME):
    """Encode a dataset of 512x512 images (an EDM-style zip or folder, e.g. from EDM2's dataset_tool.py
    convert) into an EDM2 latent zip: one .npy of the VAE posterior's mean and std per image, and the
    labels in dataset.json. Written atomically; an existing DEST is never overwritten."""
    import fid                                  # fid.py reads datasets (and imports this file)
    if os.path.exists(dest):
        raise UserError(f'encode-latents: {dest} exists; not overwriting it')
    if not os.path.exists(src):                 # before the VAE, which may be a download
        raise UserError(f'encode-latents: {src}: no such file or folder')
    vae = load_vae(vae, device=device)
    dataset = fid.ImageDataset(src)

    def write(f):
        labels = {}
        with zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED) as z:
            index = 0
            for images, batch_labels in fid.iterate_images(dataset, batch=32):
                for mean_std, label in zip(encode_images(vae, images).cpu().numpy(), batch_labels.tolist()):
                    name = f'{index // 1000:05d}/img{index:08d}.npy'
                    buf = io.BytesIO()
                    np.save(buf, mean_std)
                    z.writestr(name, buf.getvalue())
                    if label >= 0:
                        labels[name] = label
                    index += 1
                print(f'encoded {index}/{len(dataset)} images', flush=True)
            z.writestr('dataset.json', json.dumps({'labels': [[k, v] for k, v in labels.items()] or None}))

    atomic_write(dest, write, replace=False)
    print(f'wrote {dest}')


def main(argv=None):
    """python networks.py encode-latents IMAGES LATENTS.zip: the EDM2 latent dataset of sida.py --data."""
    import argparse
    p = argparse.ArgumentParser(description='Prepare an EDM2 latent dataset (ImageNet 512) for sida.py --data.')
    sub = p.add_subparsers(dest='command', required=True)
    e = sub.add_parser('encode-latents', help='encode 512x512 images (zip or folder) with the Stable Diffusion VAE')
    e.add_argument('src', help='EDM-style zip or folder of 512x512 images with dataset.json labels')
    e.add_argument('dest', help='the latent zip to write (must not exist)')
    e.add_argument('--vae', default=VAE_NAME, help='hub name or local folder of the VAE (default: %(default)s)')
    e.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    args = p.parse_args(argv)
    try:
        encode_dataset(args.src, args.dest, args.device or ('cuda' if torch.cuda.is_available() else 'cpu'), args.vae)
    except UserError as err:
        print(f'error: {err}', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    import networks                             # the module fid.py imports, so that its UserError is this one
    networks.main()
