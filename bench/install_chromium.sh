#!/usr/bin/env bash
# Headless Chromium for the browser check of tools/serve.py's chat page (tests/tools/test_serve.py), with no
# browser download site needed: the Chromium build inside the npm package @sparticuz/chromium (from the npm
# registry), unpacked to ~/.cache/llama-train-recipes/chromium/, and the playwright Python package (from the Python
# registry) to drive it. Needs node >= 20 and npm. The test finds it there (or at $LLAMA_RECIPES_CHROMIUM) and is
# skipped without it, as in CI.
set -euo pipefail
target="${HOME}/.cache/llama-train-recipes/chromium"
mkdir -p "$target"
cd "$target"
npm install --no-audit --no-fund --silent @sparticuz/chromium@153
cat > unpack.mjs <<'JS'
import chromium from "@sparticuz/chromium";
console.log(await chromium.executablePath());
JS
unpacked="$(node unpack.mjs)"     # the package inflates the binary and its GL libraries into one folder (/tmp)
from="$(dirname "$unpacked")"
cp "$unpacked" "$from"/libEGL.so "$from"/libGLESv2.so "$from"/libvk_swiftshader.so "$from"/libvulkan.so.1 \
   "$from"/vk_swiftshader_icd.json "$target/"   # Chromium loads its software GL from beside itself
python -m pip install --quiet playwright     # into the active environment (. .venv/bin/activate first)
echo "headless Chromium: $target/chromium"
