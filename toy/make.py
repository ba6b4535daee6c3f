"""Make the toy run's shipped files, on the CPU, from fixed seeds (figures and times: toy/README.md).

    python toy/make.py classifier                       # toy/classifier.pt, the toy's Inception
    python toy/make.py teacher --arch ddpmpp            # toy/ddpmpp/teacher.pt, EDM training on toy images
    python toy/make.py sid-generator --arch ddpmpp      # toy/ddpmpp/sid-generator.pt, SiD from that teacher
    python toy/make.py sid-generator ... -- --device cuda   # flags after -- go to sida.py

Each writes to --dest (default: the shipped file's place) and refuses to overwrite it: move the shipped
file away first to remake it. `sid-generator` runs `sida.py --preset toy --method sid` with the flags
below into --outdir (continued with --resume when that folder already holds the run) and copies its
final EMA generator to --dest.
"""

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import networks  # noqa: E402
import sida  # noqa: E402
import toy  # noqa: E402
from networks import UserError  # noqa: E402

TEACHER_KIMG = dict(ddpmpp=600, edm2=1000)   # EDM2's 600-kimg teacher drew the asked class only 94.1% of the time
TEACHER_BATCH = 128
# EDM2's weights have unit norm, so a step of a given size moves them relatively less than EDM's (whose
# weights are ~1/sqrt(fan-in)): it takes a larger learning rate, as in EDM2.
TEACHER_LR = dict(ddpmpp=1e-3, edm2=1e-2)
# SiD with the paper's SiD alpha (1.2), the toy's batch, learning rates and EMA written out, so that the shipped
# generator does not change with the toy preset.
SID_FLAGS = ['--method', 'sid', '--alpha', '1.2', '--batch', '64', '--lr', '1e-4', '--glr', '1e-4', '--ema', '0.02',
             '--ema-rampup', '0.25']
SID_DURATION = 0.3                                  # Mimg


def train_classifier(steps=2000, batch=128, lr=2e-3, seed=0):
    """toy.Classifier trained with cross-entropy on real toy images only: a fresh batch at every step (seeds
    from toy.CLASSIFIER_SEED on, apart from every set the toy run uses), Adam with a cosine decay.
    Deterministic: the same weights on every run on one machine with one thread count (OMP_NUM_THREADS)."""
    torch.manual_seed(seed)
    net = toy.Classifier()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for step in range(steps):
        images, labels = toy.images(batch, seed=toy.CLASSIFIER_SEED + step)
        loss = F.cross_entropy(net.head(net.features(images.float() / 127.5 - 1)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group['lr'] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        opt.step()
    return net.eval().requires_grad_(False)


def train_teacher(arch, kimg, seed=0, device='cpu', log=print):
    """A small EDM (or EDM2) teacher trained from scratch with EDM's denoising loss on the run's real images:
    Adam at a constant learning rate after a 100-step warm-up; returned is an EMA whose averaging length grows
    with training (beta = (k+1)/(k+10) at step k: about the last 11% of the steps)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = networks.build_network(toy.arch(arch)).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    lr = TEACHER_LR.get(arch, 1e-3)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99))
    images, labels = toy.images(toy.TRAIN_IMAGES, toy.TRAIN_SEED)
    data, slot = sida.Sampler(images, labels, net.label_dim, images.shape[1:], device), sida.Slot(-1, seed, device)
    steps, t0 = int(kimg * 1000 / TEACHER_BATCH), time.time()
    for step in range(steps):
        if net.magnitude_preserving:
            net.normalize_weights_()
        x, c = data.real(slot, TEACHER_BATCH)
        sigma = (torch.randn(TEACHER_BATCH, 1, 1, 1, generator=slot.gen, device=device) * net.P_std + net.P_mean).exp()
        out = sida.denoise(net, x + sigma * data.noise(slot, TEACHER_BATCH), sigma, c, None, net.use_logvar)
        loss = sida.denoising_loss(out.denoised, x, sigma, net.sigma_data, out.logvar).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g['lr'] = lr * min(1, (step + 1) / 100)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - min(0.999, (step + 1) / (step + 10)))
        if step % 500 == 0 or step == steps - 1:
            log(f'teacher: step {step + 1}/{steps}, loss {loss.item():.4f}, {time.time() - t0:.0f} s')
    return ema


def refuse_overwrite(path):
    if os.path.exists(path):
        raise UserError(f'--dest {path} exists; not overwriting it (move it away to remake it)')


def cmd_classifier(args):
    refuse_overwrite(args.dest)
    start = time.time()
    net = train_classifier(steps=args.steps)
    net.load_state_dict({k: v.half().float() for k, v in net.state_dict().items()})   # as stored
    images, labels = toy.images(toy.TEST_IMAGES, toy.TEST_SEED)
    accuracy = toy.accuracy(net, images, labels)
    toy.save_classifier(net, args.dest, steps=args.steps, held_out_accuracy=accuracy)
    print(f'toy classifier: {args.steps} steps in {time.time() - start:.0f} s, held-out accuracy {accuracy:.4f} '
          f'({len(images)} images); saved {args.dest}')


def cmd_teacher(args):
    refuse_overwrite(args.dest)
    kimg = args.kimg or TEACHER_KIMG.get(args.arch, 600)
    start = time.time()
    net = train_teacher(args.arch, kimg, seed=args.seed, device=args.device)
    # Stored in fp16: half the size in the repository (toy/README.md's figures are of the fp16 file).
    networks.save_network(net.half(), args.dest, replace=False, kimg=kimg, method='edm-teacher', data='toy', seed=args.seed)
    minutes = (time.time() - start) / 60
    teacher = networks.load_network(args.dest, args.device)
    print(json.dumps({'teacher': args.dest, 'train_minutes': round(minutes, 1),
                      **toy.Metrics(args.device).baselines(teacher, toy.sampler_steps(args.dest))}),
          flush=True)


def cmd_sid_generator(args):
    refuse_overwrite(args.dest)
    resume = os.path.isfile(os.path.join(args.outdir, 'training-state.pt'))
    argv = ['--preset', 'toy', '--arch', args.arch, *SID_FLAGS, '--duration', str(args.duration), *args.extra]
    result = sida.distill(sida.parse_args(argv + (['--resume', args.outdir] if resume else ['--outdir', args.outdir])))
    final = os.path.join(args.outdir, f'generator-{result["nimg"] / 1000:010.3f}.pt')
    G = networks.load_network(final)
    networks.save_network(G, args.dest, replace=False, **dict(G.meta, teacher=f'toy/{args.arch}/teacher.pt'),
                          flags=' '.join(argv))
    print(f'saved the SiD generator of {final} to {args.dest}')


def main(argv=None):
    p = argparse.ArgumentParser(description="Make the toy run's shipped files.")
    sub = p.add_subparsers(dest='command', required=True)
    c = sub.add_parser('classifier', help="the toy's Inception, trained on real toy images")
    c.add_argument('--dest', default=toy.shipped('classifier'), help='file to write')
    c.add_argument('--steps', type=int, default=2000, help='training steps of 128 fresh toy images')
    t = sub.add_parser('teacher', help='a toy teacher, trained with EDM\'s loss on the toy images')
    t.add_argument('--kimg', type=float, default=None, help='training images, thousands (default: ddpmpp 600, edm2 1000)')
    t.add_argument('--seed', type=int, default=0, help='initial weights and data order')
    s = sub.add_parser('sid-generator', help='the SiD one-step generator of the shipped teacher (SiD²A starts there)')
    s.add_argument('--outdir', default=None, help='the SiD run (default: runs/toy-sid-ARCH)')
    s.add_argument('--duration', type=float, default=SID_DURATION, help='training length of the SiD run, Mimg')
    for q in (t, s):
        q.add_argument('--arch', default='ddpmpp', choices=['ddpmpp', 'edm2'], help='architecture')
        q.add_argument('--dest', default=None, help="file to write (default: the shipped file's place)")
    for q in (c, t):
        q.add_argument('--device', default='cpu', help='cpu (as shipped) or cuda')
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    args = p.parse_args(argv[:len(argv) - len(extra) - ('--' in argv)])
    args.extra, args.device = extra, torch.device(getattr(args, 'device', 'cpu'))
    if args.command != 'classifier':
        args.dest = args.dest or toy.shipped(args.command, args.arch)
    if args.command == 'sid-generator':
        args.outdir = args.outdir or f'runs/toy-sid-{args.arch}'
    try:
        dict(classifier=cmd_classifier, teacher=cmd_teacher, **{'sid-generator': cmd_sid_generator})[args.command](args)
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)


if __name__ == '__main__':
    main()
