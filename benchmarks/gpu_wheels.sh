#!/usr/bin/env bash
# Prepares what benchmarks/gpu_check.sh needs on a GPU machine that has no network (Python 3.12, x86-64,
# torch with CUDA 13, transformers/peft/accelerate present; deepspeed, bitsandbytes, hjson, pydantic,
# datasets, matplotlib absent):
#   .whl/      the wheels to install there (pure-python deepspeed built here; bitsandbytes cut down to its
#              CUDA 13 and CPU libraries; the transformers/peft versions .venv tests with, and their newer
#              huggingface-hub with its HTTP stack)
#   .gpudata/  the first DATA_MIB MiB of the vimdoc training text and the vimdoc tokenizer
# Both are ignored (.git/info/exclude) and travel with the run's `carry`. No network is needed afterwards.
#   bash benchmarks/gpu_wheels.sh                       # .whl for cp312 (the GPU machine)
#   PYVER=3.11 WHL=/tmp/simwhl bash benchmarks/gpu_wheels.sh   # the same set for this machine's python (a CPU rehearsal)
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
WHL=${WHL:-.whl}
DATA_MIB=${DATA_MIB:-3}
SHARED=${SHARED:-../shared}
CP="cp${PYVER/./}"
mkdir -p "$WHL"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
# One version of each; same as .venv where .venv has the package.
PKGS=(
  bitsandbytes==0.50.2
  hjson==3.1.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  transformers==5.25.0 peft==0.21.2 accelerate==1.16.0
  # transformers 5.25 needs huggingface-hub>=2.4 (the GPU machine has 1.33), which talks HTTP through httpx2
  huggingface-hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 h11==0.16.0
  anyio==4.16.0 idna==3.20
  regex==2026.11.19  # transformers 5.25: regex>=2025.10.22
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --abi "$CP" --abi abi3 --abi none "${PLATFORMS[@]}" -d "$WHL" "${PKGS[@]}"
# deepspeed is an sdist: a pure wheel with no prebuilt ops (they would be JIT-built if ever used; the
# pipeline uses torch's AdamW and needs none).
if ! ls "$WHL"/deepspeed-0.19.8-py3-none-any.whl >/dev/null 2>&1; then
  DS_BUILD_OPS=0 .venv/bin/pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$WHL"
fi
# bitsandbytes ships a library per CUDA/ROCm/XPU version (43 MB); keep CUDA 13.x and CPU (about 4 MB).
python3 - "$WHL" <<'EOF'
import base64, hashlib, re, sys, zipfile
from pathlib import Path

whl = next(Path(sys.argv[1]).glob("bitsandbytes-0.50.2-*.whl"))
keep = re.compile(r"libbitsandbytes_(cuda13\d|cpu)\.so$")
with zipfile.ZipFile(whl) as z:
    names = [n for n in z.namelist() if "libbitsandbytes_" not in n or keep.search(n)]
    if not any("cuda130" in n for n in names):
        sys.exit(f"{whl}: no libbitsandbytes_cuda130.so")
    if len(names) == len(z.namelist()):
        sys.exit(0)  # already cut down
    data = {n: z.read(n) for n in names}
    infos = {n: z.getinfo(n) for n in names}
record = next(n for n in names if n.endswith(".dist-info/RECORD"))
rows = []
for n in names:
    if n == record:
        continue
    digest = base64.urlsafe_b64encode(hashlib.sha256(data[n]).digest()).rstrip(b"=").decode()
    rows.append(f"{n},sha256={digest},{len(data[n])}")
data[record] = ("\n".join([*rows, f"{record},,"]) + "\n").encode()
tmp = whl.with_suffix(".tmp")
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
    for n in names:
        out.writestr(infos[n], data[n], compress_type=zipfile.ZIP_DEFLATED)
tmp.replace(whl)
print(f"{whl.name}: kept {sum('libbitsandbytes_' in n for n in names)} libraries, {whl.stat().st_size / 2**20:.1f} MiB")
EOF
ls -l "$WHL"
du -sh "$WHL"
# Data and tokenizer (only token ids matter: the 4096 vimdoc ids all lie inside the 8B shape's 128256).
mkdir -p .gpudata/tokenizer
python3 - "$SHARED/data/vimdoc/train.txt" .gpudata/train.txt "$DATA_MIB" <<'EOF'
import sys
src, dst, mib = sys.argv[1], sys.argv[2], int(sys.argv[3])
text = open(src, encoding="utf-8").read()
cut = text[: mib * 2**20]
cut = cut[: cut.rfind("\n") + 1] or cut  # whole lines
open(dst, "w", encoding="utf-8").write(cut)
print(f"{dst}: {len(cut.encode()) / 2**20:.2f} MiB of {src}")
EOF
cp "$SHARED/models/vimdoc-llama-7m/tokenizer.json" "$SHARED/models/vimdoc-llama-7m/tokenizer_config.json" \
  .gpudata/tokenizer/
du -sh .gpudata
