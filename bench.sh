#!/usr/bin/env bash
# Throughput of full SiDA iterations (random networks, no downloads) for the README's three speed targets,
# eager and compiled: one JSON line per run; PROFILE=1 also prints each run's top kernels.
#   bash bench.sh                                  # all three targets, eager and --compile, bf16
#   TARGETS=cifar10 MODES=eager PRECISION=tf32 bash bench.sh --bench-iters 20
# Extra arguments go to every `sida.py --bench` call (the last value of a flag wins). LIMIT: seconds per run.
set -u
cd "$(dirname "$0")"
declare -A TARGET=(
  [cifar10]='--arch ddpmpp --resolution 32 --cbase 128 --cres 2,2,2 --batch-gpu 64'
  [imagenet64]='--arch adm --resolution 64 --cbase 192 --cres 1,2,3,4 --label-dim 1000 --batch-gpu 32 --dropout 0.1'
  [edm2-xs]='--arch edm2 --resolution 64 --cbase 128 --cres 1,2,3,4 --label-dim 1000 --batch-gpu 64 --dropout 0'
)
for name in ${TARGETS:-cifar10 imagenet64 edm2-xs}; do
  [ -n "${TARGET[$name]+set}" ] || { echo "bench.sh: TARGETS: unknown target '$name' (${!TARGET[*]})" >&2; exit 2; }
  for mode in ${MODES:-eager compile}; do
    [ "$mode" = eager ] || [ "$mode" = compile ] || { echo "bench.sh: MODES: unknown mode '$mode' (eager compile)" >&2; exit 2; }
    flags="--bench ${TARGET[$name]} --precision ${PRECISION:-bf16}"
    [ "$mode" = compile ] && flags="$flags --compile"
    [ "${PROFILE:-0}" = 1 ] && flags="$flags --profile"
    echo "# $name $mode: python sida.py $flags $*"
    timeout "${LIMIT:-900}" "${PYTHON:-python}" sida.py $flags "$@" || echo "{\"target\": \"$name\", \"mode\": \"$mode\", \"exit\": $?}"
  done
done
