"""Run many toy distillations side by side (one process each) and print where each stands.

    python toy/sweep.py RUNS.txt OUTDIR [--device cpu|cuda] [--jobs N] [--deadline 480] [--kimg 50,100] [-- extra sida.py flags]

RUNS.txt holds one run per line: a name, then the flags it adds to `python sida.py --preset toy` (lines
starting with # are skipped). The runs start at once, or --jobs at a time (one per CPU core on a CPU-only
machine), each on one CPU thread (on a GPU machine they share the GPU); at the deadline (seconds) the ones
still running are stopped and those not started are skipped. The summary prints, per run, its
fd and acc at the asked kimg, its best fd, and the first snapshot where fd <= and acc >= those of the
teacher's 35-evaluation sampler (from the run's own tick-0 row). Runs are read from OUTDIR/NAME/log.jsonl;
toy/curves.py plots and tabulates them over seeds.
"""

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sida import read_log  # noqa: E402


def read_rows(path):
    return read_log(path) if os.path.isfile(path) else []


def summarise(name, rows, marks):
    snaps = [r for r in rows if 'fd' in r]
    if not snaps:
        return f'{name:14s} no snapshot'
    base = rows[0]
    fd_t, acc_t = base.get('fd_teacher35', float('nan')), base.get('acc_teacher35', float('nan'))
    at = lambda k: min(snaps, key=lambda r: abs(r['kimg'] - k))
    cells = []
    for k in marks:
        r = at(k)
        cells.append(f"@{k:g}: {r['fd']:7.0f} {r.get('acc', float('nan')):.3f}" if abs(r['kimg'] - k) < 2.1 else f'@{k:g}: -')
    best = min(snaps[1:] or snaps, key=lambda r: r['fd'])      # of the run: not tick 0, the generator it began with
    both = next((r for r in snaps[1:] if r['fd'] <= fd_t and r.get('acc', 1) >= acc_t), None)
    last = snaps[-1]
    return (f"{name:14s} " + ' | '.join(cells) + f" | best fd {best['fd']:.0f} @{best['kimg']:.0f} (acc {best.get('acc', 0):.3f})"
            + f" | last {last['kimg']:.0f}: {last['fd']:.0f} {last.get('acc', 0):.3f}"
            + f" | both {'@%.0f' % both['kimg'] if both else '-'} | {rows[-1].get('sec_per_kimg', 0):.2f} s/kimg"
            + f" | teacher {fd_t:.1f} {acc_t:.3f}")


def main(argv):
    p = argparse.ArgumentParser(description='Run toy distillations side by side and summarise them.')
    p.add_argument('runs', help='file of runs: a name and its flags per line')
    p.add_argument('outdir', help='each run goes to OUTDIR/NAME, its console to OUTDIR/NAME.log')
    p.add_argument('--device', default='cpu', help='device of every run')
    p.add_argument('--deadline', type=float, default=480, help='seconds; runs still going then are stopped')
    p.add_argument('--jobs', type=int, default=0, help='runs at a time (0: all at once)')
    p.add_argument('--kimg', default='50,100', type=lambda v: [float(k) for k in v.split(',')],
                   help='kimg at which the summary reads fd and acc (comma list)')
    extra = argv[argv.index('--') + 1:] if '--' in argv else []      # after --: flags for every run
    opts = p.parse_args(argv[:len(argv) - len(extra) - ('--' in argv)])
    runs_file, outdir = opts.runs, opts.outdir
    if not os.path.isfile(runs_file):
        sys.exit(f'sweep.py: {runs_file}: no such file')
    runs = []
    for line in open(runs_file):
        name, *flags = line.split() or ['#']
        if not name.startswith('#'):
            runs.append((name, flags))
    names = [name for name, _ in runs]
    if len(set(names)) < len(names):
        sys.exit(f'sweep.py: {runs_file}: run names must differ (each is a folder of OUTDIR)')
    os.makedirs(outdir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs, waiting = {}, list(runs)
    t0, deadline = time.time(), opts.deadline
    while time.time() - t0 < deadline and (waiting or any(p.poll() is None for p in procs.values())):
        while waiting and (opts.jobs <= 0 or sum(p.poll() is None for p in procs.values()) < opts.jobs):
            name, flags = waiting.pop(0)
            cmd = [sys.executable, os.path.join(here, 'sida.py'), '--preset', 'toy', '--device', opts.device,
                   '--outdir', os.path.join(outdir, name), *extra, *flags]
            with open(os.path.join(outdir, name + '.log'), 'w') as log:      # the child keeps its own handle
                procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        time.sleep(5)
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
    for p in procs.values():
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    print(f'sweep: {len(runs)} runs, {time.time() - t0:.0f} s')
    for name, flags in runs:
        if name not in procs:
            print(f'{name:14s} not started (deadline) | ' + ' '.join(flags))
            continue
        rows = read_rows(os.path.join(outdir, name, 'log.jsonl'))
        print(summarise(name, rows, opts.kimg), '|', ' '.join(flags), f'(exit {procs[name].returncode})')
        if not rows:
            tail = open(os.path.join(outdir, name + '.log')).read()[-600:]
            print('   ', tail.replace('\n', '\n    '))


if __name__ == '__main__':
    main(sys.argv[1:])
