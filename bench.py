#!/usr/bin/env python3
"""The speed of one SiDA iteration (the fake score and discriminator update, then the generator update)
on randomly initialised networks of the paper's sizes: no downloads, no data. One JSON line per run.

    python bench.py                                  # the three targets below (on a GPU: eager and compiled)
    python bench.py --targets cifar10 --modes eager --precision tf32 --iters 20
    python bench.py --profile                        # also the top kernels of one steady-state iteration
    python bench.py --modes eager,cudagraphs --memory-format contiguous   # on a GPU: CUDA graphs; NCHW networks
    python bench.py --arch ddpmpp --resolution 32 --cbase 128 --cres 2,2,2 --batch-gpu 64   # one configuration
    torchrun --standalone --nproc_per_node=8 bench.py --targets cifar10   # per-GPU figures under DDP

On the CPU the targets run at a per-GPU batch of 1 with one timed iteration: the operation count
(`eager_ops_per_iter`, the host's share of the cost) does not depend on the batch. Any sida.py run flag
(--method, --precision, --dropout, --lr, ...) given here applies to every run; the last value wins.

Each line: img_per_s, sec_per_iter, peak_gb, gflop_per_iter (torch.utils.flop_counter), mfu (against the
GPU's dense bf16 peak), eager_ops_per_iter (tensor operations one eager iteration dispatches, views
excluded), and compiled: compile_s (the warm-up's time beyond its steady iterations), graphs, graph_breaks.

Contents: the targets and flags; counting; one run; the profile; main.
"""

import argparse
import json
import sys
import time

import torch
import torch.utils._python_dispatch
import torch.utils.flop_counter

import fid
import networks
import sida
from networks import UserError

# ----------------------------------------------------------------------------------------------------
# The targets: the paper's networks at their per-GPU batch (the speed targets of NOTES.md).

TARGETS = {
    'cifar10': '--arch ddpmpp --resolution 32 --cbase 128 --cres 2,2,2 --batch-gpu 64',
    'imagenet64': '--arch adm --resolution 64 --cbase 192 --cres 1,2,3,4 --label-dim 1000 --batch-gpu 32 --dropout 0.1',
    'edm2-xs': '--arch edm2 --resolution 64 --cbase 128 --cres 1,2,3,4 --label-dim 1000 --batch-gpu 64 --dropout 0',
}
PEAK_TFLOPS = {'H100': 989, 'H200': 989, 'A100': 312}     # dense bf16/fp16 tensor-core peaks


def build_parser():
    """sida.py's flags (the run's settings) and the benchmark's."""
    p = sida.build_parser()
    p.description = 'Throughput of full SiDA iterations on random networks (no downloads).'
    arch = next(act for act in p._actions if act.dest == 'arch')     # sida.py's toy flag, here the network's
    arch.help, arch.default = 'time one network of this architecture instead of the targets', None
    arch.choices = ['ddpmpp', 'ncsnpp', 'adm', 'edm2']
    a = p.add_argument_group('bench', 'what to time').add_argument
    a('--targets', default=','.join(TARGETS), metavar='LIST', help=f'comma list of {", ".join(TARGETS)}')
    a('--modes', default=None, metavar='LIST',
      help="comma list of eager, compile, cudagraphs (compiled, replayed as CUDA graphs: torch.compile's reduce-overhead "
           'mode) (default: eager,compile on a GPU, eager on the CPU, compile with --compile)')
    a('--memory-format', default='channels_last', choices=['channels_last', 'contiguous'],
      help="the networks' layout on a GPU (sida.py's is channels_last)")
    a('--iters', type=int, default=None, help='timed iterations (default: 10 on a GPU, 1 on the CPU)')
    a('--profile', action='store_true', help='also print the top kernels of one steady-state iteration')
    a = p.add_argument_group('configuration', 'one network instead of the targets, when --arch is given').add_argument
    a('--resolution', type=int, default=32, help='image (EDM2: latent) resolution')
    a('--cbase', type=int, default=128, help='channels at multiplier 1')
    a('--cres', default='2,2,2', metavar='LIST', help='channel multipliers per resolution')
    a('--label-dim', type=int, default=0, help='number of classes')
    return p


def parse_runs(argv, device):
    """[(name, mode, args)] for each target (or the one --arch configuration) and mode, from the target's
    flags followed by the command line's."""
    p = build_parser()
    given = p.parse_args(argv)
    for flag in ('iters', 'resolution', 'cbase', 'label_dim'):
        v = getattr(given, flag)
        if v is not None and v < (0 if flag == 'label_dim' else 1):
            raise UserError(f'--{flag.replace("_", "-")} {v}: must be {">= 0" if flag == "label_dim" else "> 0"}')
    if not all(m.strip().isdigit() and int(m) > 0 for m in given.cres.split(',')):
        raise UserError(f'--cres {given.cres}: expected positive channel multipliers, e.g. 2,2,2')
    custom = any(a == '--arch' or a.startswith('--arch=') for a in argv)      # sida.py's --arch: one network
    names = ['custom'] if custom else [t.strip() for t in given.targets.split(',') if t.strip()]
    default_modes = 'compile' if given.compile else 'eager,compile' if device.type == 'cuda' else 'eager'
    modes = [m.strip() for m in (given.modes or default_modes).split(',')]
    known_modes = ['eager', 'compile', 'cudagraphs']
    for what, values, known in (('--targets', names, list(TARGETS) + ['custom']), ('--modes', modes, known_modes)):
        bad = [v for v in values if v not in known]
        if bad or not values:
            raise UserError(f'{what}: unknown {", ".join(bad) or "(empty)"} (choose from {", ".join(known[:3])})')
    cpu = ['--batch-gpu', '1'] if device.type == 'cpu' else []
    runs = []
    for name in names:
        for mode in modes:
            flags = (TARGETS[name].split() + cpu if name != 'custom' else ['--batch-gpu', '64'] + cpu) + \
                    ['--precision', 'bf16' if device.type == 'cuda' else 'fp32'] + list(argv)
            args = p.parse_args(flags)
            args.compile = mode != 'eager'
            args.compile_mode = 'reduce-overhead' if mode == 'cudagraphs' else None
            args.batch = args.batch_gpu * fid.world_size()
            args.iters = args.iters or (10 if device.type == 'cuda' else 1)
            args.metrics = 'none'
            sida.check_args(args)
            runs.append((name, mode, args))
    return runs

# ----------------------------------------------------------------------------------------------------
# Counting: the operations an iteration dispatches (each costs host time whatever the tensor size).

class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the tensor operations (views excluded) an iteration dispatches: the kernels eager mode launches."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def network_config(args):
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
    teacher = networks.freeze(networks.build_network(network_config(args)).to(device))
    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    images = torch.randint(0, 256, (1024, *shape), dtype=torch.uint8)
    labels = torch.randint(args.label_dim, (1024,)) if args.label_dim else None
    sampler = sida.Sampler(images, labels, args.label_dim, shape, device)
    layout = {'channels_last': torch.channels_last, 'contiguous': torch.contiguous_format}[args.memory_format]
    return sida.SiDA(args, teacher, teacher, sampler, world, args.batch_gpu, device, memory_format=layout)

# ----------------------------------------------------------------------------------------------------
# One run: count, warm up (and compile), time.

def bench(args, world, device):
    compile_ = args.compile and sida.can_compile(device)
    s = random_sida(argparse.Namespace(**{**vars(args), 'compile': False}), world, device)   # counted eagerly first
    slots = [sida.Slot(0, args.seed, device)]
    iteration = lambda: (s.fake_score_step(slots), s.generator_step(slots, use_adv=s.adversarial))
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    iteration()                                               # creates the optimizer state
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter, OpCounter() as ops:
        iteration()
    flops = counter.get_total_flops()
    if compile_:
        s.compile(args.compile_mode)
    warmups = 3 if compile_ or device.type == 'cuda' else 1
    t0 = time.perf_counter()
    for _ in range(warmups):                                  # warm-up (and compilation)
        iteration()
    sync()
    warmup = time.perf_counter() - t0
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        iteration()
    sync()
    sec = (time.perf_counter() - t0) / args.iters
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    result = {'arch': args.arch, 'resolution': args.resolution, 'batch_gpu': args.batch_gpu, 'precision': args.precision,
              'compile': compile_, 'memory_format': args.memory_format if device.type == 'cuda' else None, 'device': name,
              'torch': torch.__version__, 'img_per_s': round(args.batch_gpu / sec, 2), 'sec_per_iter': round(sec, 4),
              'peak_gb': round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == 'cuda' else None,
              'gflop_per_iter': round(flops / 1e9, 1), 'eager_ops_per_iter': ops.count,
              'mfu': round(flops / sec / (peak * 1e12), 4) if peak else None}
    if compile_:
        from torch._dynamo.utils import counters
        result.update(compile_s=round(max(warmup - warmups * sec, 0), 1), graphs=counters['stats']['unique_graphs'],
                      graph_breaks=sum(counters['graph_break'].values()))
    if args.profile:
        print_profile(iteration, sync, device)
    return result

# ----------------------------------------------------------------------------------------------------
# The profile: where one iteration's time goes.

def print_profile(iteration, sync, device, top=20):
    """The kernels (on the CPU: the operators' self times) of one iteration by their share of the device's
    busy time, and that busy time against the iteration's wall-clock time (a large gap: bound by the host)."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        iteration()
        sync()
    wall = (time.perf_counter() - t0) * 1e3
    if device.type == 'cuda':
        table = {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                ms, count = table.get(e.name, (0., 0))
                table[e.name] = ms + e.time_range.elapsed_us() / 1e3, count + 1
    else:
        table = {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}
    busy = sum(ms for ms, _ in table.values())
    print(f'profile: {"kernels" if device.type == "cuda" else "operators (self time)"} busy {busy:.1f} ms of a {wall:.1f} ms '
          f'iteration (under the profiler), {sum(c for _, c in table.values())} launches', flush=True)
    for name, (ms, count) in sorted(table.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f'{100 * ms / busy:6.2f}% {ms:9.3f} ms {count:6d}x  {name[:110]}', flush=True)

# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    """Each run in turn; a run that fails (out of memory, say) is one JSON line with its error, and the
    others still run. Exit status 1 when any failed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    failed = False
    try:
        device_flag = build_parser().parse_args(argv).device
        rank, world, device = fid.init_distributed(device_flag)
        for name, mode, args in parse_runs(argv, device):
            try:
                result = {'target': name, 'mode': mode, **bench(args, world, device)}
            except Exception as e:
                failed = True
                result = {'target': name, 'mode': mode, 'error': f'{type(e).__name__}: {networks.one_line(e)[:300]}'}
            if rank == 0:
                print(json.dumps(result), flush=True)
            if device.type == 'cuda':
                torch.cuda.empty_cache()
    except UserError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(1)
    sys.exit(1 if failed else 0)


if __name__ == '__main__':
    main()
