"""Inception statistics, FID and Inception Score, computed the way EDM and StyleGAN compute them.

Statistics of a dataset (a folder of PNG/JPG, an EDM zip, or the CIFAR-10 python tarball):
    python fid.py ref  --data cifar-10-python.tar.gz --dest cifar10-32x32.npz
FID of a folder or zip of images against reference statistics (an npz or EDM2's img512.pkl, path,
URL or name):
    python fid.py calc --images samples/ --ref cifar10-32x32
FID of a one-step generator (ours, or a released one by name), no PNGs written unless --outdir is given;
--is adds the Inception Score (on by default for the releases whose paper reports it, CIFAR-10):
    python fid.py gen  --network sida-cifar10-uncond --ref cifar10-32x32 --num 50000
The official protocol, 10 trials of 50,000 images (seeds 0-499999): each trial, then mean, std, min, max:
    python fid.py gen  --network sida-cifar10-uncond --ref cifar10-32x32 --trials 10
Images and a grid of them (samples-grid.png) from any generator (EDM2 latent generators: decoded by the VAE):
    python fid.py gen  --network sida-edm2-img512-xs --seeds 0-63 --outdir samples/
The names of the released generators and reference statistics, with the paper's FIDs:
    python fid.py names                     (or python fid.py --list)
Several GPUs (images are split across ranks, statistics summed with all_reduce); spell --num as
--num-images there, since torchrun mistakes --num for its own --numa-binding:
    torchrun --standalone --nproc_per_node=8 fid.py gen --network ... --ref ... --num-images 50000

Names, the Inception detector and reference statistics are downloaded once into the cache ($SIDA_CACHE
or ~/.cache/sida; `--detector PATH|URL` points elsewhere, e.g. a local copy when offline). The detector
is the TorchScript Inception network used by StyleGAN2-ADA and EDM. It takes uint8-valued images
[N, 3, H, W] in 0..255 and resizes them to 299x299 itself. FID follows EDM: float64 running sums,
unbiased covariance, and the real part of scipy's matrix square root. IS follows StyleGAN: class
probabilities with the output bias left out, 10 splits.

Contents: distributed helpers; the detector; statistics and distances; reading images; measuring; one-step
generation and sample grids; a run's metrics.png; the command line.
"""

import argparse
import collections
import contextlib
import gzip
import io
import json
import math
import os
import re
import sys
import tarfile
import time
import warnings
import zipfile
import zlib

import numpy as np
import PIL.Image
import PIL.ImageDraw
import scipy.linalg
import scipy.special
import torch
import torch.distributed as dist
import torch.nn.functional as F

import networks
from networks import UserError

INCEPTION_URL = 'https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt'
SIGMA_INIT = 2.5            # noise level the one-step generator starts from (SiD, SiDA)
IS_SPLITS = 10              # Inception Score: mean and std over this many splits (StyleGAN, Salimans et al.)
PROGRESS_SECONDS = 10       # at most one progress line this often in a log file
PROGRESS_SECONDS_TTY = 0.5  # redraw the progress bar this often on a terminal
GRID_IMAGES = 64            # sample grids: the first this many seeds (8 x 8)
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
MAX_IMAGES = 10 ** 8        # gen: at most this many images (2000 x FID-50k); a list of that many --seeds is a few GB
MAX_WORKERS = 64            # --workers: more image-reading processes than this only exhaust the machine

# Reference statistics of the training sets, by name (EDM's npz files; EDM2's img512.pkl).
REF_URLS = {
    **{name: f'https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/{name}.npz'
       for name in ['cifar10-32x32', 'imagenet-64x64', 'ffhq-64x64', 'afhqv2-64x64']},
    'img512': 'https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl',
}

# What the papers report for each data set of the released generators (networks.RELEASED_URLS, named
# {method}-{data}[-alpha1.2]): the reference statistics, FID-50k of SiD (SiD paper, alpha 1.2) and the
# best FID-50k of SiDA / SiD²A (SiDA paper and official README; one figure per data set, not per
# release), and whether the papers' tables also give the Inception Score.
PAPER = {  # data: (reference, SiD FID, best SiDA/SiD²A FID, IS reported)
    'cifar10-uncond':  ('cifar10-32x32',  1.923, 1.499, True),
    'cifar10-cond':    ('cifar10-32x32',  1.710, 1.396, True),
    'imagenet64':      ('imagenet-64x64', 1.524, 1.110, False),
    'ffhq64':          ('ffhq-64x64',     1.550, 1.040, False),
    'afhq64':          ('afhqv2-64x64',   1.628, 1.276, False),
    'edm2-img512-xs':  ('img512',         None,  2.156, False),
    'edm2-img512-s':   ('img512',         None,  1.669, False),
    'edm2-img512-m':   ('img512',         None,  1.488, False),
    'edm2-img512-l':   ('img512',         None,  1.413, False),
    'edm2-img512-xl':  ('img512',         None,  1.379, False),
    'edm2-img512-xxl': ('img512',         None,  1.366, False),
}

# Globals a pickle of plain numpy arrays may name (EDM2's img512.pkl, the CIFAR-10 batches).
NUMPY_PICKLE_GLOBALS = networks.numpy_pickle_globals()

# ----------------------------------------------------------------------------------------------------
# Distributed helpers: everything below works the same in one process and under torchrun.

def init_distributed(device=None):
    """(rank, world size, device) from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), with the
    process group started: NCCL on GPUs, gloo on the CPU. A plain process is rank 0 of 1."""
    device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if not device.startswith(('cuda', 'cpu')) or (device.startswith('cuda') and not torch.cuda.is_available()):
        raise UserError(f'--device {device}: not available here (use cpu, or cuda on a machine with a GPU)')
    device = torch.device(device)
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ and not dist.is_initialized():
        if device.type == 'cuda':
            device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
            torch.cuda.set_device(device)
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank(), world_size(), device


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def broadcast_object(obj):
    """Rank 0's obj on every rank (a plain process: obj)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def _comm_device():
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def _all_gather_interleaved(local, total):
    """Rank r holds items r, r + W, r + 2W, ... of `total`; every rank gets all of them, in order."""
    W = world_size()
    if W == 1:
        return local
    per_rank = -(-total // W)
    padded = local.new_zeros([per_rank, *local.shape[1:]]).to(_comm_device())
    padded[:len(local)] = local.to(padded.device)
    parts = [torch.empty_like(padded) for _ in range(W)]
    dist.all_gather(parts, padded)
    out = local.new_empty([total, *local.shape[1:]])
    for r, part in enumerate(parts):
        out[r::W] = part[:len(range(r, total, W))].to(out.device)
    return out


def format_duration(seconds):
    seconds = int(max(seconds, 0))
    return (f'{seconds // 86400}d {seconds % 86400 // 3600:02d}h' if seconds >= 86400 else
            f'{seconds // 3600}h {seconds % 3600 // 60:02d}m' if seconds >= 3600 else f'{seconds // 60}m {seconds % 60:02d}s')


class Progress:
    """A progress bar on stderr (rank 0): images done / total, throughput and time left (ETA). Redrawn
    in place on a terminal; in a log file, one line every PROGRESS_SECONDS and one at the end."""
    line_open = False     # a bar is drawn on the terminal's last line: a message must start a new one

    def __init__(self, what, total, enabled=True, width=30):
        self.what, self.total, self.done, self.width = what, total, 0, width
        self.enabled = enabled and rank() == 0
        self.tty = sys.stderr.isatty()
        self.interval = PROGRESS_SECONDS_TTY if self.tty else PROGRESS_SECONDS
        self.start = self.last = time.time()
        self.shown = False

    def update(self, n_local):
        self.done = min(self.total, self.done + n_local * world_size())
        now = time.time()
        finished = self.done == self.total
        due = now - self.last >= self.interval
        if not self.enabled or not (due or (finished and self.shown)):   # short work stays quiet
            return
        elapsed = now - self.start
        rate = self.done / max(elapsed, 1e-9)
        filled = self.width * self.done // max(self.total, 1)
        left = f'took {format_duration(elapsed)}' if finished else f'ETA {format_duration((self.total - self.done) / max(rate, 1e-9))}'
        line = (f'{self.what} [{"#" * filled}{"." * (self.width - filled)}] {self.done}/{self.total} images '
                f'({100 * self.done // max(self.total, 1)}%), {rate:.0f} img/s, {left}')
        end = '\n' if finished or not self.tty else ''
        print(f'\r{line}' if self.tty else line, end=end, file=sys.stderr, flush=True)
        self.last, self.shown = now, True
        Progress.line_open = not end

# ----------------------------------------------------------------------------------------------------
# Feature extractors: the Inception detector.

def load_detector(source=None, device='cpu'):
    """The TorchScript Inception network (source None: the official URL, cached). Call it as
    det(images, return_features=True) -> [N, 2048] features, det(images, no_output_bias=True) -> [N, 1008]
    class probabilities, with images uint8 [N, 3, H, W]."""
    source = source or INCEPTION_URL
    path = networks.open_url(source)
    try:
        with warnings.catch_warnings():     # TorchScript is deprecated, but it is the format the detector ships in
            warnings.filterwarnings('ignore', message='`torch.jit')     # a DeprecationWarning, a FutureWarning in torch 2.14
            detector = torch.jit.load(path, map_location=device)
    except Exception as e:
        raise UserError(f'--detector {source}: not a TorchScript detector ({type(e).__name__})'
                        f'{networks.cached(source, path)}') from None
    return detector.eval()


def run_detector(detector, images, device, **kwargs):
    """Detector output for uint8 images [N, C, H, W] (grayscale is repeated to 3 channels)."""
    images = torch.as_tensor(images).to(device)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(f'images must be [N, 1 or 3, H, W], got {list(images.shape)}')
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    with torch.no_grad():
        return detector(images, **kwargs)


# ----------------------------------------------------------------------------------------------------
# Statistics and distances.

class FeatureStats:
    """Mean and covariance of features, streamed: float64 running sums of the features and of their
    outer products, so 50k x 2048 features are never held. all_reduce() sums them over ranks."""

    def __init__(self, dim=None):
        self.dim, self.num = dim, 0
        self.sum = self.sum_outer = None

    def _allocate(self, device):
        self.sum = torch.zeros([self.dim], dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros([self.dim, self.dim], dtype=torch.float64, device=device)

    def update(self, features):
        f = torch.as_tensor(features).to(torch.float64).flatten(1)
        if self.dim is None:
            self.dim = f.shape[1]
        if f.shape[1] != self.dim:
            raise UserError(f'features are {f.shape[1]}-dimensional, statistics expect {self.dim}')
        if self.sum is None:
            self._allocate(f.device)
        f = f.to(self.sum.device)
        self.num += f.shape[0]
        self.sum += f.sum(dim=0)
        self.sum_outer += f.T @ f

    def all_reduce(self):
        if world_size() == 1:
            return self
        device = _comm_device()
        dim = torch.tensor([self.dim or 0], device=device)
        dist.all_reduce(dim, op=dist.ReduceOp.MAX)       # a rank that saw no images learns the size
        self.dim = int(dim)
        if self.sum is None:
            self._allocate(device)
        num = torch.tensor([self.num], dtype=torch.int64, device=device)
        self.sum, self.sum_outer = self.sum.to(device), self.sum_outer.to(device)
        for t in (num, self.sum, self.sum_outer):
            dist.all_reduce(t)
        self.num = int(num)
        return self

    def mean_cov(self):
        """(mu [D], sigma [D, D]) as numpy float64; sigma is the unbiased covariance (divides by N - 1)."""
        if self.num < 2:
            raise UserError(f'statistics need at least 2 images, got {self.num}')
        n = self.num
        mu = self.sum / n
        sigma = (self.sum_outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), real part (Heusel et al. 2017)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise UserError(f'statistics of different sizes: mu {list(mu1.shape)}, sigma {list(sigma1.shape)} '
                        f'vs mu {list(mu2.shape)}, sigma {list(sigma2.shape)}')
    with warnings.catch_warnings():     # singular covariances (fewer images than dimensions) are normal here
        warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    distance = np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean)
    return float(np.real(distance))


def inception_score(probs, splits=IS_SPLITS):
    """(mean, std) over `splits` consecutive splits of exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016).
    Takes class probabilities, which is what the Inception detector returns; rows that are not
    probabilities (logits) go through a softmax first."""
    p = np.asarray(torch.as_tensor(probs).cpu().to(torch.float64))
    if p.ndim != 2 or len(p) < splits:
        raise UserError(f'Inception Score needs at least {splits} images, got {len(p)}')
    if p.min() < 0 or not np.allclose(p.sum(axis=1), 1, atol=1e-3):
        p = scipy.special.softmax(p, axis=1)
    n = len(p)
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        kl = scipy.special.rel_entr(part, part.mean(axis=0, keepdims=True)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def load_ref(source):
    """(mu, sigma) as float64 numpy from EDM's reference npz (`mu`, `sigma`) or EDM2's img512.pkl
    (a plain pickle {'fid': {'mu', 'sigma'}, ...}, read with the restricted unpickler); path, URL or
    a name of REF_URLS."""
    source = str(source)
    if source not in REF_URLS and not re.match(r'(https?|file)://', source) and '/' not in source \
            and not os.path.exists(source):
        raise UserError(f'--ref {source}: no such file, nor a known name ({", ".join(REF_URLS)})')
    path = networks.open_url(REF_URLS.get(source, source))
    try:
        if networks.is_zip(path):                                # npz files are zip archives
            try:
                with np.load(path) as data:
                    mu, sigma = data['mu'], data['sigma']
            except (zipfile.BadZipFile, EOFError, zlib.error) as e:
                raise UserError(f'--ref {source}: a damaged npz file (truncated or corrupt?): {type(e).__name__}'
                                f'{networks.cached(source, path)}') from None
        else:
            data = networks.safe_pickle_load(path, NUMPY_PICKLE_GLOBALS)
            data = data['fid'] if isinstance(data, dict) and 'fid' in data else data
            mu, sigma = data['mu'], data['sigma']
    except UserError:
        raise
    except Exception as e:
        reason = f'{type(e).__name__}: {e}'.splitlines()[0]
        raise UserError(f'--ref {source}: not a reference file with mu and sigma ({reason}){networks.cached(source, path)}') from None
    try:
        mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    except (TypeError, ValueError):
        raise UserError(f'--ref {source}: mu and sigma are not arrays of numbers') from None
    if mu.ndim != 1 or sigma.shape != mu.shape * 2:
        raise UserError(f'--ref {source}: mu {list(mu.shape)} and sigma {list(sigma.shape)} are not [D] and [D, D]')
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()) or (np.diag(sigma) < 0).any():
        raise UserError(f'--ref {source}: mu and sigma must be finite and sigma a covariance (non-negative diagonal)')
    return mu, sigma


def save_ref(path, mu, sigma):
    """Write statistics as an npz with `mu` and `sigma`, like EDM's reference files (atomically; a file that
    appeared at `path` meanwhile is not replaced)."""
    networks.atomic_write(path, lambda f: np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64)),
                          replace=False)


def _as_ref(ref):
    if ref is None or isinstance(ref, tuple):
        return ref
    return load_ref(ref)

# ----------------------------------------------------------------------------------------------------
# Reading images: a folder (recursive), an EDM zip of PNGs, or the CIFAR-10 python tarball.

def _decode_image(data, name):
    """uint8 [C, H, W] (C = 1 or 3) from encoded bytes, or an error message (workers must not raise)."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as image:
            if image.mode.startswith(('I', 'F')):         # PIL's conversion to 8 bits would clip, not scale
                return f'{name} is a {image.mode} image (16 or 32 bits per value); FID reads 8-bit images'
            image = image.convert('L' if image.mode in ('1', 'L') else 'RGB')
            array = np.asarray(image)
    except Exception as e:
        return f'cannot read image {name} ({type(e).__name__})'
    return (array[None] if array.ndim == 2 else array.transpose(2, 0, 1)).copy()


def _is_tarball(path):
    try:
        return tarfile.is_tarfile(path)
    except (EOFError, zlib.error, OSError) as e:       # a gzip stream cut in its first block
        raise UserError(f'{path}: damaged tarball ({type(e).__name__})') from None


def _read_cifar10(path):
    """Training images uint8 [50000, 3, 32, 32] and labels of the CIFAR-10 python tarball. Its five
    batches are pickled dicts {b'data': uint8 [10000, 3072], b'labels': [...]}, read without running code."""
    images, labels = [], []
    with tarfile.open(path) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and os.path.basename(m.name).startswith('data_batch_')),
                         key=lambda m: os.path.basename(m.name))
        if not members:
            raise UserError(f'{path}: a tarball without data_batch_* files is not the CIFAR-10 python tarball')
        for member in members:
            batch = networks.safe_pickle_load(tar.extractfile(member), NUMPY_PICKLE_GLOBALS, encoding='bytes')
            try:
                images.append(np.asarray(batch[b'data'], np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(batch[b'labels'], np.int64))
            except (KeyError, TypeError, ValueError):
                raise UserError(f'{path}: {member.name} is not a CIFAR-10 batch') from None
        while tar.fileobj.read(1 << 24):     # a gzip stream checks its CRC at its end, which tarfile stops short of
            pass
    return np.concatenate(images), np.concatenate(labels)


def image_names(folder):
    """The image files below `folder`, relative to it with '/', sorted. Links to folders are followed, each folder
    once: a link to a folder already seen (a loop, `ln -s . again`) would count its images again."""
    names, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        if os.path.realpath(root) in seen:
            dirs[:] = []
            continue
        seen.add(os.path.realpath(root))
        names += [os.path.relpath(os.path.join(root, f), folder).replace(os.sep, '/') for f in files
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(names)


class ImageDataset(torch.utils.data.Dataset):
    """The images of a folder (recursive, sorted by name), an EDM zip or the CIFAR-10 python tarball.
    Item i is (uint8 [C, H, W] or an error message, label or -1). Labels come from EDM's dataset.json
    {"labels": [[relative name, label], ...]} (or the tarball); `labels` is None without them."""

    def __init__(self, path):
        self.path, self.labels, self._zip = path, None, None
        self._arrays = None                               # CIFAR-10: everything decoded in memory
        label_json = None
        if os.path.isdir(path):
            self.kind = 'folder'
            self.names = image_names(path)
            odd = next((n for n in self.names if not os.path.isfile(os.path.join(path, n))), None)
            if odd is not None:                # a pipe named *.png: reading it never ends
                raise UserError(f'{os.path.join(path, odd)}: not a regular file')
            if os.path.isfile(os.path.join(path, 'dataset.json')):
                with open(os.path.join(path, 'dataset.json'), 'rb') as f:
                    label_json = f.read()
        elif not os.path.exists(path):
            raise UserError(f'{path}: no such file or folder')
        elif not os.path.isfile(path):         # a device or a pipe: reading it for a zip's directory never ends
            raise UserError(f'{path}: neither a folder nor a regular file')
        elif zipfile.is_zipfile(path):
            self.kind = 'zip'
            with zipfile.ZipFile(path) as z:
                all_names = set(z.namelist())
                self.names = sorted(n for n in all_names if n.lower().endswith(IMAGE_EXTENSIONS))
                if 'dataset.json' in all_names:
                    label_json = z.read('dataset.json')
        elif _is_tarball(path):
            self.kind = 'cifar10'
            try:
                self._arrays, self.labels = _read_cifar10(path)
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
                raise UserError(f'{path}: damaged tarball ({type(e).__name__})') from None
            self.names = [str(i) for i in range(len(self._arrays))]
        else:
            raise UserError(f'{path}: not a folder of images, a zip or the CIFAR-10 tarball')
        if not self.names:
            raise UserError(f'{path}: no images found (looked for {", ".join(IMAGE_EXTENSIONS)})')
        if label_json is not None:
            self.labels = parse_labels(label_json, self.names, path)
        first = self[0][0]
        if isinstance(first, str):
            raise UserError(f'{path}: {first}')
        self.shape = first.shape                          # (C, H, W): every image must have it

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        label = -1 if self.labels is None else int(self.labels[i])
        if self._arrays is not None:
            return self._arrays[i], label
        if self.kind == 'zip':
            if self._zip is None or self._zip[0] != os.getpid():   # one handle per worker process
                self._zip = (os.getpid(), zipfile.ZipFile(self.path))
            try:
                data = self._zip[1].read(self.names[i])
            except (zipfile.BadZipFile, EOFError, zlib.error) as e:     # (a failed CRC among them)
                return f'cannot read {self.names[i]} in the zip, damaged ({type(e).__name__})', label
        else:
            with open(os.path.join(self.path, self.names[i]), 'rb') as f:
                data = f.read()
        return _decode_image(data, self.names[i]), label

    def __getstate__(self):
        return {**self.__dict__, '_zip': None}


def parse_labels(text, names, where):
    """The labels of `names` (int64 numpy) from EDM's dataset.json {"labels": [[name, label], ...] or null}
    (None for null); `where` names the dataset in errors."""
    try:
        pairs = json.loads(text)
    except ValueError as e:                                   # also a file cut short
        raise UserError(f'{where}: dataset.json is not valid JSON (truncated or corrupt?): {e}') from None
    try:
        table = None if pairs['labels'] is None else dict(pairs['labels'])
    except (KeyError, TypeError, ValueError):
        raise UserError(f'{where}: dataset.json has no "labels" list of [name, label] pairs') from None
    if table is None:
        return None
    missing = [n for n in names if n not in table]
    if missing:
        raise UserError(f'{where}: dataset.json has no label for {missing[0]}')
    labels = [table[n] for n in names]
    if not all(type(v) is int and 0 <= v < 2**63 for v in labels):
        raise UserError(f'{where}: dataset.json has labels that are not integers from 0')
    return np.array(labels, np.int64)


def _keep_list(items):
    return items


def subset(size, num):
    """Indices of `num` of `size` images as EDM picks them (all if num is None): a random subset (seed 0),
    in file order, so a dataset stored class by class is not cut to its first classes."""
    indices = np.arange(size)
    if num is not None and num < size:
        np.random.RandomState(0).shuffle(indices)
        indices = np.sort(indices[:num])
    return indices.tolist()


def iterate_images(source, batch=64, num=None, rank=0, world_size=1, workers=0):
    """Batches (uint8 tensor [b, C, H, W], labels int64 [b], -1 without labels) of `num` images of a
    dataset (path or ImageDataset; `subset`); this rank gets every world_size-th of them from its rank on."""
    dataset = source if isinstance(source, ImageDataset) else ImageDataset(source)
    indices = subset(len(dataset), num)[rank::world_size]
    workers = 0 if dataset._arrays is not None else workers   # already decoded in memory
    batches = [indices[i:i + batch] for i in range(0, len(indices), batch)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=_keep_list,
                                         num_workers=workers, prefetch_factor=4 if workers else None)
    for batch_indices, items in zip(batches, loader):
        for i, (image, _) in zip(batch_indices, items):
            if isinstance(image, str):
                raise UserError(f'{dataset.path}: {image}')
            if image.shape != dataset.shape:
                raise UserError(f'{dataset.path}: {dataset.names[i]} is of shape {image.shape} among images of '
                                f'{dataset.shape}')
        yield (torch.from_numpy(np.stack([image for image, _ in items])),
               torch.tensor([label for _, label in items], dtype=torch.int64))


def load_images(path):
    """All images of a dataset in memory: (uint8 numpy [N, C, H, W], int64 labels [N] or None)."""
    dataset = ImageDataset(path)
    if dataset._arrays is not None:
        return dataset._arrays, dataset.labels
    return torch.cat([x for x, _ in iterate_images(dataset, batch=256)]).numpy(), dataset.labels

# ----------------------------------------------------------------------------------------------------
# Measuring: image batches -> features -> statistics -> FID / IS.

def check_features(detector, images, ref, device, source=None):
    """The detector run once on `images` before the work: a detector that fails on them, or reference statistics
    of another feature size, is one line now, not a traceback after part of the work was written."""
    try:
        dim = run_detector(detector, images, device, return_features=True).shape[1]
    except Exception as e:
        raise UserError(networks.one_line(f'--detector {source or INCEPTION_URL}: fails on images of shape '
                                          f'{list(images.shape[1:])} ({type(e).__name__}: {e})')[:400]) from None
    check_feature_size(dim, ref)


def check_feature_size(dim, ref):
    if ref is not None and dim != len(ref[0]):
        raise UserError(f'--ref statistics are {len(ref[0])}-dimensional but the detector gives {dim}-dimensional features')


def _measure(batches, total, detector, device, ref, want_is, what, progress):
    """Run the detector over this rank's batches, combine ranks, and turn the statistics into metrics."""
    if want_is and total < IS_SPLITS:
        raise UserError(f'Inception Score needs at least {IS_SPLITS} images, got {total}')
    stats, probs = FeatureStats(), []
    meter = Progress(what, total, progress)
    for images in batches:
        features = run_detector(detector, images, device, return_features=True)
        check_feature_size(features.shape[1], ref)                  # fail at the first batch, not the last
        stats.update(features)
        if want_is:
            probs.append(run_detector(detector, images, device, no_output_bias=True).to(torch.float64))
        meter.update(len(images))
    stats.all_reduce()
    mu, sigma = stats.mean_cov()
    results = {}
    if ref is None:
        results.update(mu=mu, sigma=sigma, num=stats.num)
    else:
        results['fid'] = frechet_distance(mu, sigma, *ref)
    if want_is:
        local = torch.cat(probs) if probs else torch.zeros([0, 0], dtype=torch.float64)
        if world_size() > 1:
            width = torch.tensor([local.shape[1]], device=_comm_device())
            dist.all_reduce(width, op=dist.ReduceOp.MAX)
            if local.shape[1] == 0:
                local = torch.zeros([0, int(width)], dtype=torch.float64)
        results['is'], results['is_std'] = inception_score(_all_gather_interleaved(local, total))
    return results


def generator_metrics(generate, num, detector, ref=None, batch=64, device='cpu', want_is=False,
                      seeds=None, progress=True):
    """FID (and IS) of `num` generated images, never more than one batch in memory.
    generate(seeds: int64 [n]) -> uint8 images [n, C, H, W]. Seeds 0..num-1 (or the first num of `seeds`)
    are split across ranks; every rank returns {'fid'} (+ 'is', 'is_std'), or {'mu', 'sigma'} when
    ref is None. ref: (mu, sigma), or a path/URL for load_ref."""
    seeds = torch.arange(num, dtype=torch.int64) if seeds is None else torch.as_tensor(seeds, dtype=torch.int64)
    if len(seeds) < num:
        raise UserError(f'{len(seeds)} seeds given for {num} images')
    ref = _as_ref(ref)
    mine = seeds[:num][rank()::world_size()]
    batches = (generate(s) for s in mine.split(batch) if len(s))      # (a rank may have no seeds)
    return _measure(batches, num, detector, device, ref, want_is, 'generating', progress)


def dataset_metrics(source, detector, num=None, ref=None, batch=64, device='cpu', want_is=False,
                    workers=0, progress=True):
    """Like generator_metrics for `num` images (all if None; `subset`) of a folder, zip or tarball."""
    dataset = source if isinstance(source, ImageDataset) else ImageDataset(source)
    if num is not None and num > len(dataset):
        raise UserError(f'{dataset.path}: {len(dataset)} images, fewer than --num {num}')
    num = len(dataset) if num is None else num
    ref = _as_ref(ref)
    batches = (images for images, _ in iterate_images(dataset, batch, num, rank(), world_size(), workers))
    return _measure(batches, num, detector, device, ref, want_is, 'reading', progress)

# ----------------------------------------------------------------------------------------------------
# One-step generation.

def generate_images(G, seeds, sigma_init=SIGMA_INIT, device=None, vae=None):
    """x = G(sigma_init * z, sigma_init, c) as uint8 [n, C, H, W]. Each image depends on its seed only:
    z ~ N(0, I) is drawn from torch.Generator().manual_seed(seed), and for a conditional G the class
    is the next draw of that generator, randint(label_dim) (so z is the same with or without labels).
    EDM2 latent generators (4 channels) are decoded with `vae` (networks.load_vae)."""
    if device is None:
        device = next(G.parameters()).device
    shape = [G.img_channels, G.img_resolution, G.img_resolution]
    z, classes = [], []
    for seed in torch.as_tensor(seeds).tolist():
        g = torch.Generator().manual_seed(int(seed))
        z.append(torch.randn(shape, generator=g))
        if G.label_dim:
            classes.append(int(torch.randint(G.label_dim, [], generator=g)))
    z = torch.stack(z).to(device)
    labels = F.one_hot(torch.tensor(classes), G.label_dim).to(device, torch.float32) if G.label_dim else None
    with torch.no_grad():
        x = G(sigma_init * z, sigma_init, labels)
    if G.latent:
        if vae is None:
            raise UserError('a latent (4-channel) generator needs the VAE to decode its images: pass --vae')
        return networks.decode_latents(vae, x)
    return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)   # [-1, 1] -> 0..255 (EDM)


def generated_classes(seeds, label_dim, shape):
    """The class generate_images gives each seed: the draw after z from that seed's generator."""
    classes = []
    for seed in torch.as_tensor(seeds).tolist():
        g = torch.Generator().manual_seed(int(seed))
        torch.randn(list(shape), generator=g)
        classes.append(int(torch.randint(label_dim, [], generator=g)))
    return torch.tensor(classes, dtype=torch.int64)


def save_images(images, seeds, outdir):
    """PNG files outdir/{seed:06d}.png, each written atomically; one that another program (a second gen into
    the same folder) wrote meanwhile is kept, and the error names where this one went."""
    for image, seed in zip(images.cpu().numpy(), torch.as_tensor(seeds).tolist()):
        png = PIL.Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
        networks.atomic_write(os.path.join(outdir, f'{seed:06d}.png'), lambda f: png.save(f, format='PNG'),
                              replace=False)


def generated_pngs(outdir):
    """The names save_images gives in `outdir` (none if it is not a folder)."""
    return [f for f in os.listdir(outdir) if re.fullmatch(r'\d{6,}\.png', f)] if os.path.isdir(outdir) else []


@contextlib.contextmanager
def writing(what):
    """Name the flag and path in the one-line error of a failed write (full or read-only disk), not a temporary file."""
    try:
        yield
    except OSError as e:
        raise UserError(f'{what}: cannot write ({e.strerror or type(e).__name__})') from None


def _read_png(outdir, seed):
    with open(os.path.join(outdir, f'{seed:06d}.png'), 'rb') as f:
        return _decode_image(f.read(), f'{seed:06d}.png')


def grid_path(outdir):
    # Beside the folder, not in it: the folder holds only the samples, ready for `calc --images`.
    return os.path.abspath(outdir).rstrip(os.sep) + '-grid.png'


def save_grid(images, path, replace=True):
    """Save uint8 [N, C, H, W] images as a square grid PNG, atomically (replace: networks.atomic_write)."""
    n, c, h, w = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = (n + cols - 1) // cols
    grid = torch.zeros(rows * cols, c, h, w, dtype=torch.uint8)
    grid[:n] = images.cpu()
    grid = grid.view(rows, cols, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, cols * w, c)
    img = PIL.Image.fromarray(grid.squeeze(-1).numpy() if c == 1 else grid.numpy())
    scale = max(1, 256 // (cols * w))        # tiny images are enlarged so a person can see them
    img = img.resize((img.width * scale, img.height * scale), PIL.Image.NEAREST)
    networks.atomic_write(path, lambda f: img.save(f, format='PNG'), replace=replace)

# ----------------------------------------------------------------------------------------------------
# A run's metrics against kimg (sida.py's metrics.png).

PLOT_TITLES = {'fid': 'FID of the EMA generator (lower is better)', 'is': 'Inception Score (higher is better)',
               'fd': 'toy FID of the EMA generator (lower is better)',
               'acc': 'share of samples of the asked class (higher is better)',
               'loss_fake_score': 'L_psi, mean per tick', 'loss_disc': 'L_D, mean per tick',
               'loss_sid': 'L_sid, mean per tick', 'loss_adv': 'L_adv, mean per tick'}


def plot_metrics(rows, path, prefixes=('fid', 'is'), label=str):
    """A run's metrics.png from its log rows: one small panel per metric (keys starting with `prefixes`), then
    per loss, against kimg, drawn with PIL (no plotting dependency); distances on a log scale. Tick-0 entries
    named <metric>_<what> (fd_data, fd_teacher35, ...) are horizontal lines in that metric's panel, named
    label(what)."""
    names = sorted({k for r in rows for k in r if k.startswith(prefixes) and '_' not in k})
    names += sorted({k for r in rows for k in r if k.startswith('loss_')})
    if not names:
        return
    W, H, m, cols = 360, 250, 45, 3
    x0, x1 = 0.0, max(max(r['kimg'] for r in rows), 1e-3)
    img = PIL.Image.new('RGB', (W * min(cols, len(names)), H * math.ceil(len(names) / cols)), 'white')
    d = PIL.ImageDraw.Draw(img)
    for i, name in enumerate(names):
        ox, oy, log = i % cols * W, i // cols * H, name.startswith(('fid', 'fd'))
        points = [(r['kimg'], r[name]) for r in rows if name in r and (r[name] > 0 or not log)]
        refs = [(k.split('_', 1)[1], v) for k, v in rows[0].items() if k.startswith(name + '_') and (v > 0 or not log)]
        if not points:
            continue
        f = (lambda v: math.log10(v)) if log else (lambda v: v)
        ys = [f(y) for _, y in points] + [f(y) for _, y in refs]
        y0, y1 = min(ys), max(ys)
        y1 = y1 if y1 > y0 else y0 + 1
        px = lambda x: ox + m + (x - x0) / (x1 - x0) * (W - 2 * m)
        py = lambda v: oy + H - m - (f(v) - y0) / (y1 - y0) * (H - 2 * m)
        d.rectangle([ox + m, oy + m, ox + W - m, oy + H - m], outline='black')
        title = next((v for k, v in PLOT_TITLES.items() if name.startswith(k)), 'mean per tick')
        d.text((ox + m, oy + 12), f'{name}: {title}', fill='black')
        d.text((ox + m, oy + 25), f'x: kimg{", y: log scale" if log else ""}', fill='#777777')
        for k in range(3):
            x, y = x0 + (x1 - x0) * k / 2, y0 + (y1 - y0) * k / 2
            d.text((px(x) - 10, oy + H - m + 5), f'{x:g}', fill='black')
            d.text((ox + 2, py(10 ** y if log else y) - 5), f'{10 ** y if log else y:.3g}', fill='black')
        xy = [(px(x), py(y)) for x, y in points]
        d.line(xy, fill='#1f77b4', width=2) if len(xy) > 1 else None
        for x, y in xy:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill='#1f77b4')
        for j, (who, y) in enumerate(refs):
            colour = ['#d62728', '#2ca02c', '#9467bd'][j % 3]
            d.line([(ox + m, py(y)), (ox + W - m, py(y))], fill=colour, width=1)
            d.text((ox + W - m - 80, py(y) - 11), label(who), fill=colour)
    networks.atomic_write(path, lambda f: img.save(f, format='PNG'))


def parse_seeds(text):
    """'0-49999' or '1,5,10-19' (ranges include both ends; seeds 0..2**63-1, torch's int64) -> list of ints."""
    ranges = []
    for part in text.split(','):
        m = re.fullmatch(r'\s*(\d{1,19})\s*(?:-\s*(\d{1,19})\s*)?', part)
        if not m or not int(m[1]) <= int(m[2] or m[1]) < 2 ** 63:
            raise UserError(f'--seeds {text}: expected e.g. 0-49999 or 1,5,10-19 (ascending ranges of 0 to 2**63-1)')
        ranges.append(range(int(m[1]), int(m[2] or m[1]) + 1))
    total = sum(map(len, ranges))                   # counted before the list is made
    if total > MAX_IMAGES:
        raise UserError(f'--seeds {text}: {total:,} seeds, more than {MAX_IMAGES:,}')
    seeds = [seed for r in ranges for seed in r]
    if len(set(seeds)) < total:                     # one image twice in FID, or two writes of one PNG
        twice = next(seed for seed, n in collections.Counter(seeds).items() if n > 1)
        raise UserError(f'--seeds {text}: seed {twice} is given twice')
    return seeds

# ----------------------------------------------------------------------------------------------------
# Command line.

def cmd_ref(args, device):
    result = dataset_metrics(args.data, load_detector(args.detector, device), num=args.num, batch=args.batch,
                             device=device, workers=args.workers)
    if rank() == 0:
        with writing(f'--dest {args.dest}'):
            save_ref(args.dest, result['mu'], result['sigma'])
        print(f'saved statistics of {result["num"]} images of {args.data} to {args.dest}')


def cmd_calc(args, device):
    ref = load_ref(args.ref)
    dataset = ImageDataset(args.images)
    result = dataset_metrics(dataset, load_detector(args.detector, device), num=args.num, ref=ref,
                             batch=args.batch, device=device, want_is=args.inception_score, workers=args.workers)
    _report(result, args.num or len(dataset))


def release_data(network):
    """The data set of a released generator's name (a key of PAPER), or None for anything else."""
    if str(network) not in networks.RELEASED_URLS:
        return None
    return str(network).split('-', 1)[1].removesuffix('-alpha1.2')


def cmd_gen(args, device):
    if not args.ref and not args.outdir:
        raise UserError('gen: nothing to do; pass --ref to measure FID, --outdir to save images, or both')
    if args.trials > 1 and (not args.ref or args.outdir or args.seeds):
        raise UserError(f'--trials {args.trials}: FID only, from seeds 0.. on (pass --ref; drop --outdir and --seeds)')
    seeds = parse_seeds(args.seeds) if args.seeds else range(args.num * args.trials)
    num = args.num if args.num is not None else len(seeds)
    if len(seeds) < num:
        raise UserError(f'--seeds {args.seeds} gives {len(seeds)} seeds, fewer than --num {num}')
    if args.outdir:     # rank 0 looks before any rank writes: new images among old ones would be measured together
        grid = grid_path(args.outdir)
        held, gridded = broadcast_object((len(image_names(args.outdir)) if os.path.isdir(args.outdir) else 0,  # any images
                                          os.path.exists(grid)) if rank() == 0 else None)
        found = ([f'{held} images'] if held else []) + ([f'its grid {grid}'] if gridded else [])
        if found:
            raise UserError(f'--outdir {args.outdir} has {" and ".join(found)}: remove them or choose another folder')
    networks.check_network_source(args.network, '--network')     # a mistyped name, before --ref downloads
    ref = load_ref(args.ref) if args.ref else None
    G = networks.load_network(args.network, device)
    vae = networks.load_vae(args.vae, device) if G.latent else None     # EDM2 latent generators

    def generate(batch_seeds):
        images = generate_images(G, batch_seeds, args.init_sigma, device, vae=vae)
        if args.outdir:
            with writing(f'--outdir {args.outdir}'):
                save_images(images, batch_seeds, args.outdir)
        return images

    if ref is not None:
        data = release_data(args.network)
        want_is = args.inception_score or (data is not None and PAPER[data][3])
        detector = load_detector(args.detector, device)
        check_features(detector, generate_images(G, torch.tensor([seeds[0]]), args.init_sigma, device, vae=vae),
                       ref, device, args.detector)                  # before any image is written
        results = []
        for trial in range(args.trials):            # trial k: seeds k*num .. (k+1)*num - 1
            trial_seeds = seeds[trial * num:(trial + 1) * num]
            results.append(generator_metrics(generate, num, detector, ref=ref, batch=args.batch, device=device,
                                             want_is=want_is, seeds=trial_seeds))
            if args.trials > 1:
                _report(results[-1], num, f'trial {trial + 1}/{args.trials}, seeds {trial_seeds[0]}-{trial_seeds[-1]}: ')
    else:
        meter = Progress('sampling', num)
        for batch_seeds in torch.tensor(seeds[:num][rank()::world_size()], dtype=torch.int64).split(args.batch):
            if len(batch_seeds):
                generate(batch_seeds)
            meter.update(len(batch_seeds))
    if args.outdir:
        if world_size() > 1:
            dist.barrier()                      # every rank has written its PNGs; rank 0 reads the grid's back
        if rank() == 0:
            first = seeds[:min(num, GRID_IMAGES)]
            grid, images = grid_path(args.outdir), np.stack([_read_png(args.outdir, seed) for seed in first])
            with writing(f'--outdir {args.outdir} (its grid {grid})'):
                save_grid(torch.from_numpy(images), grid, replace=False)
            print(f'wrote {num} images to {args.outdir} and the first {len(first)} as a grid to {grid}', file=sys.stderr)
    if ref is not None and args.trials == 1:
        _report(results[0], num)
    elif ref is not None and rank() == 0:
        for key in ('fid', 'is') if 'is' in results[0] else ('fid',):
            v = np.array([r[key] for r in results])
            print(f'{key} over {args.trials} trials of {num} images: mean {v.mean():.4f} std {v.std(ddof=1):.4f} '
                  f'min {v.min():.4f} max {v.max():.4f}')


def cmd_names():
    """The names accepted for --network (and sida.py's --teacher, --init-generator) and --ref."""
    print('Released one-step generators and the FID-50k published for them. SiD: the SiD paper\'s figure (alpha 1.2).')
    print('SiDA and SiD²A: the SiDA paper gives one figure per data set, the best of its SiDA and SiD²A runs, and')
    print('does not say which released file it belongs to, so a file\'s own figure is "-". Score one with:')
    print('python fid.py gen --network NAME --ref REF [--trials 10]')
    print(f'  {"NAME":31} {"REF":15} {"THIS FILE":>9}  BEST SiDA/SiD²A OF THE DATA SET')
    for name in networks.RELEASED_URLS:
        ref, sid_fid, best_fid, _ = PAPER[release_data(name)]
        own = f'{sid_fid:.3f}' if name.startswith('sid-') and sid_fid is not None else '-'
        print(f'  {name:31} {ref:15} {own:>9}  {best_fid:.3f}')
    print('  Named by the release table, whose file names disagree twice: sida-edm2-img512-xl is the file')
    print('  edm2_img512_xl_sid2a_alpha1-024578.pkl, sid-edm2-img512-xxl is edm2_img512_xxl_sida_alpha1-077932.pkl;')
    print('  no EDM2-XXL SiD²A generator is released. For CIFAR-10, whose tables also report the Inception')
    print('  Score, gen prints it too.')
    print('Reference statistics (--ref NAME):')
    for name, url in REF_URLS.items():
        print(f'  {name:15} {url}')
    print('Teachers (sida.py --teacher NAME):')
    for name, url in networks.OFFICIAL_URLS.items():
        print(f'  {name:31} {url}')


def _report(result, num, prefix=''):
    if rank() == 0:
        if 'is' in result:
            print(f'{prefix}is ({num} images): {result["is"]:.4f} +- {result["is_std"]:.4f}')
        print(f'{prefix}fid ({num} images): {result["fid"]:.4f}')


def unwritable(folder):
    """None if files can be made in `folder` (created when missing), else the path that stops it: the nearest
    one on the way that exists. Checked before the work whose result goes there; a full disk shows only then."""
    path = os.path.abspath(folder)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return None if os.path.isdir(path) and os.access(path, os.R_OK | os.W_OK | os.X_OK) else path


class _Parser(argparse.ArgumentParser):
    def error(self, message):                     # one line and status 1, like every other bad input
        print(f'error: {message}', file=sys.stderr)
        sys.exit(1)


def parse_args(argv=None):
    parser = _Parser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True, parser_class=_Parser)
    ref = sub.add_parser('ref', help='statistics of a dataset -> npz with mu and sigma')
    ref.add_argument('--data', required=True, help='folder of images, EDM zip or cifar-10-python.tar.gz')
    ref.add_argument('--dest', required=True, help='npz file to write')
    calc = sub.add_parser('calc', help='FID of a folder / zip of images against reference statistics')
    calc.add_argument('--images', required=True, help='folder of images, EDM zip or cifar-10-python.tar.gz')
    gen = sub.add_parser('gen', help='FID of a one-step generator (--ref), and/or its images and a grid (--outdir)')
    gen.add_argument('--network', required=True,
                     help='generator: ours or an official pickle (path or URL), or a released name (see: names)')
    gen.add_argument('--seeds', help='seeds to generate, e.g. 0-49999 (default 0..num-1; without --ref 0-63)')
    gen.add_argument('--outdir', help='save the images as PNGs here, and a grid of the first 64 as OUTDIR-grid.png')
    gen.add_argument('--init-sigma', type=float, default=SIGMA_INIT, help='sigma_init of the one-step generator')
    gen.add_argument('--vae', default=networks.VAE_NAME, help='EDM2 latent generators: the VAE (hub name or folder)')
    gen.add_argument('--ref', help='reference statistics: npz or EDM2 pkl, path, URL or name; without it, no FID')
    calc.add_argument('--ref', required=True, help='reference statistics: npz or EDM2 pkl, path, URL or name')
    sub.add_parser('names', help='list the released generators, reference statistics and teachers by name')
    for p in (calc, gen):
        p.add_argument('--is', dest='inception_score', action='store_true', help='also print the Inception Score')
    # --num-images is the same flag: torchrun (2.9+) takes a bare --num for an abbreviation of its --numa-binding.
    calc.add_argument('--num', '--num-images', dest='num', type=int,
                      help='use N of the images, a random subset as EDM picks it (error if fewer)')
    gen.add_argument('--num', '--num-images', dest='num', type=int,
                     help='number of images (default 50000, or the number of --seeds)')
    gen.add_argument('--trials', type=int, default=1,
                     help='FID of this many sets of --num images, seeds 0.. on (the official protocol: 10 of 50000); '
                          'prints each, then mean, std, min and max')
    ref.add_argument('--num', '--num-images', dest='num', type=int,
                      help='use N of the images, a random subset as EDM picks it (error if fewer)')
    for p in (ref, calc, gen):
        p.add_argument('--detector', help='Inception TorchScript file or URL (default: the official one, cached)')
        p.add_argument('--batch', type=int, default=64, help='images per batch per GPU')
        p.add_argument('--device', help='cuda or cpu (default: cuda if available)')
        p.add_argument('--workers', type=int, default=2, help='image-reading processes per GPU')
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(['names'] if argv == ['--list'] else argv)
    if args.command == 'names':
        return args
    if args.command == 'gen' and args.num is None and not args.seeds:
        args.num = 50000 if args.ref else GRID_IMAGES
    for flag in ('num', 'batch', 'trials'):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            parser.error(f'--{flag} must be at least 1')
    if not 0 <= getattr(args, 'workers', 0) <= MAX_WORKERS:
        parser.error(f'--workers must be 0 to {MAX_WORKERS}')
    if args.command == 'gen' and (args.num or 0) * args.trials > MAX_IMAGES:
        trials = f' x --trials {args.trials}' if args.trials > 1 else ''
        parser.error(f'--num {args.num}{trials}: more than {MAX_IMAGES:,} images')
    if args.command == 'gen' and not (0 < args.init_sigma < math.inf):
        parser.error(f'--init-sigma {args.init_sigma}: must be a positive noise level')
    if args.command == 'gen' and args.outdir:
        if os.path.exists(args.outdir) and not os.path.isdir(args.outdir):
            parser.error(f'--outdir {args.outdir}: not a folder')
        grid = grid_path(args.outdir)
        for folder in (args.outdir, os.path.dirname(grid)):                # the grid goes beside the images
            if blocked := unwritable(folder):
                parser.error(f'--outdir {args.outdir}: cannot write in {blocked} (not a writable folder)')
    if args.command == 'ref':
        if os.path.isdir(args.dest):
            parser.error(f'--dest {args.dest}: a folder, not a file name')
        if os.path.exists(args.dest):
            parser.error(f'--dest {args.dest} exists: remove it or choose another name')
        if blocked := unwritable(os.path.dirname(os.path.abspath(args.dest))):
            parser.error(f'--dest {args.dest}: cannot write in {blocked} (not a writable folder)')
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.command == 'names':
        cmd_names()
        return 0
    try:
        _, _, device = init_distributed(getattr(args, 'device', None))
        commands = {'ref': cmd_ref, 'calc': cmd_calc, 'gen': cmd_gen}
        commands[args.command](args, device)
    except (UserError, OSError) as e:
        print('\n' * Progress.line_open + f'error: {e}'.splitlines()[0], file=sys.stderr)
        return 1
    except KeyboardInterrupt:       # gen's --outdir held no generated images at the start: all there are this run's
        outdir = getattr(args, 'outdir', None)
        print('\n' * Progress.line_open + (f'interrupted: {len(generated_pngs(outdir))} images in {outdir}'
                                            if outdir else 'interrupted'), file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())
