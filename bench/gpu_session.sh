#!/usr/bin/env bash
# Every GPU check of the CUDA renderer in one device call (about 8 minutes; results under $OUT).
#
#   bash bench/gpu_session.sh prepare     here: the wheels the GPU machine lacks into .whl/, lego (train + every
#                                         8th test view) and the commit into .data/, both git-ignored locally
#   bash bench/gpu_session.sh run         there (device tool: carry [".whl", ".data"]); QUICK=1 PY=python runs
#                                         the same stages tiny on a CPU, to check the script itself
#
# Stages, each under its own time limit so one slow stage leaves the others their time: the CUDA kernels against
# their twins (tests/test_kernels.py), renderer throughput against nerfacc and the twins (bench/kernels.py),
# training rays/s and an 800x800 render with the kernels and without (bench/profile_step.py), and test PSNR
# against training time on lego (bench/fit_curve.py); on a machine of several GPUs, the gradient exchange
# (bench/allreduce.py) and the scaling of `recon fit --nproc N` (bench/ranks.py). nerfacc's JIT build runs in
# the background from the start.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}

prepare() {
  local lego=${LEGO:-../shared/data/lego}
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || printf '/.whl/\n/.data/\n' >>.git/info/exclude
  rm -rf .whl .data && mkdir -p .whl .data/lego
  cp ../shared/wheels/py312/{nerfacc,trimesh,PyMCubes}-*.whl .whl/  # the rest recon imports is on the GPU image
  cp -r "$lego/train" "$lego/transforms_train.json" .data/lego/
  python - "$lego" <<'EOF'
import json, shutil, sys
from pathlib import Path
lego, out = Path(sys.argv[1]), Path(".data/lego")
for split, stride in (("test", 8), ("val", 50)):  # a subset of the held-out views keeps the carry small
    meta = json.loads((lego / f"transforms_{split}.json").read_text())
    meta["frames"] = meta["frames"][::stride]
    for frame in meta["frames"]:
        path = Path(frame["file_path"] + ".png")
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lego / path, out / path)
    (out / f"transforms_{split}.json").write_text(json.dumps(meta))
EOF
  git rev-parse HEAD >.data/commit.txt
  git diff --quiet HEAD || echo "note: uncommitted changes travel too; .data/commit.txt names HEAD only"
  du -sh .whl .data
}

stage() {  # stage NAME LIMIT_SECONDS COMMAND...: run it under a time limit, its output into the session log
  local name=$1 limit=$2 started=$SECONDS
  shift 2
  echo "== $name (limit ${limit} s) at $(date +%T)"
  timeout "$limit" "$@" 2>&1
  echo "== $name: exit $? after $((SECONDS - started)) s"
}

run() {
  OUT=${OUT:-/tmp/recon-gpu}
  mkdir -p "$OUT"
  exec > >(tee "$OUT/session.log") 2>&1
  local quick=${QUICK:-0} scene=${SCENE:-.data/lego}
  export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 MAX_JOBS=${MAX_JOBS:-12} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
  # The caller's build folders where it names them (the tests share the CPU build the test suite made)
  export RECON_EXTENSIONS_DIR=${RECON_EXTENSIONS_DIR:-/tmp/recon-extensions}
  export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch-extensions}
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  if [ -d .whl ]; then $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  # The repository root is the package `recon`: linked in where `import recon` finds another copy or none (one
  # folder per checkout, fixed so the kernels' build is reused). Not where this checkout is installed: the
  # sources' path then is the tests' own, so the CPU build the tests made serves here too.
  if [ "$($PY -c 'import os, recon; print(os.path.dirname(os.path.realpath(recon.__file__)))' 2>/dev/null)" != "$(pwd -P)" ]
  then
    local pkgs
    pkgs=/tmp/recon-pkgs/$(pwd -P | cksum | cut -d' ' -f1)
    mkdir -p "$pkgs" && ln -sfn "$PWD" "$pkgs/recon" && export PYTHONPATH=$pkgs:$PYTHONPATH
  fi
  # nerfacc's build includes ATen's CUDA headers, which want cuBLAS's: the nvidia wheels carry them.
  CPATH=$($PY -c "import glob, os, torch; print(':'.join(glob.glob(os.path.join(os.path.dirname(torch.__file__), '..', 'nvidia', '*', 'include'))))")
  export CPATH
  echo "commit $(cat .data/commit.txt 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"

  local gpu
  gpu=$($PY -c "import torch; print(int(torch.cuda.is_available()))")
  if [ "$gpu" = 1 ]; then  # in the background while the first stages run
    (timeout 420 $PY -c "from nerfacc.cuda._backend import _C; print('nerfacc built')" >"$OUT/nerfacc-build.log" 2>&1 &)
  fi
  local rays=65536 warmup=500 repeats=20 centres=11878 profile_warmup=100 steps=64 side=800
  local curve_time=60 marks="10 20 30 45 60" views=5 tests="cuda and not compile" sets=""
  if [ "$quick" = 1 ]; then  # every stage and result file, about 20 s on two CPU cores once the kernels are built
    rays=1024 warmup=2 repeats=2 centres=256 profile_warmup=2 steps=4 side=24 curve_time=2 marks="1 2" views=1
    sets="--set batch_rays=256 --set sample_budget=4096"  # training steps a few times lighter than the CPU preset
    tests="compositing and cpu"  # the CPU build against the twins: seconds, where a trained run takes minutes
  fi

  stage kernel-parity 180 $PY -m pytest tests/test_kernels.py -q -rs -p no:cacheprovider -k "$tests"
  stage renderer-throughput 120 $PY bench/kernels.py "$scene" --warmup "$warmup" --rays "$rays" \
    --repeats "$repeats" --nearest-kernels "$centres" --out "$OUT/kernels.json"
  for mode in off auto; do
    stage "training-kernels-$mode" 90 env RECON_KERNELS=$mode $PY bench/profile_step.py "$scene" \
      --warmup "$profile_warmup" --steps "$steps" --render-side "$side" $sets --out "$OUT/profile-$mode.json"
  done
  stage psnr-against-time 150 $PY bench/fit_curve.py "$scene" --max-time "$curve_time" --marks $marks \
    --eval-views "$views" $sets --out "$OUT/lego-curve.json"
  if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -gt 1 ]; then  # a multi-GPU machine (issue 33)
    stage allreduce 90 $PY bench/allreduce.py --gpus --out "$OUT/allreduce.json"
    stage ranks-scaling 420 $PY bench/ranks.py "$scene" --gpus --max-time 30 --steps 2000 --eval-stride 4 \
      --runs /tmp/recon-ranks --out "$OUT/ranks.json"
  fi
  if [ "$gpu" = 1 ]; then echo "== nerfacc build log (tail)"; tail -n 20 "$OUT/nerfacc-build.log"; fi
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: bash bench/gpu_session.sh prepare|run" >&2; exit 2 ;;
esac
