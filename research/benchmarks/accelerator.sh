#!/bin/bash
# The accelerator measurements of BENCHMARKS.md, in one short script (about 8 minutes on one GPU):
#
#   bash research/benchmarks/accelerator.sh            # writes its tables to $OUT (default /tmp)
#
# 1. The FMNIST round at the official workload (LeNet-5, 100 clients of 600 examples on average,
#    10 sampled, batch 64, 5 local epochs) with every client-execution strategy and both
#    convolution implementations, and the achieved GFLOP/s against a matmul in the same process.
# 2. Conv4 (the CIFAR-10 model) the same way, one local epoch.
# 3. 10^5 resident digits-CNN clients: the lazy round and the panel evaluation (scale.py).
# Each part has its own time limit, so a slow part cannot eat the others' time.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp}
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c 'import jax; print(jax.__version__, jax.devices())' 2>&1 | tee -a "$OUT/device.txt"
timeout 240 $PY research/benchmarks/rounds.py --models=lenet5 --conv_impls=xla,im2col \
  --strategies=loop,map,vmap --num_clients=100 --mean_examples=600 --alpha=0.5 --local_epochs=5 \
  --rounds=4 --padded_scan=lenet5 2>&1 | tee "$OUT/rounds_fmnist.txt"
timeout 150 $PY research/benchmarks/rounds.py --models=conv4 --conv_impls=xla,im2col \
  --strategies=map,vmap --num_clients=100 --mean_examples=500 --alpha=0.1 --rounds=4 \
  --padded_scan= 2>&1 | tee "$OUT/rounds_cifar.txt"
timeout 150 $PY research/benchmarks/scale.py --clients=100000 --forms=lazy --rounds=4 \
  --full_eval_max=100000 2>&1 | tee "$OUT/scale.txt"
