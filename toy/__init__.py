"""The toy world of `python sida.py --preset toy`: everything the offline run needs besides the method.

In this file's order: the images (procedurally drawn 16x16 RGB images in 4 classes), the networks of the
toy (small EDM/EDM2 denoisers), the teacher's multi-step sampler (EDM's Heun sampler), the toy's Inception
(`Classifier`: a small CNN trained on real toy images only), the run's metrics (`Metrics`: fd, acc and
the baselines) and the comparison figure. The shipped files sit beside this code; `toy/make.py` makes
each of them (commands and figures: toy/README.md):

    toy/classifier.pt              python toy/make.py classifier
    toy/ARCH/teacher.pt            python toy/make.py teacher --arch ARCH        (ARCH: ddpmpp or edm2)
    toy/ARCH/sid-generator.pt      python toy/make.py sid-generator --arch ARCH
"""

import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw

import fid
import networks
from networks import UserError

HERE = os.path.dirname(os.path.abspath(__file__))
RES, CLASSES = 16, 4
CLASS_NAMES = ('discs', 'squares', 'stripes', 'crosses')
# Seeds of the image sets: the real images the run trains on, the reference of its fd, the held-out real
# images of its baseline, the classifier's test set; the classifier trains on seeds CLASSIFIER_SEED and up.
TRAIN_SEED, REF_SEED, HELD_OUT_SEED, TEST_SEED = 1, 2, 3, 4
TRAIN_IMAGES, REF_IMAGES, TEST_IMAGES = 4096, 10000, 10000
CLASSIFIER_SEED = 1_000_000
METRIC_IMAGES = 2048            # samples behind fd and acc
PAPER_STEPS = 18                # EDM's standard sampler: 18 Heun steps, 35 evaluations (how the paper measures a teacher)
BEST_STEPS = dict(ddpmpp=9, edm2=18)   # each shipped teacher's best fd within 35 evaluations (toy/README.md)


def shipped(name, arch='ddpmpp'):
    """Path of a shipped file: 'classifier', or 'teacher' / 'sid-generator' of an architecture."""
    return os.path.join(HERE, 'classifier.pt' if name == 'classifier' else os.path.join(arch, f'{name}.pt'))


def sampler_steps(teacher):
    """Heun steps of the teacher's baselines: EDM's 18 (the paper's way) and, for a shipped teacher, its best
    fd within 35 evaluations (9 steps for the DDPM++ one; the EDM2 one is best at 18)."""
    best = next((n for arch, n in BEST_STEPS.items() if os.path.abspath(str(teacher)) == shipped('teacher', arch)), PAPER_STEPS)
    return sorted({PAPER_STEPS, best}, reverse=True)

# ----------------------------------------------------------------------------------------------------
# The images.

def images(n, seed):
    """n procedural 16x16 RGB images (uint8 [n, 3, 16, 16]) and their classes (int64 [n]): a disc,
    square, stripes or cross of one colour on a plain background of another, at a random place and size."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(n, *s, generator=g)
    labels = torch.randint(CLASSES, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(RES) + 0.5, torch.arange(RES) + 0.5, indexing='ij')
    cx, cy = (4 + 8 * r(1, 1)), (4 + 8 * r(1, 1))
    size = 2.5 + 2.5 * r(1, 1)
    dx, dy = xx - cx, yy - cy
    soft = lambda d: torch.sigmoid(d * 3)                   # anti-aliased edges
    disc = soft(size - (dx ** 2 + dy ** 2).sqrt())
    square = soft(size - torch.maximum(dx.abs(), dy.abs()))
    angle, freq = r(1, 1) * np.pi, 0.5 + 0.4 * r(1, 1)
    stripes = soft(2 * torch.sin(freq * (xx * angle.cos() + yy * angle.sin()) + 6 * r(1, 1)))
    cross = torch.maximum(soft(1.2 - dx.abs()), soft(1.2 - dy.abs())) * soft(size + 1.5 - torch.maximum(dx.abs(), dy.abs()))
    shape = torch.stack([disc, square, stripes, cross], 1)[torch.arange(n), labels]   # [n, H, W]
    fg, bg = r(3, 1, 1), r(3, 1, 1) * 0.6
    img = bg + (fg - bg) * shape[:, None]
    return (img * 255).round().clamp(0, 255).to(torch.uint8), labels

# ----------------------------------------------------------------------------------------------------
# Networks: the toy's denoisers, and the teacher's multi-step sampler.

def arch(name):
    """The network config (networks.build_network) of the small class-conditional teacher of an architecture
    ('ddpmpp' or 'edm2') at 16x16."""
    common = dict(img_resolution=RES, img_channels=3, label_dim=CLASSES)
    if name == 'edm2':
        return {'class_name': 'EDM2Precond', 'kwargs': dict(common, model_channels=32, channel_mult=[1, 2],
                                                            num_blocks=1, attn_resolutions=[8], logvar_channels=32)}
    return {'class_name': 'EDMPrecond', 'kwargs': dict(common, model_type='SongUNet', model_channels=24,
                                                       channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8],
                                                       dropout=0.0)}


@torch.no_grad()
def heun_sampler(net, z, labels, steps=PAPER_STEPS, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, Alg. 1): 2 * steps - 1 evaluations
    of the denoiser, from sigma_max down the Karras schedule (Eq. 5) to 0. z ~ N(0, I)."""
    u = torch.arange(steps, dtype=torch.float64, device=z.device) / (steps - 1)
    t = torch.cat([(sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho,
                   torch.zeros(1, dtype=torch.float64, device=z.device)])
    x = z.double() * t[0]
    for k in range(steps):
        d = (x - net(x.float(), t[k].float().expand(len(x)), labels).double()) / t[k]
        x_next = x + (t[k + 1] - t[k]) * d
        if k < steps - 1:
            d2 = (x_next - net(x_next.float(), t[k + 1].float().expand(len(x)), labels).double()) / t[k + 1]
            x_next = x + (t[k + 1] - t[k]) * (d + d2) / 2
        x = x_next
    return x.float()


class MultiStep(torch.nn.Module):
    """The teacher's Heun sampler behind a one-step generator's call G(sigma_init z, sigma_init, c), so that
    fid.generate_images and the metrics treat both alike (same seeds, same z and classes)."""

    def __init__(self, net, steps):
        super().__init__()
        self.net, self.steps = net, steps
        for k in ('img_channels', 'img_resolution', 'label_dim', 'latent'):
            setattr(self, k, getattr(net, k))

    def forward(self, x, sigma, class_labels=None):
        return heun_sampler(self.net, x / sigma, class_labels, self.steps)

# ----------------------------------------------------------------------------------------------------
# The toy's Inception: a classifier trained on real toy images only.

class Classifier(torch.nn.Module):
    """A small CNN that tells the four toy shapes apart. Same call signature as the Inception detector:
    uint8 images in; return_features=True gives the penultimate features (the toy fd's space),
    no_output_bias=True the class probabilities. The last layer has no bias, so both calls see the same
    classifier."""

    def __init__(self,
        img_channels    = 3,        # Input channels (grayscale is repeated to 3 by run_detector).
        num_classes     = CLASSES,  # Outputs of the last layer.
        width           = 32,       # Channels of the first level; doubled at each of the two halvings.
    ):
        super().__init__()
        conv = lambda cin, cout: torch.nn.Conv2d(cin, cout, 3, padding=1)
        self.kwargs = dict(img_channels=img_channels, num_classes=num_classes, width=width)
        self.convs = torch.nn.ModuleList([conv(img_channels, width), conv(width, width),               # 16x16
                                          conv(width, 2 * width), conv(2 * width, 2 * width),          # 8x8
                                          conv(2 * width, 4 * width), conv(4 * width, 4 * width)])     # 4x4
        self.head = torch.nn.Linear(4 * width, num_classes, bias=False)
        self.dim = 4 * width

    def features(self, x):
        """Penultimate features [N, 4 * width] of images in [-1, 1]: the spatial mean of the last conv layer."""
        for i, conv in enumerate(self.convs):
            if i in (2, 4):
                x = F.avg_pool2d(x, 2)
            x = F.relu(conv(x))
        return x.mean(dim=(2, 3))

    def forward(self, images, return_features: bool = False, no_output_bias: bool = False):
        f = self.features(images.to(torch.float32) / 127.5 - 1)
        return f if return_features else self.head(f).softmax(dim=1)


def accuracy(classifier, images, labels, device='cpu', batch=1024):
    """Fraction of the images that the classifier assigns to their label."""
    correct = sum(int((fid.run_detector(classifier, x, device).argmax(dim=1).cpu() == y.cpu()).sum())
                  for x, y in zip(images.split(batch), labels.split(batch)))
    return correct / len(images)


def save_classifier(net, path, **meta):
    """Plain tensors in fp16 (half the size; the classifier is defined by the stored, rounded weights). Never
    replaces a file (toy/make.py refuses an existing --dest before training)."""
    data = {'format': 'sida-toy-classifier', 'kwargs': net.kwargs, 'meta': meta,
            'state_dict': {k: v.detach().cpu().half() for k, v in net.state_dict().items()}}
    networks.atomic_write(path, lambda f: torch.save(data, f), replace=False)


def load_classifier(path=None, device='cpu'):
    """The classifier from its file (plain tensors, read with weights_only=True: no code runs)."""
    path = path or shipped('classifier')
    if not os.path.isfile(path):
        raise UserError(f'{path}: the toy classifier is missing; make it with python toy/make.py classifier --dest {path}')
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
        net = Classifier(**data['kwargs'])
        net.load_state_dict({k: v.float() for k, v in data['state_dict'].items()})
    except Exception as e:
        reason = f'{type(e).__name__}: {e}'.splitlines()[0]
        raise UserError(f'{path}: not a toy classifier file ({reason})') from None
    return net.eval().requires_grad_(False).to(device)

# ----------------------------------------------------------------------------------------------------
# The run's metrics: fd and acc of a generator, and the baselines it is measured against.

class Metrics:
    """The toy's FID and accuracy, on METRIC_IMAGES samples from seeds 0, 1, ... (fid.generate_images).
    `fd` is the Fréchet distance of the classifier's penultimate features to those of REF_IMAGES real
    images (the same statistics code as FID); `acc`, for a conditional generator, is the fraction of
    samples that the classifier assigns to the class they were generated for. Under torchrun each rank
    measures its share of the seeds."""

    def __init__(self, device, num=METRIC_IMAGES):
        self.device, self.num = device, num
        self.classifier = load_classifier(device=device)
        stats = fid.FeatureStats()
        for chunk in images(REF_IMAGES, REF_SEED)[0].split(1000):
            stats.update(fid.run_detector(self.classifier, chunk, device, return_features=True))
        self.ref = stats.mean_cov()

    def measure(self, generate, classes):
        """{'fd'} of generate(seeds) -> uint8 [n, 3, H, W], and {'acc'} when classes(seeds) gives the class each
        image was made for (None: unconditional)."""
        correct = torch.zeros([], dtype=torch.int64, device=self.device)

        def generate_and_classify(seeds):
            x = generate(seeds)
            if classes is not None:
                predicted = fid.run_detector(self.classifier, x, self.device).argmax(dim=1)
                correct.add_((predicted == classes(seeds).to(self.device)).sum())
            return x
        r = fid.generator_metrics(generate_and_classify, self.num, self.classifier, ref=self.ref, batch=256,
                                  device=self.device, progress=False)
        if classes is None:
            return {'fd': r['fid']}
        if dist.is_initialized():
            dist.all_reduce(correct)               # each rank classified its share of the seeds
        return {'fd': r['fid'], 'acc': int(correct) / self.num}

    def __call__(self, G, init_sigma=fid.SIGMA_INIT):
        """fd (and acc) of a one-step generator, or of a MultiStep sampler."""
        generate = lambda seeds: fid.generate_images(G, seeds, init_sigma, self.device)
        shape = (G.img_channels, G.img_resolution, G.img_resolution)
        classes = (lambda seeds: fid.generated_classes(seeds, G.label_dim, shape)) if G.label_dim else None
        return self.measure(generate, classes)

    def baselines(self, teacher, steps=(PAPER_STEPS,)):
        """The marks a run is read against, as log keys: held-out real data (`fd_data`, the floor) and the
        teacher's Heun sampler with each number of steps (sampler_steps: `fd_teacher35` is the paper's way,
        18 steps, and `fd_teacher17` the shipped DDPM++ teacher's best)."""
        held_out, held_out_labels = images(self.num, HELD_OUT_SEED)
        out = {'data': self.measure(lambda seeds: held_out[seeds],
                                    (lambda seeds: held_out_labels[seeds]) if teacher.label_dim else None)}
        for n in steps:
            out[f'teacher{2 * n - 1}'] = self(MultiStep(teacher, n))
        return {f'{k}_{who}': round(v, 5) for who, r in out.items() for k, v in r.items()}


def baseline_label(who):
    """'data' -> 'real data', 'teacher35' -> 'teacher (35 NFE)' (log keys -> words on the console and plots)."""
    return 'real data' if who == 'data' else f'teacher ({who[7:]} NFE)' if who.startswith('teacher') else who

# ----------------------------------------------------------------------------------------------------
# The comparison figure.

def save_comparison(teacher, G_init, G, path, method, steps=(PAPER_STEPS,), init_sigma=fid.SIGMA_INIT, device='cpu', n=16):
    """The run's result in one picture: rows of real images, the teacher's samplers, the initial and the
    distilled one-step generator; each column one seed, so the same class (and the same z for every
    network). The README's assets/toy-samples.png is this file of the default toy run."""
    seeds = torch.arange(n)
    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    classes = fid.generated_classes(seeds, teacher.label_dim, shape) if teacher.label_dim else torch.zeros(n, dtype=torch.int64)
    real, labels = images(64 * n, HELD_OUT_SEED)
    if not teacher.label_dim:
        labels = torch.zeros_like(labels)
    # Column k shows a real image of class classes[k]: the j-th of that class when it is the j-th column asking for it.
    real = torch.stack([real[labels == c][(classes[:k] == c).sum()] for k, c in enumerate(classes)])
    rows = [('real data', real)]
    for k in steps:
        rows.append((f'teacher ({2 * k - 1} NFE)', fid.generate_images(MultiStep(teacher, k), seeds, init_sigma, device)))
    rows += [('initial G (1 NFE)', fid.generate_images(G_init, seeds, init_sigma, device)),
             (f'{method} G (1 NFE)', fid.generate_images(G, seeds, init_sigma, device))]
    label_width, size = 110, shape[1] * 4
    img = Image.new('RGB', (label_width + n * (size + 2), len(rows) * (size + 4)), 'white')
    d = ImageDraw.Draw(img)
    for r, (label, row) in enumerate(rows):
        y = r * (size + 4)
        d.text((5, y + size // 2 - 6), label, fill='black')
        for k, image in enumerate(row.cpu()):
            tile = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((size, size), Image.NEAREST)
            img.paste(tile, (label_width + k * (size + 2), y))
    networks.atomic_write(path, lambda f: img.save(f, format='PNG'))
