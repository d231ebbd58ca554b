#!/usr/bin/env bash
# MONAI Label against the tumor_segmentation bundle, offline and on 127.0.0.1 only:
#   1. a virtual environment with MONAI Label 0.8.5 (it does not run beside torch 2.13 CPU; it pulls
#      torch 2.14.1 and numpy 1.26, ~8 GB, a few minutes; reused when present);
#   2. the monaibundle sample app (copied from the wheel) with bundles/tumor_segmentation in app/model/;
#   3. studies: two phantom cases as 3-channel NIfTI (T1c, T2, FLAIR) with their labels;
#   4. start the server, POST /infer (checks the label map: the image's shape, labels {0, 1}, overlap with the tumour),
#      POST /train (one epoch; checks a new model.pt), stop the server.
#
# Usage: tools/monailabel_check.sh [WORKDIR]       (default: $TMPDIR/modalitybank_monailabel)
# Env:   PYTHON (with modalitybank installed, for the phantom; default python3),
#        MONAILABEL_VENV (default WORKDIR/venv), MONAILABEL_PORT (default 8123)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${1:-${TMPDIR:-/tmp}/modalitybank_monailabel}
PYTHON=${PYTHON:-python3}
VENV=${MONAILABEL_VENV:-$WORK/venv}
PORT=${MONAILABEL_PORT:-8123}
URL="http://127.0.0.1:$PORT"
MODEL=tumor_segmentation
mkdir -p "$WORK"
step() { printf '\n== %s\n' "$*"; }

step "1/5 MONAI Label venv: $VENV"
if [ ! -x "$VENV/bin/monailabel" ]; then
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet monailabel==0.8.5 "pydicom<3" "dicomweb-client<0.60" "pynetdicom<2.1"
fi
export PATH="$VENV/bin:$PATH"  # the monailabel script runs `python -m monailabel.main`
"$VENV/bin/python" -c "import monailabel, monai, torch; print('monailabel', monailabel.__version__, '| monai', monai.__version__, '| torch', torch.__version__)"

step "2/5 app: monaibundle sample app + bundles/$MODEL"
APP="$WORK/apps/monaibundle"
rm -rf "$WORK/apps"
"$VENV/bin/monailabel" apps --download --name monaibundle --output "$WORK/apps" >/dev/null
mkdir -p "$APP/model"
cp -r "$REPO/bundles/$MODEL" "$APP/model/$MODEL"
rm -rf "$APP/model/$MODEL/eval"
cp "$APP/model/$MODEL/models/model.pt" "$WORK/model_before.pt"

step "3/5 studies: phantom cases as 3-channel NIfTI (t1ce, t2, flair) + labels"
STUDIES="$WORK/studies"
rm -rf "$STUDIES"
mkdir -p "$STUDIES/labels/final"
[ -f "$WORK/phantom/splits.json" ] || modalitybank data phantom --out "$WORK/phantom" --scale tiny --quiet >/dev/null
"$PYTHON" - "$WORK/phantom" "$STUDIES" <<'EOF'
import json, sys
from pathlib import Path
import nibabel as nib
import numpy as np

root, studies = Path(sys.argv[1]), Path(sys.argv[2])
for case in json.loads((root / "splits.json").read_text())["train"][:2]:
    folder = root / "HGG" / case
    ref = nib.load(folder / f"{case}_t1ce.nii.gz")
    image = np.stack([np.asarray(nib.load(folder / f"{case}_{s}.nii.gz").dataobj) for s in ("t1ce", "t2", "flair")], -1)
    nib.save(nib.Nifti1Image(image.astype(np.int16), ref.affine), str(studies / f"{case}.nii.gz"))
    seg = nib.load(folder / f"{case}_seg.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj).astype(np.uint8), seg.affine), str(studies / "labels" / "final" / f"{case}.nii.gz"))
    print(case, image.shape)
EOF
CASE=$(ls "$STUDIES"/*.nii.gz | head -1 | xargs basename | sed 's/\.nii\.gz$//')

step "4/5 server on $URL"
"$VENV/bin/monailabel" start_server --app "$APP" --studies "$STUDIES" --host 127.0.0.1 --port "$PORT" \
    --conf models "$MODEL" --conf zoo_source local --conf sam2 false --conf preload false \
    > "$WORK/server.log" 2>&1 &
SERVER=$!
stop() { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
trap stop EXIT
for _ in $(seq 1 180); do
    curl -sf "$URL/info/" > "$WORK/info.json" && break
    kill -0 "$SERVER" 2>/dev/null || { tail -40 "$WORK/server.log"; echo "server died"; exit 1; }
    sleep 2
done
"$VENV/bin/python" - "$WORK/info.json" "$MODEL" <<'EOF'
import json, sys
info = json.load(open(sys.argv[1]))
model = info["models"][sys.argv[2]]
print("models:", list(info["models"]), "| labels:", model.get("labels"), "| dimension:", model.get("dimension"))
assert model.get("labels") == {"tumor": 1}, model.get("labels")
EOF

step "5/5 /infer and /train"
curl -sf -X POST "$URL/infer/$MODEL?image=$CASE&output=image" -F 'params={"device": "cpu"}' -o "$WORK/pred.nii.gz"
"$VENV/bin/python" - "$WORK/pred.nii.gz" "$STUDIES/$CASE.nii.gz" "$STUDIES/labels/final/$CASE.nii.gz" <<'EOF'
import sys
import nibabel as nib
import numpy as np
pred, image, truth = nib.load(sys.argv[1]), nib.load(sys.argv[2]), nib.load(sys.argv[3])
values = np.unique(np.asarray(pred.dataobj))
print("infer:", pred.shape, "labels", values.tolist(), "| image", image.shape)
assert pred.shape == image.shape[:3] and set(values.tolist()) <= {0, 1}
assert np.allclose(pred.affine, image.affine, atol=1e-3)
p, t = np.asarray(pred.dataobj) > 0, np.asarray(truth.dataobj) > 0
dice = 2 * (p & t).sum() / max(p.sum() + t.sum(), 1)
print(f"infer: whole-tumour Dice against the case's label {dice:.3f}")
assert (p & t).sum() > 0, "the returned label does not overlap the tumour"
EOF
curl -sf -X POST "$URL/train/$MODEL?run_sync=true" -H "Content-Type: application/json" \
    -d '{"max_epochs": 1, "val_split": 0.5, "device": "cpu", "pretrained": true}' > "$WORK/train.json"
if cmp -s "$APP/model/$MODEL/models/model.pt" "$WORK/model_before.pt"; then
    echo "train: models/model.pt unchanged"; tail -40 "$WORK/server.log"; exit 1
fi
grep -E "Epoch\[1\] Metrics|Training Finished" "$WORK/server.log" | tail -3
echo "train: models/model.pt rewritten"
echo "MONAI Label check passed ($WORK)"
