"""fd and acc against kimg, mean and band (± one std) over seeds, for groups of toy runs; and their table.

    python toy/curves.py OUT.png [TITLE] NAME=RUN[,RUN...] [NAME=...] [TITLE NAME=... ...] [--kimg 10,25,50]
        [--at-time SECONDS] [--window FROM,TO] [--until KIMG]

Each RUN is a run folder (its log.jsonl); the runs of one NAME are seeds of one setting, snapshot at the
same kimg. A TITLE (an argument without '=') starts a row of two panels, fd (log scale) and acc, holding
the NAMEs after it; each panel has the baselines of its first run's tick 0 (real data, the teacher's
samplers) as labelled lines. The table (Markdown, on stdout) gives mean ± std over the seeds at each
--kimg and at the end, and the baselines; --at-time adds the figures each setting had reached after that
many seconds of its own training (equal time); --window adds each seed's mean over its snapshots from FROM to
TO kimg (steadier than one snapshot, where fd swings), then their mean ± std over the seeds; --until drops
the rows of longer runs past that kimg. The README's assets/toy-curves.png and its table come from this
script (the command: toy/README.md).
"""

import argparse
import itertools
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sida import read_log  # noqa: E402

COLOURS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#9467bd', '#8c564b', '#e377c2']
BASELINE_COLOURS = {'data': '#000000', 'teacher35': '#d62728', 'teacher17': '#d62728'}


def read_run(run, until=math.inf):
    if not os.path.isfile(os.path.join(run, 'log.jsonl')):
        raise OSError(2, 'no log.jsonl', run)
    return [r for r in read_log(os.path.join(run, 'log.jsonl')) if r['kimg'] <= until]


def snapshots(rows, key):
    """{kimg: value} of the rows that measured `key`."""
    return {round(r['kimg'], 1): r[key] for r in rows if key in r}


def over_seeds(runs, key):
    """kimg, mean and std over the runs at every kimg that all of them measured (the population std, numpy's
    ddof 0: with 3 seeds about 0.8 of the sample std)."""
    series = [snapshots(rows, key) for rows in runs]
    common = sorted(set.intersection(*(set(s) for s in series)))
    values = np.array([[s[k] for s in series] for k in common])
    return np.array(common), values.mean(axis=1), values.std(axis=1)


def baselines(rows, key):
    """{who: value} of tick 0's `key_who` entries (fd_data, fd_teacher35, ...)."""
    return {k.split('_', 1)[1]: v for k, v in rows[0].items() if k.startswith(key + '_')}


def label(who):
    return 'real data' if who == 'data' else f'teacher, {who[7:]} NFE' if who.startswith('teacher') else who


def plot(rows, path):
    """rows: [(title, {name: runs})], a row of an fd and an acc panel each."""
    W, H, m = 520, 360, 60
    img = Image.new('RGBA', (2 * W, len(rows) * (H + 30)), 'white')
    for (row_title, groups), (p, (key, log, title)) in itertools.product(rows, enumerate(
            [('fd', True, 'fd (toy FID, log scale; lower is better)'), ('acc', False, 'acc (share of the asked class; higher is better)')])):
        oy = [t for t, _ in rows].index(row_title) * (H + 30)
        title = f'{row_title}: {title}' if row_title else title
        curves = {name: over_seeds(runs, key) for name, runs in groups.items()}
        marks = baselines(next(iter(groups.values()))[0], key)
        ys = [v for _, mean, std in curves.values() for v in np.concatenate([mean - std, mean + std])] + list(marks.values())
        ys = [y for y in ys if y > 0] if log else ys
        f = (lambda v: math.log10(max(v, 1e-9))) if log else (lambda v: v)
        y0, y1 = min(f(y) for y in ys), max(f(y) for y in ys)
        y1 = y1 if y1 > y0 else y0 + 1
        x1 = max(k[-1] for k, _, _ in curves.values())
        ox = p * W
        px = lambda x: ox + m + x / x1 * (W - 2 * m)
        py = lambda v: oy + m + (y1 - f(v)) / (y1 - y0) * (H - 2 * m)
        layer = Image.new('RGBA', img.size, (0, 0, 0, 0))
        d = ImageDraw.Draw(layer)
        for i, (name, (k, mean, std)) in enumerate(curves.items()):
            colour = COLOURS[i % len(COLOURS)]
            band = [(px(x), py(y)) for x, y in zip(k, mean + std)] + [(px(x), py(y)) for x, y in zip(k[::-1], (mean - std)[::-1])]
            rgb = tuple(int(colour[j:j + 2], 16) for j in (1, 3, 5))
            d.polygon(band, fill=rgb + (60,))
        img.alpha_composite(layer)
        d = ImageDraw.Draw(img)
        d.rectangle([ox + m, oy + m, ox + W - m, oy + H - m], outline='black')
        d.text((ox + m, oy + 15), title, fill='black')
        d.text((ox + W // 2 - 10, oy + H - m + 22), 'kimg', fill='black')
        for j in range(5):
            x, y = x1 * j / 4, y0 + (y1 - y0) * j / 4
            d.text((px(x) - 8, oy + H - m + 6), f'{x:g}', fill='black')
            d.text((ox + 5, py(10 ** y if log else y) - 6), f'{10 ** y if log else y:.3g}', fill='black')
        for who, v in marks.items():
            colour = BASELINE_COLOURS.get(who, '#777777')
            dash = who == 'teacher17'
            for x in range(int(px(0)), int(px(x1)), 8 if dash else 1):
                d.line([(x, py(v)), (min(x + (4 if dash else 1), px(x1)), py(v))], fill=colour)
            d.text((ox + W - m - 110, py(v) + (2 if dash else -13)), label(who), fill=colour)   # 17 NFE below its line
        for i, (name, (k, mean, std)) in enumerate(curves.items()):
            colour = COLOURS[i % len(COLOURS)]
            d.line([(px(x), py(y)) for x, y in zip(k, mean)], fill=colour, width=2)
            seeds = f'{len(groups[name])} seed{"s" * (len(groups[name]) > 1)}'
            d.text((ox + m + 8, oy + m + 6 + 13 * i), f'{name.replace("²", "2")} ({seeds})', fill=colour)   # the bitmap font has no ²
    img.convert('RGB').save(path)


def near(rows, key, kimg):
    """`key` at the snapshot nearest to kimg (ticks end a little past round numbers: 4.096 for 4), or None."""
    s = snapshots(rows, key)
    k = min(s, key=lambda k: abs(k - kimg), default=None)
    return s[k] if k is not None and abs(k - kimg) <= 0.05 * kimg + 0.2 else None


def at_time(rows, seconds, key):
    """The last snapshot measured within `seconds` of training (time_s of the run's own rows)."""
    done = [r for r in rows if key in r and r.get('time_s', 0) <= seconds]
    return done[-1] if done else None


def table(groups, marks, seconds, window=None):
    """One row per setting: fd and acc (mean ± std over its seeds, ddof 0 as in over_seeds) at each kimg mark and
    at the end, (after `seconds`, over the snapshots in `window`,) then the baselines of the first run."""
    fmt = lambda v, key: (f'{np.mean(v):,.0f} ± {np.std(v):,.0f}' if key == 'fd' else f'{np.mean(v):.3f} ± {np.std(v):.3f}')
    when = ' / '.join(f'{k:g}' for k in marks) + ' kimg / end'
    head = [f'fd at {when}', f'acc at {when}'] + ([f'fd, acc after {seconds:g} s (kimg)'] if seconds else [])
    head += [f'fd, acc over the snapshots of {window[0]:g}–{window[1]:g} kimg'] if window else []
    lines = ['| | ' + ' | '.join(head) + ' |', '|---' * (len(head) + 1) + '|']
    for name, runs in groups.items():
        cells = []
        for key in ('fd', 'acc'):
            values = [[near(rows, key, k) for rows in runs] for k in marks] + [[[r[key] for r in rows if key in r][-1] for rows in runs]]
            cells.append(' / '.join('–' if None in v else fmt(v, key) for v in values))
        if seconds:
            hits = [at_time(rows, seconds, 'fd') for rows in runs]
            cells.append('–' if None in hits else f'{fmt([h["fd"] for h in hits], "fd")}, {fmt([h["acc"] for h in hits], "acc")} '
                                                   f'({np.mean([h["kimg"] for h in hits]):.0f})')
        if window:              # each seed's mean over its snapshots in the window, then over the seeds
            means = {key: [np.mean([v for k, v in snapshots(rows, key).items() if window[0] <= k <= window[1]] or np.nan)
                           for rows in runs] for key in ('fd', 'acc')}
            cells.append('–' if np.isnan(means['fd']).any() else f'{fmt(means["fd"], "fd")}, {fmt(means["acc"], "acc")}')
        lines.append(f'| {name} ({len(runs)} seed{"s" * (len(runs) > 1)}) | ' + ' | '.join(cells) + ' |')
    first = next(iter(groups.values()))[0]
    for who, fd in baselines(first, 'fd').items():
        lines.append(f'| {label(who)} | {fd:,.1f} | {baselines(first, "acc").get(who, float("nan")):.3f} |' + ' |' * (len(head) - 2))
    return '\n'.join(lines)


def main(argv):
    p = argparse.ArgumentParser(description='Plot and tabulate toy runs over seeds.')
    p.add_argument('out', help='PNG to write')
    p.add_argument('groups', nargs='+', help='TITLE or NAME=RUN[,RUN...]')
    p.add_argument('--kimg', default='10,25,50', type=lambda v: [float(k) for k in v.split(',')], help='table columns')
    p.add_argument('--at-time', type=float, default=None, help='also tabulate each setting after this many seconds')
    p.add_argument('--window', type=lambda v: [float(k) for k in v.split(',')], default=None,
                   help='FROM,TO: also tabulate each seed\'s mean over its snapshots in this kimg range')
    p.add_argument('--until', type=float, default=math.inf, help='leave out the rows past this kimg')
    args = p.parse_args(argv)
    rows = []
    for spec in args.groups:
        name, _, runs = spec.partition('=')
        if not runs:
            rows.append((spec, {}))
            continue
        if not rows:
            rows.append(('', {}))
        try:
            rows[-1][1][name] = [read_run(run, args.until) for run in runs.split(',')]
        except OSError as e:
            sys.exit(f'curves.py: {name}: {e.filename}: {e.strerror}')
    if not all(groups for _, groups in rows):
        sys.exit('curves.py: every TITLE needs at least one NAME=RUN after it')
    plot(rows, args.out)
    print(table({k: v for _, groups in rows for k, v in groups.items()}, args.kimg, args.at_time, args.window))


if __name__ == '__main__':
    main(sys.argv[1:])
